"""A small HTTP/1.1 client for chunk runs only: each chunk's bytes go from the socket straight
into that chunk's own buffer (asyncio ``BufferedProtocol``), never through a bytes object per
read and a parser's copy, which cost the receiving side half its CPU with aiohttp.

It speaks exactly what a run needs: one GET with the signed headers, a status line, headers
(Content-Length, Connection), a body of known length; connections are kept per peer and reused.
Anything else in a response head (no Content-Length, a transfer coding, not HTTP/1.x) is
``RunUnexpected``: nothing has been handed over yet, and the caller asks again by its general
client (aiohttp). Everything else is as ``HttpChunkSource.fetch_run`` promises.
"""

from __future__ import annotations

import asyncio
import mmap
import ssl as ssl_module
from collections import defaultdict
from typing import AsyncIterator
from urllib.parse import urlsplit

HEAD_MAX = 16 << 10  # a response head longer than this is not one of ours
ERROR_BODY_MAX = 64 << 10  # an error answer's body is read for its detail up to this
SPILL = 16 << 10  # what the socket may read while no chunk buffer is waiting (then reading pauses)
IDLE_PER_PEER = 16  # idle connections kept per peer
POOL_BUFFERS = 48  # chunk buffers kept for reuse (the puller holds at most ~40 at once: 32 ahead + in flight)


class RunUnexpected(Exception):
    """The answer is not the plain HTTP/1.1 response this client reads: ask by another client."""


class RunBroken(Exception):
    """The connection failed, closed, or went quiet for too long."""


class ChunkBuffer(mmap.mmap):
    """A chunk's buffer from a ``BufferPool``: sockets read into it, hashes and pwrite take it;
    only these go back into the pool. Anonymous memory of its own, so it starts on a page
    boundary: the puller writes it to the temp file with O_DIRECT, which takes only aligned
    buffers (a bytearray's bytes start wherever malloc put them). Its pages are zero until
    first touched, as the kernel hands them out (no memset of a fresh bytearray)."""

    __slots__ = ()

    def __new__(cls, length: int):
        return super().__new__(cls, -1, length)


class BufferPool:
    """Chunk buffers, reused: a fresh ``bytearray(1 MiB)`` is zeroed and its pages faulted in
    on the event loop's thread for every chunk (as much of that thread's time as the socket
    reads, measured with py-spy); a reused one costs neither.

    ``take`` hands out a buffer of the asked length (from the pool when one of the pool's
    size is free); ``give`` takes one back once NOTHING refers to its bytes any more (written,
    hashed, or dropped). A buffer never given back is simply collected. ``hold``/``release``
    count the pulls using the pool: when the last one ends, the free buffers are dropped, so
    an idle site keeps no chunk memory. All on the event loop's thread."""

    def __init__(self, size: int = 1 << 20, keep: int = POOL_BUFFERS):
        self.size, self.keep = size, keep
        self._free: list[bytearray] = []
        self._users = 0
        self.reused = 0  # buffers handed out again (tests)

    def take(self, length: int) -> bytearray:
        if length != self.size:
            return bytearray(length)  # a short last chunk: not worth keeping
        try:
            buf = self._free.pop()
        except IndexError:
            return ChunkBuffer(length)
        self.reused += 1
        return buf

    def give(self, buf) -> None:
        if (type(buf) is ChunkBuffer and len(buf) == self.size and self._users and len(self._free) < self.keep
                and not any(b is buf for b in self._free)):  # given twice would be handed out twice
            self._free.append(buf)

    def hold(self) -> None:
        self._users += 1

    def release(self) -> None:
        self._users = max(0, self._users - 1)
        if not self._users:
            self._free.clear()

    def free(self) -> int:
        return len(self._free)


BUFFERS = BufferPool()  # the process's one pool: every run client and puller shares it


class Answer:
    """A response head: status, headers (lower-case names), and how long the body is."""

    def __init__(self, status: int, headers: dict[str, str], length: int, keep_alive: bool):
        self.status, self.headers, self.length, self.keep_alive = status, headers, length, keep_alive


def parse_head(head: bytes) -> Answer:
    """The status line and headers of a response (without the blank line), or RunUnexpected."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise RunUnexpected(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip() or not name.isascii():
                raise RunUnexpected(f"malformed header line: {line[:80]!r}")
            name = name.lower()
            if name in headers and name == "content-length":
                raise RunUnexpected("more than one Content-Length")
            headers[name] = value.strip()
    except UnicodeError:  # latin-1 decodes every byte: kept for clarity
        raise RunUnexpected("undecodable head") from None
    if "transfer-encoding" in headers:
        raise RunUnexpected(f"Transfer-Encoding {headers['transfer-encoding'][:40]!r}")
    text = headers.get("content-length", "")
    if not (text.isascii() and text.isdigit()):
        raise RunUnexpected(f"Content-Length {text[:40]!r}")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection and (version == "HTTP/1.1" or "keep-alive" in connection)
    return Answer(int(code), headers, int(text), keep_alive)


class _Conn(asyncio.BufferedProtocol):
    """One connection. Bytes go into the buffer ``receive_into`` gave (a chunk's own), or while
    none waits into a small spill, after which reading pauses until a buffer is given."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed: BaseException | None = None
        self._spill = bytearray(SPILL)
        self._spill_view = memoryview(self._spill)
        self._spilled = bytearray()  # bytes read ahead of any buffer (head, the start of a body)
        self._target: memoryview | None = None
        self._filled = 0
        self._done: asyncio.Future | None = None
        self._head_wanted = False
        self._paused = False
        self.received = 0  # bytes read so far (``_Quiet`` looks whether it grows)
        self.awaited_since: float | None = None  # when the run's reader began to await a buffer

    # --- protocol side
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = exc or ConnectionResetError("connection closed by the peer")
        if self._done is not None and not self._done.done():
            self._done.set_exception(RunBroken(str(self.closed) or type(self.closed).__name__))

    def eof_received(self):
        return False  # close the transport: connection_lost follows

    def get_buffer(self, sizehint: int):
        if self._target is not None:
            return self._target[self._filled:]
        return self._spill_view  # a view, never the bytearray: asyncio's TLS reads into buf[offset:]

    def buffer_updated(self, nbytes: int) -> None:
        self.received += nbytes
        if self._target is not None:
            self._filled += nbytes
            if self._filled == len(self._target):
                self._target = None
                if self._done is not None and not self._done.done():
                    self._done.set_result(None)
            return
        self._spilled += self._spill_view[:nbytes]
        if self._head_wanted:
            if b"\r\n\r\n" in self._spilled or len(self._spilled) > HEAD_MAX:
                self._head_wanted = False
                if self._done is not None and not self._done.done():
                    self._done.set_result(None)
        elif not self._paused and self.transport is not None:
            self._paused = True  # nobody asked for these bytes yet: wait for a buffer
            self.transport.pause_reading()

    # --- reader side
    def _wait(self) -> asyncio.Future:
        if self.closed is not None:
            raise RunBroken(str(self.closed) or type(self.closed).__name__)
        self._done = asyncio.get_running_loop().create_future()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return self._done

    async def read_head(self, timeout: float) -> bytes:
        while True:
            end = self._spilled.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._spilled[:end])
                del self._spilled[:end + 4]
                return head
            if len(self._spilled) > HEAD_MAX:
                raise RunUnexpected("response head too long")
            self._head_wanted = True
            async with asyncio.timeout(timeout):
                await self._wait()

    def receive_into(self, buf: bytearray | memoryview) -> asyncio.Future:
        """A future done once ``buf`` is full (the bytes read ahead first, then the socket's)."""
        view = memoryview(buf).cast("B")
        take = min(len(self._spilled), len(view))
        if take:
            view[:take] = self._spilled[:take]
            del self._spilled[:take]
        if take == len(view):  # all here already (even if the peer closed since)
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        fut = self._wait()
        self._target, self._filled = view, take
        return fut

    def leftover(self) -> int:
        return len(self._spilled)

    def waiting(self) -> bool:
        """A reader waits for bytes (a head or a buffer's) that have not come yet."""
        return self._done is not None and not self._done.done()

    def fail(self, exc: BaseException) -> None:
        """The waiting reader gets ``exc`` (the connection is closed by its user then)."""
        if self.waiting():
            self._done.set_exception(exc)

    def close(self) -> None:
        self._target = None
        if self._done is not None:
            if not self._done.done():
                self._done.cancel()  # a buffer nobody waits for any more
            elif not self._done.cancelled():
                self._done.exception()  # seen: the connection is being closed for it
        if self.transport is not None:
            self.transport.close()


TRICKLE_WAITS = 2  # a buffer awaited for this many read timeouts fails its run, bytes or not


class _Quiet:
    """Fails a connection's waiting read once no byte has come for ``timeout`` seconds while
    a reader waited: one timer a run, looking every quarter of ``timeout``, instead of an
    ``asyncio.timeout`` armed and cancelled for every chunk (a tenth of the receiving event
    loop's Python time on a 512 MiB pull, py-spy --gil). While nobody waits (the puller is
    busy; reading is paused) the quiet does not count."""

    def __init__(self, conn: _Conn, timeout: float):
        self.conn, self.timeout = conn, timeout
        self.loop = asyncio.get_running_loop()
        self.seen, self.since = conn.received, self.loop.time()
        self.handle = self.loop.call_later(timeout / 4, self._look)

    def _look(self) -> None:
        now = self.loop.time()
        if self.conn.received != self.seen or not self.conn.waiting():
            self.seen, self.since = self.conn.received, now
        elif now - self.since >= self.timeout:
            self.conn.fail(RunBroken(f"no bytes for {self.timeout:g} s"))
            return
        awaited = self.conn.awaited_since
        if awaited is not None and self.conn.waiting() and now - awaited >= TRICKLE_WAITS * self.timeout:
            # bytes come, but a trickle: a buffer awaited this long fails its run, as each
            # chunk's asyncio.timeout did before (read_timeout; else a peer holds the pull for
            # as long as it likes). Twice that: a slow honest link keeps more room than it had.
            self.conn.fail(RunBroken(f"a chunk still not whole {TRICKLE_WAITS * self.timeout:g} s after it "
                                     "was awaited (bytes trickle)"))
            return
        self.handle = self.loop.call_later(self.timeout / 4, self._look)

    def cancel(self) -> None:
        self.handle.cancel()


class RunClient:
    """Connections to peers for runs, kept for reuse (``IDLE_PER_PEER`` idle ones a peer)."""

    def __init__(self, *, connect_timeout: float = 5.0, read_timeout: float = 30.0,
                 ssl_context: ssl_module.SSLContext | None = None, buffers: BufferPool = BUFFERS):
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.buffers = buffers  # where each chunk's buffer comes from (given back by its user)
        self._ssl = ssl_context
        self._idle: defaultdict[tuple, list[_Conn]] = defaultdict(list)
        self.connections = 0  # opened so far (tests: reuse)

    def _ssl_context(self) -> ssl_module.SSLContext:
        if self._ssl is None:  # what aiohttp uses for an https URL: the system's trust store
            self._ssl = ssl_module.create_default_context()
        return self._ssl

    async def _connect(self, peer: tuple) -> _Conn:
        scheme, host, port = peer
        loop = asyncio.get_running_loop()
        tls = self._ssl_context() if scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(_Conn, host, port, ssl=tls,
                                                       server_hostname=host if tls else None)
        except (OSError, TimeoutError, ssl_module.SSLError) as exc:
            raise RunBroken(f"connect: {type(exc).__name__}: {exc}") from None
        self.connections += 1
        return conn

    def _take(self, peer: tuple) -> _Conn | None:
        idle = self._idle[peer]
        while idle:
            conn = idle.pop()
            if conn.closed is None and conn.leftover() == 0:
                return conn
            conn.close()
        return None

    def _give_back(self, peer: tuple, conn: _Conn) -> None:
        if conn.closed is None and conn.leftover() == 0 and len(self._idle[peer]) < IDLE_PER_PEER:
            self._idle[peer].append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()

    async def get_run(self, url: str, target: str, headers: dict[str, str],
                      lengths: list[int]) -> AsyncIterator[Answer | bytearray]:
        """GET ``url`` (``target`` is its path, as signed): first the Answer; for a 200 then each
        chunk (``lengths``) as its own bytearray once complete; for another status then its body
        (up to ERROR_BODY_MAX). A stale kept connection that fails before any answer is retried
        once on a new one. RunBroken when the connection fails; RunUnexpected as above (before
        the Answer only); a body shorter than the chunks asked for ends early after the chunks
        it held whole (the caller sees fewer chunks than asked)."""
        parts = urlsplit(url)
        scheme = parts.scheme
        if scheme not in ("http", "https") or not parts.hostname:
            raise RunUnexpected(f"not an http(s) URL: {url[:80]!r}")
        peer = (scheme, parts.hostname, parts.port or (443 if scheme == "https" else 80))
        host = parts.netloc.rpartition("@")[2]
        request = (f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n"
                   + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")
        conn = self._take(peer)
        reused = conn is not None
        finished = False
        quiet: _Quiet | None = None
        try:
            while True:
                if conn is None:
                    conn = await self._connect(peer)
                try:
                    conn.transport.write(request)
                    answer = parse_head(await conn.read_head(self.read_timeout))
                    break
                except (RunBroken, TimeoutError) as exc:
                    conn.close()
                    conn = None
                    if not reused:
                        raise RunBroken(f"no answer: {type(exc).__name__}: {exc}") from None
                    reused = False  # the peer had closed a kept connection: once more, afresh
            yield answer
            if answer.status != 200:
                if answer.length > ERROR_BODY_MAX:
                    return
                body = bytearray(answer.length)
                await self._fill(conn, body)
                finished = answer.keep_alive  # read to its end: the connection may serve again
                yield body
                return
            left = answer.length
            ahead: tuple[bytearray, asyncio.Future] | None = None
            quiet = _Quiet(conn, self.read_timeout)
            for i, length in enumerate(lengths):
                if ahead is None:
                    if length > left:
                        return
                    buf = self.buffers.take(length)
                    fut = conn.receive_into(buf)
                else:
                    buf, fut = ahead
                    ahead = None
                conn.awaited_since = quiet.loop.time()
                try:
                    await fut  # RunBroken when the connection fails, goes quiet or trickles (``_Quiet``)
                finally:
                    conn.awaited_since = None
                left -= length
                if i + 1 < len(lengths) and lengths[i + 1] <= left:  # the next buffer waits before
                    nxt = self.buffers.take(lengths[i + 1])           # this one is handed over
                    ahead = (nxt, conn.receive_into(nxt))
                yield buf
            finished = left == 0 and answer.keep_alive
        finally:
            if quiet is not None:
                quiet.cancel()
            if conn is not None:
                if finished:
                    self._give_back(peer, conn)
                else:
                    conn.close()

    async def _fill(self, conn: _Conn, buf: bytearray) -> None:
        try:
            async with asyncio.timeout(self.read_timeout):
                await conn.receive_into(buf)
        except TimeoutError:
            raise RunBroken(f"no bytes for {self.read_timeout:g} s") from None
