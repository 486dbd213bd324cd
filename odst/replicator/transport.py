"""Chunk transports: how one site fetches 1 MiB chunks of a content from another.

Two implementations of one ``ChunkSource`` protocol (contract-tested together with the
tests' in-memory one, tests/system/test_contracts.py):
HTTP from the peer's gateway (fast path), and NATS request/reply on the peer's
``odst.<site>.chunk`` subject through the leaf tree (for sites that only dial
out). Both sign every request with the site key. The serving side of both is
``ChunkServer.serve``: one parser of the chunk target, one set of answers.

Targets (what is signed): ``/peer/v1/chunks/<blake3>/<index>`` names one chunk (every
version serves it); ``/peer/v1/chunks/<blake3>/<first>-<last>`` names a run of chunks,
served over HTTP as one response of their bytes back to back (``RunSource.fetch_run``).
A site that does not serve runs (an older version, or ``peer_run_chunks = 1``) answers a
run 404, and the puller asks that source one chunk at a time.
``/peer/v1/chunks/batch/<blake3>,<blake3>,…`` names several small contents (at most
``BATCH_MAX``, each at most ``BATCH_ITEM_MAX`` bytes: one chunk each), served over HTTP as one
response of their bytes back to back, each file sent zero-copy (``RunSource.fetch_batch``):
a catch-up of thousands of small packages makes one signed request per batch, not per
package. Every chunk is still checked against its SHA1 by the receiver. A site that does not
serve batches (an older version, or ``peer_run_chunks = 1``) answers 404, and the contents are
pulled one by one.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

import aiohttp
import structlog

from odst.bus import peer_request
from odst.bus.service import NatsService
from odst.gateway.protocol import CUT, ZEROCOPY
from odst.events.signing import SiteKey
from odst.naming import ascii_int, sent_path
from odst.projections import views
from odst.projections.apply import trusted_key
from odst.store.files import PackageStore, content_tag
from odst.replicator.bandwidth import Bandwidth, LinkThrottled
from odst.replicator.runclient import RunBroken, RunClient, RunUnexpected
from odst.store.hashing import CHUNK_SIZE, chunk_span
from odst.peering.requests import (NonceStoreUnavailable, PeerRequestRefused, RequestVerifier, SharedNonces,
                                   sign_request)

log = structlog.get_logger("odst.transport")

CHUNK_METHOD = "CHUNK"


class ChunkUnavailable(Exception):
    """The source does not have this chunk (or refused to serve it)."""


class TransportFailed(Exception):
    """The source could not be reached or did not answer in time."""


class SourceThrottled(TransportFailed):
    """The source holds this chunk back for now (its link is paused or at its limit): ask
    again after ``retry_after`` seconds; the source is not at fault."""

    def __init__(self, detail: str, retry_after: float):
        super().__init__(detail)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float:
    try:
        seconds = float(value or 1)
    except ValueError:
        return 1.0
    return min(max(seconds, 0.1), 30.0) if math.isfinite(seconds) else 1.0  # "nan" sleeps for ever


async def _read_at_most(r: aiohttp.ClientResponse, limit: int) -> bytes:
    """A peer's answer body, at most ``limit`` bytes: whatever a peer sends, this site holds no
    more of it than a chunk (or an error's first words)."""
    body = bytearray()
    while len(body) < limit:
        piece = await r.content.read(limit - len(body))
        if not piece:
            break
        body += piece
    return bytes(body)


def chunk_subject(site: str) -> str:
    return f"odst.{site}.chunk"


def chunk_target(blake3: str, index: int) -> str:
    return f"/peer/v1/chunks/{blake3}/{index}"


def run_target(blake3: str, first: int, last: int) -> str:
    """Chunks ``first`` to ``last`` (inclusive) of a content; one chunk is ``chunk_target``."""
    return chunk_target(blake3, first) if first == last else f"/peer/v1/chunks/{blake3}/{first}-{last}"


BATCH_PREFIX = "/peer/v1/chunks/batch/"
BATCH_MAX = 32  # contents one batch request may name
BATCH_ITEM_MAX = 1 << 20  # the largest content a batch carries (a small package: one chunk)


BATCH_REFUSED = "batch_unavailable"  # a 404's error: not this batch (one by one); any other 404: no batches


class BatchUnsupported(ChunkUnavailable):
    """This site serves no batches (``peer_run_chunks = 1``), or the target is not one."""


def _error_of(body) -> str:
    try:
        return str(json.loads(bytes(body)).get("error", ""))
    except (ValueError, AttributeError):
        return ""


def batch_target(blake3s: list[str]) -> str:
    """Several whole small contents, back to back, for one signed request."""
    return BATCH_PREFIX + ",".join(blake3s)


def parse_batch(target: str) -> list[str] | None:
    """The contents a batch target names, or None when it is not one."""
    if not target.startswith(BATCH_PREFIX):
        return None
    items = target[len(BATCH_PREFIX):].split(",")
    if not all(b and b.isascii() and b.isalnum() for b in items):
        return None
    return items


def parse_target(target: str) -> tuple[str, int, int] | None:
    """(blake3, first, last) of a chunk or run target, or None when it is not one."""
    parts = target.split("/")
    if len(parts) != 6 or parts[:4] != ["", "peer", "v1", "chunks"] or not parts[4]:
        return None
    first_text, dash, last_text = parts[5].partition("-")
    first = ascii_int(first_text)
    last = ascii_int(last_text) if dash else first
    if first is None or last is None or last < first:
        return None
    return parts[4], first, last


class ChunkSource(Protocol):
    site: str
    kind: str

    async def fetch(self, blake3: str, index: int) -> bytes: ...


class RunsUnsupported(ChunkUnavailable):
    """The source answers runs 404: it serves one chunk per request (or not this content)."""


class RunSource(ChunkSource, Protocol):
    """A source that can also stream a run of chunks for one signed request."""

    def fetch_run(self, blake3: str, first: int, lengths: list[int]) -> AsyncIterator[list[bytes]]:
        """Chunk ``first``, ``first + 1``, ... (``lengths`` from the manifest), each as its
        pieces, as they arrive. Before the first: the errors of ``fetch``, or RunsUnsupported;
        after it, a broken stream is TransportFailed (the chunks already given are good to keep
        once they pass their check)."""
        ...


class HttpChunkSource:
    """GET /peer/v1/chunks/<blake3>/<index> (``fetch``) or /<first>-<last> (``fetch_run``)
    from the peer's gateway. One chunk goes by aiohttp (twice httpx's throughput for 1 MiB
    bodies, measured); a run by the run client of an ``http_session`` (each chunk received into
    its own buffer: half the receiver's CPU of aiohttp's copies), or by aiohttp (the chunks as
    the pieces the socket gave, never joined) for another session or a peer whose answer the
    run client does not read."""

    kind = "http"

    def __init__(self, site: str, base_url: str, key: SiteKey, session: aiohttp.ClientSession):
        self.site, self.base_url, self.key, self.session = site, base_url.rstrip("/"), key, session
        self.direct = True  # runs by the session's run client, while the peer answers plainly

    async def fetch(self, blake3: str, index: int) -> bytes:
        target = chunk_target(blake3, index)
        try:
            async with self.session.get(self.base_url + target, allow_redirects=False,
                                        headers=sign_request(self.key, "GET", target)) as r:
                body = await _read_at_most(r, CHUNK_SIZE + 1)  # (over a chunk: not one)
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TransportFailed(f"{self.site} over HTTP: {type(exc).__name__}: {exc}") from None
        if status == 200:
            return body
        detail = body[:200].decode("utf-8", "replace")
        if status == 503 and "retry-after" in (k.lower() for k in r.headers):
            raise SourceThrottled(f"{self.site} over HTTP: {detail}", _retry_after(r.headers.get("Retry-After")))
        if status in (403, 404):
            raise ChunkUnavailable(f"{self.site} over HTTP: {status} {detail}")
        raise TransportFailed(f"{self.site} over HTTP: {status} {detail}")

    async def fetch_run(self, blake3: str, first: int, lengths: list[int]) -> AsyncIterator[list[bytes]]:
        runs: RunClient | None = getattr(self.session.connector, "runs", None)
        if runs is not None and self.direct:
            given = 0
            stream = self._fetch_run_direct(runs, blake3, first, lengths)
            try:
                async for pieces in stream:
                    given += 1
                    yield pieces
                return
            except RunUnexpected as exc:
                if given:  # never: RunUnexpected comes before the first chunk only
                    raise TransportFailed(f"{self.site} over HTTP: {exc}") from None
                self.direct = False  # this peer is answered by the general client from now on
                log.info("run answer not plain HTTP/1.1; using the general client", peer=self.site,
                         reason=str(exc))
            finally:
                await stream.aclose()
        async for pieces in self._fetch_run_aiohttp(blake3, first, lengths):
            yield pieces

    def _refusal(self, answer, body, what: str, *, unsupported: bool) -> Exception:
        """The error for a run's or batch's answer other than 200 (``body``: its first bytes);
        ``unsupported``: a 404 says the peer serves no such requests (ask one by one)."""
        detail = bytes(body[:200]).decode("utf-8", "replace")
        if answer.status == 503 and "retry-after" in answer.headers:
            return SourceThrottled(f"{self.site} over HTTP: {detail}", _retry_after(answer.headers["retry-after"]))
        if answer.status == 404 and unsupported:
            return RunsUnsupported(f"{self.site} over HTTP: {what} answered 404 {detail}")
        if answer.status in (403, 404):
            return ChunkUnavailable(f"{self.site} over HTTP: {answer.status} {detail}")
        return TransportFailed(f"{self.site} over HTTP: {answer.status} {detail}")

    async def _fetch_run_direct(self, runs: RunClient, blake3: str, first: int,
                                lengths: list[int]) -> AsyncIterator[list[bytearray]]:
        """The run by the run client (``runclient``): each chunk read from the socket into its
        own buffer, handed over as one piece."""
        target = run_target(blake3, first, first + len(lengths) - 1)
        given = 0
        stream = runs.get_run(self.base_url + target, target, sign_request(self.key, "GET", target), lengths)
        try:
            answer = await anext(stream)
            if answer.status != 200:
                body = await anext(stream, b"")
                raise self._refusal(answer, body, "run", unsupported=len(lengths) > 1)
            async for buf in stream:
                given += 1
                yield [buf]
        except RunBroken as exc:
            raise TransportFailed(f"{self.site} over HTTP: run cut after {given} of {len(lengths)} chunks: "
                                  f"{exc}") from None
        finally:
            await stream.aclose()
        if given < len(lengths):  # the answer held fewer bytes than the chunks asked for
            raise TransportFailed(f"{self.site} over HTTP: run cut after {given} of {len(lengths)} chunks")

    async def fetch_batch(self, blake3s: list[str], sizes: list[int]) -> AsyncIterator[bytearray]:
        """Whole small contents (``sizes`` from their manifests) for one signed request, each as
        one buffer, as they arrive. Before the first: the errors of ``fetch``, or RunsUnsupported
        (the peer serves no batches: pull them one by one); after it, a broken stream is
        TransportFailed (the contents already given are good to keep once they pass their
        checks). By the run client only: RunsUnsupported without it, or for an answer it does
        not read."""
        runs: RunClient | None = getattr(self.session.connector, "runs", None)
        if runs is None:
            raise RunsUnsupported(f"{self.site} over HTTP: batches need the run client")
        target = batch_target(blake3s)
        given = 0
        stream = runs.get_run(self.base_url + target, target, sign_request(self.key, "GET", target), sizes)
        try:
            answer = await anext(stream)
            if answer.status != 200:
                body = await anext(stream, b"")
                # a 404 naming this batch only: pull its contents one by one; any other: an older peer
                raise self._refusal(answer, body, "batch", unsupported=_error_of(body) != BATCH_REFUSED)
            async for buf in stream:
                given += 1
                yield buf
        except RunUnexpected as exc:
            raise TransportFailed(f"{self.site} over HTTP: batch answer not read: {exc}") from None
        except RunBroken as exc:
            raise TransportFailed(f"{self.site} over HTTP: batch cut after {given} of {len(sizes)} contents: "
                                  f"{exc}") from None
        finally:
            await stream.aclose()
        if given < len(sizes):
            raise TransportFailed(f"{self.site} over HTTP: batch cut after {given} of {len(sizes)} contents")

    async def _fetch_run_aiohttp(self, blake3: str, first: int, lengths: list[int]) -> AsyncIterator[list[bytes]]:
        target = run_target(blake3, first, first + len(lengths) - 1)
        given = 0
        try:
            async with self.session.get(self.base_url + target, timeout=RUN_TIMEOUT, allow_redirects=False,
                                        headers=sign_request(self.key, "GET", target)) as r:
                if r.status != 200:
                    detail = (await _read_at_most(r, 200)).decode("utf-8", "replace")
                    if r.status == 503 and "Retry-After" in r.headers:
                        raise SourceThrottled(f"{self.site} over HTTP: {detail}",
                                              _retry_after(r.headers.get("Retry-After")))
                    if r.status == 404 and len(lengths) > 1:
                        raise RunsUnsupported(f"{self.site} over HTTP: run answered 404 {detail}")
                    if r.status in (403, 404):
                        raise ChunkUnavailable(f"{self.site} over HTTP: {r.status} {detail}")
                    raise TransportFailed(f"{self.site} over HTTP: {r.status} {detail}")
                stream = r.content
                carry = b""
                for length in lengths:
                    pieces: list[bytes] = []
                    need = length
                    while need:
                        # one piece as the socket gave it: readany joins every piece waiting
                        # (a copy of most of the body, a tenth of the receiver's CPU)
                        piece = carry or (await stream.readchunk())[0]
                        carry = b""
                        if not piece:
                            raise TransportFailed(f"{self.site} over HTTP: run cut after {given} of "
                                                  f"{len(lengths)} chunks")
                        if len(piece) > need:  # the next chunk begins inside this piece
                            piece, carry = memoryview(piece)[:need], memoryview(piece)[need:]
                        pieces.append(piece)
                        need -= len(piece)
                    given += 1
                    yield pieces
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TransportFailed(f"{self.site} over HTTP: run cut after {given} of {len(lengths)} chunks: "
                                  f"{type(exc).__name__}: {exc}") from None


RUN_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5, sock_read=30)  # a run: no bound on the whole


class PeerConnector(aiohttp.TCPConnector):
    """aiohttp's connector, with the run client (``runclient``) beside it: the runs of chunks go
    by that one, everything else by aiohttp; closing the session closes both."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs = RunClient(connect_timeout=RUN_TIMEOUT.connect, read_timeout=RUN_TIMEOUT.sock_read)

    async def close(self, **kwargs) -> None:
        self.runs.close()
        await super().close(**kwargs)


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=PeerConnector(limit=64, limit_per_host=16),
        timeout=aiohttp.ClientTimeout(total=60, connect=5),
        auto_decompress=False)


class NatsChunkSource:
    kind = "nats"

    def __init__(self, site: str, nc, key: SiteKey, timeout: float = 15.0):
        self.site, self.nc, self.key, self.timeout = site, nc, key, timeout

    async def fetch(self, blake3: str, index: int) -> bytes:
        target = chunk_target(blake3, index)
        try:
            msg = await peer_request(self.nc, self.key.site_id, chunk_subject(self.site), timeout=self.timeout,
                                     headers=sign_request(self.key, CHUNK_METHOD, target) | {"target": target})
        except Exception as exc:  # nats timeout / no responders / connection closed
            raise TransportFailed(f"{self.site} over NATS: {type(exc).__name__}") from None
        status = (msg.headers or {}).get("odst-status", "")
        if status == "200":
            return msg.data
        detail = (msg.headers or {}).get("odst-error", "")
        if status == "503":
            raise SourceThrottled(f"{self.site} over NATS: {detail}", _retry_after(msg.headers.get("retry-after")))
        if status in ("403", "404"):
            raise ChunkUnavailable(f"{self.site} over NATS: {status} {detail}")
        raise TransportFailed(f"{self.site} over NATS: {status or 'no status'} {detail}")


@dataclass
class ChunkAnswer:
    """What ``ChunkServer.serve`` answers, whichever transport asked: a status, and for a 200
    the content file (``fd``, closed by ``close()``) with the spans of the chunks asked for. The
    first chunk's send limit is paid before answering; ``body`` is its bytes when they were read
    (``read``), and ``rest`` yields the rest of a run: their bytes, or (not ``read``: the
    transport sends them from ``fd`` itself, zero-copy) their spans, each once the send limit
    lets it go. ``rest`` may stop early (RunCut), and the transport then cuts the response short."""

    status: int
    error: str = ""  # machine-readable: peer_refused, chunk_unavailable, link_throttled, nonce_store_unavailable, internal
    detail: str = ""
    retry_after: float = 0.0
    body: bytes = b""
    length: int = 0  # bytes of the whole answer (every chunk)
    first: tuple[int, int] = (0, 0)  # (offset, length) of the first chunk in ``fd``
    rest: AsyncIterator | None = None
    fd: int = -1  # the content file while the answer is sent: ``close()`` when done

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class BatchAnswer:
    """What ``ChunkServer.serve_batch`` answers: a status, and for a 200 the files (fd, size,
    blake3; closed by ``close()``) and ``items``, which yields each content as it may go."""

    status: int
    error: str = ""
    detail: str = ""
    retry_after: float = 0.0
    length: int = 0
    files: list = field(default_factory=list)
    items: AsyncIterator | None = None

    def close(self) -> None:
        for fd, _, _ in self.files:
            os.close(fd)
        self.files = []


class RunCut(Exception):
    """A run stops before its last chunk (the send limit fell too far behind, or the file
    changed): the transport cuts the response; the puller keeps what came and asks again."""


class ChunkServer(NatsService):
    """Serves chunks of the contents this site holds, to trusted peers only: ``serve`` is the
    one entry of both transports (``_on_request`` over NATS, ``http`` for the gateway's
    /peer/v1/chunks mount)."""

    queue = "chunk"

    def __init__(self, *, site_id: str, key: SiteKey, nc, reader: sqlite3.Connection, store: PackageStore,
                 bandwidth: Bandwidth | None = None, run_chunks: int = 16, nonces: SharedNonces | None = None):
        super().__init__(nc, key)
        self.site_id, self.reader, self.store = site_id, reader, store
        self.bandwidth = bandwidth  # send limits per peer (odst.replicator.bandwidth)
        self.run_chunks = max(1, run_chunks)  # the longest run one request may ask for (1: no runs)
        self.subject = chunk_subject(site_id)
        self.verifier = RequestVerifier(self._key_of, shared=nonces)  # nonces: every process's
        self.served: Counter[str] = Counter()  # chunks served, per requesting peer

    def _key_of(self, site_id: str) -> bytes | None:
        if site_id == self.site_id:
            return None
        removed = self.reader.execute("SELECT 1 FROM removals WHERE site=?", (site_id,)).fetchone()
        if removed:
            return None
        return trusted_key(self.reader, {}, site_id)

    def locate(self, blake3: str, index: int) -> tuple[str, int, int]:
        """(path, offset, length) of a chunk of a content held here, or ChunkUnavailable."""
        path, size, spans = self._locate_run(blake3, index, index)
        return path, *spans[0]

    def _locate_run(self, blake3: str, first: int, last: int) -> tuple[str, int, list[tuple[int, int]]]:
        row = views.local_content(self.reader, blake3, self.site_id)
        if row is None:
            raise ChunkUnavailable("content not held here")
        spans = [chunk_span(i, row["size"], row["chunk_size"]) for i in range(first, last + 1)]
        if not spans[-1][1]:
            raise ChunkUnavailable("chunk index out of range")
        return str(self.store.path(row["name"])), row["size"], spans

    def _open_content(self, path: str, blake3: str, size: int) -> int:
        """The content file, if the name still holds that content. A replacement renames a new
        file over the name before the read model knows (and the read model keeps naming the old
        content for a while after): the label on the inode opened (``store.files.tag``) says which
        content it is, and every chunk sent comes from that one inode."""
        fd = _open(path)
        try:
            held = content_tag(fd)
            if (held is not None and held != blake3) or os.fstat(fd).st_size != size:
                raise ChunkUnavailable("content no longer held under its name here (replaced)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def read(self, blake3: str, index: int, peer: str = "") -> bytes:
        """The chunk's bytes; for a ``peer``, once its link's send limit lets them go
        (LinkThrottled: not now)."""
        path, size, spans = self._locate_run(blake3, index, index)
        fd = self._open_content(path, blake3, size)
        try:
            await self._pay(peer, spans[0][1], blake3)
            return await self._pread(fd, *spans[0])
        finally:
            os.close(fd)

    async def _pay(self, peer: str, length: int, blake3: str) -> None:
        if peer and self.bandwidth is not None:
            await self.bandwidth.send(peer, length, blake3=blake3)

    @staticmethod
    async def _pread(fd: int, offset: int, length: int) -> bytes:
        data = await asyncio.get_running_loop().run_in_executor(None, os.pread, fd, length, offset)
        if len(data) != length:
            raise ChunkUnavailable("content file shorter than its manifest")
        return data

    async def authorise(self, method: str, target: str, headers: dict[str, str]) -> str:
        return await self.verifier.check(method, target, {k.lower(): v for k, v in headers.items()})

    async def serve(self, method: str, target: str, headers: dict[str, str], *, runs: bool,
                    read: bool = True) -> ChunkAnswer:
        """Answer a signed chunk request: one chunk, or (``runs``: a transport that can stream)
        a run of at most ``run_chunks``. The file is opened and the first chunk's send limit paid
        before answering (and with ``read`` its bytes read), so a refusal, a missing file or the
        send limit is a status, never a cut stream."""
        try:
            peer = await self.authorise(method, target, headers)
            parsed = parse_target(target)
            if parsed is None:
                raise ChunkUnavailable("malformed chunk target")
            blake3, first, last = parsed
            if last > first and not runs:
                raise ChunkUnavailable("runs of chunks are served over HTTP only")
            if last - first + 1 > self.run_chunks:
                raise ChunkUnavailable(f"a run is at most {self.run_chunks} chunks here")
            path, size, spans = self._locate_run(blake3, first, last)
            fd = self._open_content(path, blake3, size)
            answer = ChunkAnswer(200, length=sum(n for _, n in spans), first=spans[0], fd=fd)
            try:
                await self._pay(peer, spans[0][1], blake3)
                if read:
                    answer.body = await self._pread(fd, *spans[0])
            except BaseException:
                answer.close()
                raise
            self.served[peer] += 1
            if len(spans) > 1:
                answer.rest = self._rest(fd, spans[1:], peer, blake3, read)
            return answer
        except PeerRequestRefused as exc:
            log.warning("peer chunk request refused", reason=str(exc))
            return ChunkAnswer(403, "peer_refused", str(exc))
        except NonceStoreUnavailable as exc:  # cannot tell a replay: not now
            log.warning("peer chunk request not checked", reason=str(exc))
            return ChunkAnswer(503, "nonce_store_unavailable", str(exc), retry_after=1.0)
        except ChunkUnavailable as exc:
            return ChunkAnswer(404, "chunk_unavailable", str(exc))
        except LinkThrottled as exc:  # the link's send limit or timetable: ask again later
            return ChunkAnswer(503, "link_throttled", str(exc), retry_after=exc.retry_after)

    async def serve_batch(self, method: str, target: str, headers: dict[str, str], *,
                          read: bool = True) -> "BatchAnswer":
        """Answer a signed batch request: every content it names held here and small, or 404
        (the asker pulls them one by one). The files are opened and the first content's send
        limit paid before answering, as ``serve`` does for a run."""
        try:
            peer = await self.authorise(method, target, headers)
            blake3s = parse_batch(target)
            if blake3s is None:
                raise BatchUnsupported("malformed batch target")
            if self.run_chunks == 1:
                raise BatchUnsupported("batches are not served here (peer_run_chunks = 1)")
            if len(blake3s) > BATCH_MAX:
                raise ChunkUnavailable(f"a batch is at most {BATCH_MAX} contents here")
            answer = BatchAnswer(200)
            try:
                for blake3 in blake3s:
                    row = views.local_content(self.reader, blake3, self.site_id)
                    if row is None:
                        raise ChunkUnavailable(f"content {blake3[:16]} not held here")
                    if not 0 < row["size"] <= BATCH_ITEM_MAX:
                        raise ChunkUnavailable(f"content {blake3[:16]} is not for a batch ({row['size']} bytes)")
                    fd = self._open_content(str(self.store.path(row["name"])), blake3, row["size"])
                    answer.files.append((fd, row["size"], blake3))
                answer.length = sum(size for _, size, _ in answer.files)
                await self._pay(peer, answer.files[0][1], blake3s[0])
                first = await self._pread(answer.files[0][0], 0, answer.files[0][1]) if read else None
            except BaseException:
                answer.close()
                raise
            self.served[peer] += len(blake3s)
            answer.items = self._batch_items(answer.files, first, peer)
            return answer
        except PeerRequestRefused as exc:
            log.warning("peer batch request refused", reason=str(exc))
            return BatchAnswer(403, "peer_refused", str(exc))
        except NonceStoreUnavailable as exc:
            return BatchAnswer(503, "nonce_store_unavailable", str(exc), retry_after=1.0)
        except BatchUnsupported as exc:
            return BatchAnswer(404, "chunk_unavailable", str(exc))  # as older versions answer
        except ChunkUnavailable as exc:  # this batch only: the asker pulls its contents one by one
            return BatchAnswer(404, BATCH_REFUSED, str(exc))
        except LinkThrottled as exc:
            return BatchAnswer(503, "link_throttled", str(exc), retry_after=exc.retry_after)

    async def _batch_items(self, files: list[tuple[int, int, str]], first: bytes | None,
                           peer: str) -> AsyncIterator:
        """Each content of a batch: its bytes (``first`` already read), or (fd, size) for the
        transport to send zero-copy; the send limit paid for each after the first (RunCut)."""
        for i, (fd, size, blake3) in enumerate(files):
            try:
                if i:
                    await self._pay(peer, size, blake3)
                item = (first if i == 0 else await self._pread(fd, 0, size)) if first is not None else (fd, size)
            except (LinkThrottled, ChunkUnavailable) as exc:
                log.info("chunk batch cut short", peer=peer, left=len(files) - i, reason=str(exc))
                raise RunCut(str(exc)) from None
            yield item

    async def _http_batch(self, scope, send, headers: dict[str, str], extensions: dict) -> None:
        """A batch over HTTP: the contents back to back under one Content-Length, each file sent
        zero-copy where the server offers it; one cut short leaves the response short."""
        zerocopy = ZEROCOPY in extensions
        answer = await self.serve_batch("GET", sent_path(scope), headers, read=not zerocopy)
        if answer.status != 200:
            return await _http_refusal(send, answer)
        try:
            start = _octets_start(answer.length)
            await send({**start, ZEROCOPY: True} if zerocopy else start)
            async for item in answer.items:
                if zerocopy:
                    await _send_span(send, item[0], 0, item[1])
                else:
                    await send({"type": "http.response.body", "body": item, "more_body": True})
        except RunCut:
            if CUT in extensions:
                await send({"type": CUT})
            return
        finally:
            await answer.items.aclose()
            answer.close()
        await send({"type": "http.response.body", "body": b""})

    def _open_link(self, peer: str, blake3: str) -> bool:
        """No send limit holds the chunks to ``peer`` back now (none set, a local peer, an open
        window, an urgent content): paying per chunk would only count them."""
        return not peer or self.bandwidth is None or self.bandwidth.send_unpaced(peer, blake3)

    async def _rest(self, fd: int, spans: list[tuple[int, int]], peer: str, blake3: str,
                    read: bool) -> AsyncIterator:
        if not read and self._open_link(peer, blake3):
            # sent from the file by the transport, nothing to pace: the rest of the run is one
            # span (its chunks are contiguous), one pass through the server's sendfile path
            # instead of one a chunk (per-chunk Python was most of the sending site's CPU)
            total = sum(n for _, n in spans)
            try:
                await self._pay(peer, total, blake3)  # counts the bytes sent (the link's meter)
            except LinkThrottled as exc:  # a window closed since: the asker comes again
                log.info("chunk run cut short", peer=peer, blake3=blake3, left=len(spans), reason=str(exc))
                raise RunCut(str(exc)) from None
            yield spans[0][0], total
            self.served[peer] += len(spans)
            return
        for i, (offset, length) in enumerate(spans):
            try:
                await self._pay(peer, length, blake3)
                item = await self._pread(fd, offset, length) if read else (offset, length)
            except (LinkThrottled, ChunkUnavailable) as exc:
                log.info("chunk run cut short", peer=peer, blake3=blake3, left=len(spans) - i, reason=str(exc))
                raise RunCut(str(exc)) from None
            yield item
            self.served[peer] += 1

    async def http(self, scope, receive, send) -> None:
        """Raw ASGI (the gateway mounts it at /peer/v1/chunks): GET one chunk or a run, signed
        by a registered peer. Kept off the framework's response path: it is the replication
        hot path. A run goes out chunk by chunk under one Content-Length, each chunk sent from
        the file by the server (the ASGI zero-copy extension, ``gateway.protocol``: no byte
        passes through Python) or else read and sent. One cut short (RunCut) leaves the response
        short: the server closes the connection (``http.response.cut`` where offered)."""
        if scope["method"] != "GET":
            return await _http_reply(send, 405, b'{"error":"method_not_allowed","detail":"GET only"}')
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        extensions = scope.get("extensions") or {}
        if sent_path(scope).startswith(BATCH_PREFIX):
            return await self._http_batch(scope, send, headers, extensions)
        zerocopy = ZEROCOPY in extensions
        answer = await self.serve("GET", sent_path(scope), headers, runs=True, read=not zerocopy)  # the path as signed
        if answer.status != 200:
            return await _http_refusal(send, answer)
        try:
            start = _octets_start(answer.length)
            if zerocopy:
                await send({**start, ZEROCOPY: True})  # the head leaves with the first chunk
                await _send_span(send, answer.fd, *answer.first)
                if answer.rest is not None:
                    async for offset, length in answer.rest:
                        await _send_span(send, answer.fd, offset, length)
            elif answer.rest is None:
                return await _http_reply(send, 200, answer.body)
            else:
                await send(start)
                await send({"type": "http.response.body", "body": answer.body, "more_body": True})
                async for data in answer.rest:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
        except RunCut:
            if CUT in extensions:  # ended on purpose: no "returned without completing response"
                await send({"type": CUT})
            return
        finally:
            if answer.rest is not None:
                await answer.rest.aclose()
            answer.close()
        await send({"type": "http.response.body", "body": b""})

    async def _on_request(self, msg) -> None:
        headers = {k.lower(): v for k, v in (msg.headers or {}).items()}
        try:
            answer = await self.serve(CHUNK_METHOD, headers.get("target", ""), headers, runs=False)
            if answer.status == 200:
                await self.nc.publish(msg.reply, answer.body, headers={"odst-status": "200"})
                return
            extra = {"retry-after": f"{answer.retry_after:.1f}"} if answer.status == 503 else {}
            await self.nc.publish(msg.reply, b"", headers={"odst-status": str(answer.status),
                                                           "odst-error": answer.detail, **extra})
        except Exception as exc:  # never let one request kill the subscription
            log.exception("chunk request failed")
            await self.nc.publish(msg.reply, b"", headers={"odst-status": "500",
                                                           "odst-error": type(exc).__name__})


async def _send_span(send, fd: int, offset: int, length: int) -> None:
    await send({"type": ZEROCOPY, "file": fd, "offset": offset, "count": length, "more_body": True})


async def _http_refusal(send, answer) -> None:
    """A chunk, run or batch answer other than 200, as JSON (a 503 says when to ask again)."""
    extra = [(b"retry-after", f"{max(1, round(answer.retry_after))}".encode())] if answer.status == 503 else []
    body = json.dumps({"error": answer.error, "detail": answer.detail}).encode()
    await _http_reply(send, answer.status, body, b"application/json", extra)


def _octets_start(length: int) -> dict:
    return {"type": "http.response.start", "status": 200,
            "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(length).encode())]}


async def _http_reply(send, status: int, body: bytes, ctype: bytes = b"application/octet-stream",
                      extra: list[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode()), *extra]})
    await send({"type": "http.response.body", "body": body})


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkUnavailable("content file missing") from None
