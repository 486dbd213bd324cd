"""The puller: one content from many sources, as a documented pipeline.

    pick source (least busy, not failing) -> fetch chunk -> verify length + SHA1 (hashing.chunk_ok)
    -> pwrite into tmp/<blake3>.repl -> ... -> fsync -> whole-file SHA1 + blake3 (hashing.WholeHash)
    -> (caller) atomic rename into packages/ -> PackageAvailable

A chunk that fails its SHA1 is dropped, the source is reported and penalised,
and the chunk is fetched again from another source. After a crash the temp file
is re-verified chunk by chunk and only missing or bad chunks are fetched again.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from odst.replicator.transport import ChunkSource, ChunkUnavailable, SourceThrottled, TransportFailed
from odst.store.hashing import WholeHash, chunk_count, chunk_ok, chunk_span

log = structlog.get_logger("odst.puller")

BAD_CHUNK_PENALTY = 1000.0
FAILURE_PENALTY = 100.0
PENALTY_HALF_LIFE_S = 30.0
MAX_ROUNDS = 4  # times every source may fail one chunk before the transfer gives up
THROTTLED_RETRY_MAX_S = 2.0  # a source holding a chunk back is asked again this soon at the latest
AHEAD_CHUNKS = 32  # chunks kept in memory ahead of the whole-file hash (bounds memory)


class TransferFailed(Exception):
    """The content could not be fetched and verified from any source (for now)."""


@dataclass(frozen=True)
class Want:
    name: str
    blake3: str
    size: int
    sha1: str
    sha512: str
    chunk_size: int
    chunks: tuple[str, ...]
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

    def cost(self) -> float:
        age = time.monotonic() - self.penalty_at
        return self.base + self.in_flight + self.penalty * 0.5 ** (age / PENALTY_HALF_LIFE_S)

    def punish(self, amount: float) -> None:
        self.penalty = self.penalty * 0.5 ** ((time.monotonic() - self.penalty_at) / PENALTY_HALF_LIFE_S) + amount
        self.penalty_at = time.monotonic()


def temp_path(tmp_dir: Path, blake3: str) -> Path:
    return tmp_dir / f"{blake3}.repl"


class Puller:
    def __init__(self, want: Want, sources: list[tuple[ChunkSource, float]], tmp_dir: Path, *,
                 streams: int = 8, progress: Progress | None = None,
                 on_bad_source: Callable[[str, str, int], None] | None = None,
                 throttle: Callable[[str, int], Awaitable[None]] | None = None):
        self.want = want
        self.states = [_SourceState(s, base) for s, base in sources]
        self.path = temp_path(tmp_dir, want.blake3)
        self.streams = max(1, streams)
        self.progress = progress or Progress(want.name, want.blake3, len(want.chunks))
        self.on_bad_source = on_bad_source or (lambda site, reason, index: None)
        self.throttle = throttle  # (peer, bytes): waits for the link's receive limit (bandwidth.py)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="odst-pull-write")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="odst-pull-hash")

    async def run(self) -> Path:
        w = self.want
        if chunk_count(w.size, w.chunk_size) != len(w.chunks):
            raise TransferFailed("manifest is inconsistent: chunk count does not match size")
        if not self.states:
            raise TransferFailed("no source has this content")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            existing = os.fstat(fd).st_size
            if existing > w.size:
                os.ftruncate(fd, 0)
                existing = 0
            os.ftruncate(fd, w.size)
            done = await asyncio.to_thread(self._verified_chunks, fd) if existing else set()
            self.progress.done = len(done)
            self.progress.status = "downloading"
            self.progress.sources = sorted({s.source.site for s in self.states})
            if done:
                log.info("resuming transfer", package=w.name, verified_chunks=len(done), total=len(w.chunks))
            self._written = set(done)
            self._ahead: dict[int, bytes] = {}
            self._hashed_upto = 0
            self._hash_task: asyncio.Task | None = None
            self._whole = WholeHash()
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(len(w.chunks)):
                if i not in done:
                    queue.put_nowait(i)
            workers = [asyncio.create_task(self._worker(fd, queue))
                       for _ in range(min(self.streams, queue.qsize()))]
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
            sha1, b3 = self._whole.sha1, self._whole.blake3
        finally:
            os.close(fd)
            self._writer.shutdown(wait=False)
            self._hasher.shutdown(wait=False)
        if sha1 != w.sha1 or b3 != w.blake3:
            self.path.unlink(missing_ok=True)
            raise TransferFailed(f"whole-file hash mismatch (sha1 {sha1}, blake3 {b3}); discarded")
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
        """Feed the whole-file SHA1 and blake3 as the contiguous written prefix grows.

        Runs beside the transfer on its own thread, from the chunks still in
        memory (kept while they are a few ahead of the hashed prefix) or else
        re-read from the page cache, so only the last chunks are left at the end.
        """
        loop = asyncio.get_running_loop()
        while self._hashed_upto in self._written:
            start = end = self._hashed_upto
            while end in self._written and end - start < 16:
                end += 1
            blocks = [self._ahead.pop(i, None) for i in range(start, end)]
            await loop.run_in_executor(self._hasher, self._hash_range, fd, start, blocks)
            self._hashed_upto = end

    def _kick_hashes(self, fd: int) -> None:
        if self._hash_task is None or self._hash_task.done():
            self._hash_task = asyncio.ensure_future(self._advance_hashes(fd))

    def _hash_range(self, fd: int, start: int, blocks: list[bytes | None]) -> None:
        w = self.want
        for i, data in enumerate(blocks, start):
            if data is None:
                offset, length = chunk_span(i, w.size, w.chunk_size)
                data = os.pread(fd, length, offset)
            self._whole.update(data)

    def _verify_and_write(self, fd: int, index: int, data: bytes, offset: int, length: int) -> bool:
        if not chunk_ok(data, length, self.want.chunks[index]):
            return False
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        return True

    def _pick(self, tried: set[int]) -> _SourceState | None:
        candidates = [s for s in self.states if id(s) not in tried]
        if not candidates:
            return None
        best = min(s.cost() for s in candidates)
        return random.choice([s for s in candidates if s.cost() - best < 0.5])

    async def _worker(self, fd: int, queue: asyncio.Queue) -> None:
        w = self.want
        while True:
            try:
                index = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            offset, length = chunk_span(index, w.size, w.chunk_size)
            tried: set[int] = set()
            rounds = 0
            paid = self.throttle is None  # the link's receive limit is paid once per chunk, not per attempt
            while True:
                state = self._pick(tried)
                if state is None:
                    rounds += 1
                    if rounds >= MAX_ROUNDS:
                        raise TransferFailed(f"chunk {index}: every source failed {MAX_ROUNDS} times")
                    tried.clear()
                    await asyncio.sleep(min(2.0 ** rounds * 0.25, 5.0))  # back off before another round
                    continue
                tried.add(id(state))
                src = state.source
                state.in_flight += 1
                try:
                    if not paid:
                        await self.throttle(src.site, length)
                        paid = True
                    data = await src.fetch(w.blake3, index)
                except SourceThrottled as exc:  # held back by the source's link: not its fault
                    tried.discard(id(state))
                    await asyncio.sleep(min(exc.retry_after, THROTTLED_RETRY_MAX_S))
                    continue
                except (TransportFailed, ChunkUnavailable) as exc:
                    state.punish(FAILURE_PENALTY)
                    log.info("chunk fetch failed; trying another source", package=w.name, chunk=index,
                             peer=src.site, transport=src.kind, error=str(exc))
                    continue
                finally:
                    state.in_flight -= 1
                if not await asyncio.get_running_loop().run_in_executor(
                        self._writer, self._verify_and_write, fd, index, data, offset, length):
                    state.punish(BAD_CHUNK_PENALTY)
                    reason = (f"chunk {index} of {w.name} failed verification "
                              f"({len(data)} bytes, expected {length})")
                    log.warning("bad chunk from peer; dropped", package=w.name, chunk=index,
                                peer=src.site, transport=src.kind)
                    self.on_bad_source(src.site, reason, index)
                    continue
                self.progress.done += 1
                self.progress.bytes += len(data)
                self._written.add(index)
                if index - self._hashed_upto < AHEAD_CHUNKS:
                    self._ahead[index] = data  # hashed from memory, not re-read
                self._kick_hashes(fd)
                break
