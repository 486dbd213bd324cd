"""The puller: one content from many sources, as a documented pipeline.

    pick source (least busy, not failing) -> fetch a run of chunks (one signed request, the
    chunks streamed back to back; one chunk per request from a source that serves no runs)
    -> verify each chunk's length + SHA1 as it arrives (hashing.pieces_ok)
    -> pwrite it into tmp/<blake3>.repl (O_DIRECT where it can: see DIRECT_ALIGN) -> ... -> fsync
    -> whole-file blake3 (hashing.WholeHash; the signed manifest's hash, over the verified chunks)
    -> (caller) atomic rename into packages/ -> PackageAvailable

A chunk that fails its SHA1 is dropped, the source is reported and penalised, the rest of
its run is still taken, and the chunk is fetched again from another source. A run cut
short keeps the chunks that came; the rest are asked for again. After a crash the temp
file is re-verified chunk by chunk and only missing or bad chunks are fetched again.
"""

from __future__ import annotations

import asyncio
import errno
import os
import queue
import random
import threading
import time
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from odst.replicator.runclient import BUFFERS, ChunkBuffer
from odst.replicator.transport import (ChunkSource, ChunkUnavailable, RunsUnsupported, SourceThrottled,
                                       TransportFailed)
from odst.store.files import DIRECT_ALIGN, open_direct, preallocate, start_writeback
from odst.store.hashing import Manifest, WholeHash, chunk_count, chunk_ok, chunk_span, is_blake3, pieces_ok

log = structlog.get_logger("odst.puller")

BAD_CHUNK_PENALTY = 1000.0
FAILURE_PENALTY = 100.0
PENALTY_HALF_LIFE_S = 30.0
MAX_ROUNDS = 4  # times every source may fail one chunk before the transfer gives up
THROTTLED_RETRY_MAX_S = 2.0  # a source holding a chunk back is asked again this soon at the latest
AHEAD_CHUNKS = 32  # chunks kept in memory ahead of the whole-file hash (bounds memory)
RUN_CHUNKS = 16  # most chunks asked for in one request (a server serves up to peer_run_chunks, 16 by default)
STREAMS_PER_SOURCE = 2  # requests in flight per source: one streams while the other's answer starts
WRITE_PIECE = 256 << 10  # pwrite size: a 1 MiB copy into cold page-cache pages costs 4-5x four of these
PAY_WAITED_S = 0.001  # a receive-limit payment that took longer made the puller wait: the link is limited
# A whole chunk in a run client's buffer (page-aligned, ``ChunkBuffer``) at an offset and of a
# length that are multiples of this goes to the temp file with O_DIRECT: straight from the buffer
# to the disk, no copy into page-cache pages, no buffer heads, no writeback left for the fsync.
# Buffered, those cost the receiver more than half its SHA1 again (perf on a 512 MiB pair:
# pwrite 0.45 CPU-s/GiB with ext4's buffer-head allocation, O_DIRECT 0.14). Anything else (the
# short last chunk, bytes from aiohttp, a file system refusing O_DIRECT) is written buffered.
# (DIRECT_ALIGN: O_DIRECT's unit, from store.files, which writes a large upload's body so too.)


class TransferFailed(Exception):
    """The content could not be fetched and verified from any source (for now)."""


class Want(Manifest, frozen=True, kw_only=True):
    """A manifest to pull, with the name, stage and upload clock its PackageAvailable carries."""

    name: str
    stage: str
    origin: str
    uploaded_ts: int
    uploaded_by: str


@dataclass
class Progress:
    name: str
    blake3: str
    total: int
    done: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    status: str = "pending"
    detail: str = ""
    sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        return {"name": self.name, "blake3": self.blake3, "status": self.status, "detail": self.detail,
                "chunks_done": self.done, "chunks_total": self.total,
                "rate_bytes_per_s": int(self.bytes / elapsed) if self.status == "downloading" else 0,
                "sources": self.sources}


class _SourceState:
    def __init__(self, source: ChunkSource, base: float):
        self.source = source
        self.base = base
        self.in_flight = 0
        self.penalty = 0.0
        self.penalty_at = time.monotonic()
        self.runs = hasattr(source, "fetch_run")  # until it answers a run 404 (an older peer)

    def cost(self) -> float:
        age = time.monotonic() - self.penalty_at
        return self.base + self.in_flight + self.penalty * 0.5 ** (age / PENALTY_HALF_LIFE_S)

    def punish(self, amount: float) -> None:
        self.penalty = self.penalty * 0.5 ** ((time.monotonic() - self.penalty_at) / PENALTY_HALF_LIFE_S) + amount
        self.penalty_at = time.monotonic()


def temp_path(tmp_dir: Path, blake3: str) -> Path:
    """A pull's temp file: always a file of ``tmp_dir`` (ValueError for anything but a digest)."""
    if not is_blake3(blake3):
        raise ValueError(f"not a blake3 digest: {blake3[:80]!r}")
    return tmp_dir / f"{blake3}.repl"


class _Workers:
    """The threads every pull verifies, writes and hashes on, shared: a catch-up of thousands of
    small packages used to start two threads per package, a fifth of its busy time. A pull's
    whole-file hash stays in order (one pass at a time, ``_advance_hashes``); its chunk writes
    are to distinct offsets.

    ``run`` hands a job to the threads by one C queue and its outcome back by one
    ``call_soon_threadsafe``: a ThreadPoolExecutor's submit (a lock, a condition, a semaphore,
    a concurrent Future) and the asyncio future chained to it were a fifth of the receiving
    event loop's Python time on a 512 MiB pull (py-spy --gil), a job per 1 MiB chunk. As with
    ``run_in_executor``, cancelling the future does not stop a job already running."""

    def __init__(self, n: int, name: str):
        self.n, self.name = n, name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def run(self, fn: Callable, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if len(self._threads) < self.n:
            self._start()
        self._jobs.put((fn, args, loop, fut))
        return fut

    def _start(self) -> None:
        with self._lock:
            while len(self._threads) < self.n:
                t = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
                t.start()
                self._threads.append(t)

    def _work(self) -> None:
        while True:
            fn, args, loop, fut = self._jobs.get()
            try:
                outcome, failed = fn(*args), False
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting pull
                outcome, failed = exc, True
            try:
                loop.call_soon_threadsafe(_resolve, fut, outcome, failed)
            except RuntimeError:  # that event loop is closed: nobody waits any more
                pass
            del fn, args, loop, fut, outcome  # nothing of a finished job kept alive while idle


def _resolve(fut: asyncio.Future, outcome, failed: bool) -> None:
    if fut.cancelled():
        return
    if failed:
        fut.set_exception(outcome)
    else:
        fut.set_result(outcome)


_POOL = _Workers(4, "odst-pull")


def _threads() -> _Workers:
    return _POOL


class Puller:
    def __init__(self, want: Want, sources: list[tuple[ChunkSource, float]], tmp_dir: Path, *,
                 streams: int = 8, progress: Progress | None = None,
                 on_bad_source: Callable[[str, str, int], None] | None = None,
                 throttle: Callable[[str, int], Awaitable[None]] | None = None):
        self.want = want
        self.states = [_SourceState(s, base) for s, base in sources]
        self.path = temp_path(tmp_dir, want.blake3)
        # at most ``streams`` requests in flight, and two per source: more to one source only cut
        # the runs shorter (more requests to sign, check and answer, more sockets to wake for;
        # measured on a pair: a third less CPU per GiB at the sender with 2 streams than with 8)
        self.streams = max(1, min(streams, STREAMS_PER_SOURCE * len(sources)))
        # requests in flight x chunks each stay within the whole-file hash's window (memory as
        # with one chunk a request): 2 streams ask for runs of 16, 8 for runs of 4
        self.run_chunks = max(1, min(RUN_CHUNKS, AHEAD_CHUNKS // self.streams))
        self.progress = progress or Progress(want.name, want.blake3, len(want.chunks))
        self.on_bad_source = on_bad_source or (lambda site, reason, index: None)
        self.throttle = throttle  # (peer, bytes): waits for the link's receive limit (bandwidth.py)
        self._writer = self._hasher = _threads()
        self.direct_chunks: set[int] = set()  # chunks written with O_DIRECT (set.add: one at a time)
        self._fds_cv = threading.Condition()  # the temp file's descriptors: writes in progress, closed
        self._fds_users, self._fds_closed = 0, False

    async def run(self) -> Path:
        w = self.want
        if chunk_count(w.size, w.chunk_size) != len(w.chunks):
            raise TransferFailed("manifest is inconsistent: chunk count does not match size")
        if not self.states:
            raise TransferFailed("no source has this content")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._direct_fd = open_direct(self.path)  # -1: every write buffered
        self._direct = self._direct_fd >= 0  # False once the file system refuses a direct write
        BUFFERS.hold()
        try:
            existing = os.fstat(fd).st_size
            if existing > w.size:
                os.ftruncate(fd, 0)
                existing = 0
            os.ftruncate(fd, w.size)
            preallocate(fd, w.size)  # before the writes: threads writing a sparse file contend
            done = await asyncio.to_thread(self._verified_chunks, fd) if existing else set()
            self.progress.done = len(done)
            self.progress.status = "downloading"
            self.progress.sources = sorted({s.source.site for s in self.states})
            if done:
                log.info("resuming transfer", package=w.name, verified_chunks=len(done), total=len(w.chunks))
            self._written = set(done)
            self._ahead: dict[int, list] = {}
            self._hashed_upto = 0
            self._hash_task: asyncio.Task | None = None
            self._whole = WholeHash(sha1=False)
            self._queue: deque[int] = deque(i for i in range(len(w.chunks)) if i not in done)
            self._tried: defaultdict[int, set[int]] = defaultdict(set)  # sources tried per chunk, this round
            self._rounds: Counter[int] = Counter()
            self._paid: set[int] = set()  # chunks whose receive limit is paid (once per chunk)
            self._fd = fd
            workers = [asyncio.create_task(self._worker(fd))
                       for _ in range(min(self.streams, len(self._queue)))]
            try:
                await asyncio.gather(*workers)
            finally:
                for t in workers:
                    t.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if self._hash_task is not None:  # never leave a pass reading a closed fd
                    await asyncio.gather(self._hash_task, return_exceptions=True)
            if self._hash_task is not None:
                await self._hash_task
            await self._advance_hashes(fd)  # whatever the last pass had not reached
            await asyncio.to_thread(os.fsync, fd)
            if self._hashed_upto != len(w.chunks):
                raise TransferFailed("internal: not every chunk was hashed")
            b3 = self._whole.blake3
        finally:
            self._close_fds(fd)  # waits for a write in progress (at most one chunk's)
            BUFFERS.release()
        if b3 != w.blake3:  # every chunk passed its SHA1: this is the whole-file check
            self.path.unlink(missing_ok=True)
            raise TransferFailed(f"whole-file hash mismatch (blake3 {b3}); discarded")
        return self.path

    def _verified_chunks(self, fd: int) -> set[int]:
        """Chunks already in the temp file that match the manifest (resume after a crash)."""
        done = set()
        w = self.want
        for i, expected in enumerate(w.chunks):
            offset, length = chunk_span(i, w.size, w.chunk_size)
            data = os.pread(fd, length, offset)
            if chunk_ok(data, length, expected):
                done.add(i)
        return done

    async def _advance_hashes(self, fd: int) -> None:
        """Feed the whole-file blake3 as the contiguous written prefix grows.

        Runs beside the transfer on its own thread, from the chunks still in
        memory (kept while they are a few ahead of the hashed prefix) or else
        re-read from the page cache, so only the last chunks are left at the end.
        """
        while self._hashed_upto in self._written:
            start = end = self._hashed_upto
            while end in self._written and end - start < 16:
                end += 1
            blocks = [self._ahead.pop(i, None) for i in range(start, end)]
            await self._hasher.run(self._hash_range, fd, start, blocks)
            self._hashed_upto = end
            _give_back(blocks)  # hashed: nothing refers to these bytes any more

    def _kick_hashes(self, fd: int) -> None:
        if self._hash_task is None or self._hash_task.done():
            self._hash_task = asyncio.ensure_future(self._advance_hashes(fd))

    def _hash_range(self, fd: int, start: int, blocks: list[list | None]) -> None:
        w = self.want
        for i, pieces in enumerate(blocks, start):
            if pieces is None:
                offset, length = chunk_span(i, w.size, w.chunk_size)
                pieces = [os.pread(fd, length, offset)]
            for piece in pieces:
                self._whole.update(piece)

    def _verify_and_write(self, fd: int, index: int, pieces: list, offset: int, length: int) -> bool:
        """On a pull thread. A job whose pull has ended (cancelled while the job waited for a
        thread: nothing awaits it) writes nothing: the descriptors' numbers may be another
        file's by now (``_close_fds``)."""
        with self._fds_cv:
            if self._fds_closed:
                raise TransferFailed("the pull has ended; chunk not written")
            self._fds_users += 1
        try:
            return self._verify_and_write_open(fd, index, pieces, offset, length)
        finally:
            with self._fds_cv:
                self._fds_users -= 1
                self._fds_cv.notify_all()

    def _close_fds(self, fd: int) -> None:
        """Close the temp file's descriptors once no pull thread writes through them, and let
        no write start after (a write waiting for a thread when its pull was cancelled)."""
        with self._fds_cv:
            self._fds_closed = True
            while self._fds_users:
                self._fds_cv.wait()
        os.close(fd)
        if self._direct_fd >= 0:
            os.close(self._direct_fd)

    def _verify_and_write_open(self, fd: int, index: int, pieces: list, offset: int, length: int) -> bool:
        if not pieces_ok(pieces, length, self.want.chunks[index]):
            return False
        if (self._direct and len(pieces) == 1 and type(pieces[0]) is ChunkBuffer
                and not offset % DIRECT_ALIGN and not length % DIRECT_ALIGN and len(pieces[0]) == length):
            try:
                view = memoryview(pieces[0])
                while view:  # a short direct write ends on a block boundary: the rest stays aligned
                    n = os.pwrite(self._direct_fd, view, offset)
                    view, offset = view[n:], offset + n
                self.direct_chunks.add(index)
                return True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                log.info("O_DIRECT write refused; writing buffered", package=self.want.name, error=str(exc))
                self._direct = False  # whatever was not written goes buffered below
                pieces, length = [view], len(view)
        start = offset
        for piece in pieces:
            view = memoryview(piece)
            while view:
                n = os.pwrite(fd, view[:WRITE_PIECE], offset)
                view, offset = view[n:], offset + n
        if start_writeback is not None:  # the disk write starts now: the final fsync has little left
            start_writeback(fd, start, length)
        return True

    def _pick(self, tried: set[int]) -> _SourceState | None:
        candidates = [s for s in self.states if id(s) not in tried]
        if not candidates:
            return None
        best = min(s.cost() for s in candidates)
        return random.choice([s for s in candidates if s.cost() - best < 0.5])

    async def _pay(self, site: str, index: int) -> bool:
        """The link's receive limit for one chunk, once per chunk; True if it made us wait."""
        if self.throttle is None or index in self._paid:
            return False
        t0 = time.monotonic()
        await self.throttle(site, chunk_span(index, self.want.size, self.want.chunk_size)[1])
        self._paid.add(index)
        return time.monotonic() - t0 > PAY_WAITED_S

    async def _worker(self, fd: int) -> None:
        while self._queue:
            await self._fetch(fd, self._queue.popleft())

    async def _fetch(self, fd: int, index: int) -> None:
        """Until chunk ``index`` is written: pick a source, ask it for a run starting at
        ``index`` (as far as the next chunks are still wanted and the link lets them come
        without waiting), keep every good chunk that arrives."""
        w = self.want
        while index not in self._written:
            tried = self._tried[index]
            state = self._pick(tried)
            if state is None:
                self._rounds[index] += 1
                if self._rounds[index] >= MAX_ROUNDS:
                    raise TransferFailed(f"chunk {index}: every source failed {MAX_ROUNDS} times")
                tried.clear()
                await asyncio.sleep(min(2.0 ** self._rounds[index] * 0.25, 5.0))  # back off before another round
                continue
            tried.add(id(state))
            src = state.source
            run = [index]
            state.in_flight += 1
            got: list[int] = []
            throttled = 0.0
            try:
                waited = await self._pay(src.site, index)
                if state.runs and not waited:  # a limited link is paced chunk by chunk
                    while (len(run) < self.run_chunks and self._queue and self._queue[0] == run[-1] + 1
                           and id(state) not in self._tried[self._queue[0]]):
                        run.append(self._queue.popleft())
                        if await self._pay(src.site, run[-1]):
                            break
                if state.runs:
                    await self._take_run(fd, state, run, got)
                else:
                    data = await src.fetch(w.blake3, index)
                    got.append(index)
                    await self._settle(state, index, [data], self._write(fd, index, [data]))
            except RunsUnsupported:  # an older peer: one chunk per request from now on
                state.runs = False
                tried.discard(id(state))
                log.info("source serves one chunk per request", package=w.name, peer=src.site)
            except SourceThrottled as exc:  # held back by the source's link: not its fault
                tried.discard(id(state))
                throttled = min(exc.retry_after, THROTTLED_RETRY_MAX_S)
            except (TransportFailed, ChunkUnavailable) as exc:
                if not got:  # a run that delivered chunks before it broke made progress
                    state.punish(FAILURE_PENALTY)
                log.info("chunk fetch failed; trying another source", package=w.name, chunk=index,
                         chunks=len(run), delivered=len(got), peer=src.site, transport=src.kind, error=str(exc))
            finally:
                state.in_flight -= 1
            self._requeue(run[1:])
            if throttled:
                await asyncio.sleep(throttled)

    def _requeue(self, rest: list[int]) -> None:
        """Chunks of a run that did not arrive, or failed their check, go back to the front,
        in order (the hashed prefix waits for them)."""
        self._queue.extendleft(reversed([i for i in rest if i not in self._written]))

    async def _take_run(self, fd: int, state: _SourceState, run: list[int], got: list[int]) -> None:
        """Stream ``run`` from the source; each chunk is verified and written on the writer
        thread while the next one arrives."""
        w = self.want
        lengths = [chunk_span(i, w.size, w.chunk_size)[1] for i in run]
        pending = None
        stream = state.source.fetch_run(w.blake3, run[0], lengths)
        try:
            async for pieces in stream:
                index = run[len(got)]
                got.append(index)
                # the newest write is pending before the one before it is settled: if that one
                # failed (the disk is full), this one is still settled below, its failure read
                previous, pending = pending, (index, pieces, self._write(fd, index, pieces))
                if previous is not None:
                    await self._settle(state, *previous)
        finally:
            await stream.aclose()
            if pending is not None:
                await self._settle(state, *pending)

    def _write(self, fd: int, index: int, pieces: list) -> asyncio.Future:
        offset, length = chunk_span(index, self.want.size, self.want.chunk_size)
        return self._writer.run(self._verify_and_write, fd, index, pieces, offset, length)

    async def _settle(self, state: _SourceState, index: int, pieces: list, future: asyncio.Future) -> None:
        """The outcome of one chunk's check and write: counted, or dropped and reported."""
        w = self.want
        src = state.source
        if not await future:
            state.punish(BAD_CHUNK_PENALTY)
            self._tried[index].add(id(state))
            n = sum(len(p) for p in pieces)
            reason = f"chunk {index} of {w.name} failed verification ({n} bytes, expected " \
                     f"{chunk_span(index, w.size, w.chunk_size)[1]})"
            log.warning("bad chunk from peer; dropped", package=w.name, chunk=index,
                        peer=src.site, transport=src.kind)
            self.on_bad_source(src.site, reason, index)
            _give_back([pieces])  # checked and refused: not written, not kept
            return
        self.progress.done += 1
        self.progress.bytes += sum(len(p) for p in pieces)
        self._written.add(index)
        if index - self._hashed_upto < AHEAD_CHUNKS:
            self._ahead[index] = pieces  # hashed from memory, not re-read (given back then)
        else:
            _give_back([pieces])  # written; the hash re-reads it from the page cache
        self._kick_hashes(self._fd)


def _give_back(blocks: list[list | None]) -> None:
    """Chunk buffers nothing refers to any more go back to the run client's pool (``runclient.
    BufferPool``; bytes from another client are not the pool's and are left alone). Called on
    the event loop's thread, after the verify/write or hash job that used them has returned."""
    for pieces in blocks:
        for piece in pieces or ():
            BUFFERS.give(piece)
