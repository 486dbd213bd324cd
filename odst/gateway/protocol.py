"""HTTP/1.1 for the gateway: uvicorn's httptools protocol with limits on request heads, and
zero-copy response bodies from files.

The gateway may face the network without nginx. uvicorn 0.54 with httptools
puts no bound on a request head: httptools joins a header's pieces in memory
as they arrive (a 64 MiB unfinished header held 64 MiB, 20 of them 1.3 GiB),
accepts any number of fields, and a connection that never finishes its head,
or never sends a byte, is kept for ever (uvicorn's keep-alive timer only runs
after a response). h11 bounds the head (``h11_max_incomplete_event_size``)
but answers 400, has no head deadline either and parses bodies in Python.

So the head is guarded here, before the parser sees the bytes. A body's pieces are handed
to the app as the parser gives them (uvicorn copies each into a bytearray, then copies that
into the bytes it hands out: two copies of every uploaded byte, on the event loop's thread),
and reading pauses only past BODY_HIGH_WATER bytes unread (uvicorn: 64 KiB, so a pause and a
resume after nearly every 256 KiB read):

* the bytes of a head (request line and fields) are counted as they are fed;
  past ``max_bytes`` the request is answered 431 and the connection closed, so
  a head never holds more than ``max_bytes`` of memory. A head that starts in
  the middle of a read (a pipelined request) is counted from the next read, so
  it may reach twice the limit before the 431: still bounded.
* more than ``max_fields`` header fields: 431 too.
* a head not complete ``timeout_s`` after the connection opened (or after its
  first byte, on a kept-alive connection) closes the connection, with a 408 if
  part of a request had come. A head pipelined behind a response still being
  sent waits for that response.
* idle kept-alive connections close after uvicorn's ``timeout_keep_alive``.
* a response whose bytes the socket stops taking (a client that asked and no longer reads)
  is dropped after ``send_timeout_s`` without progress (nginx's ``send_timeout``); see
  ``_watch_send``.
* a request body no byte of which comes for ``body_timeout_s`` closes the connection (nginx's
  ``client_body_timeout``; see ``_watch_body``): uvicorn waits for a stalled body for ever, and
  a stalled upload holds its connection, its temp file and, past 256 KiB, two threads.
* a response sent before its request's body was all received (401 to an upload without a
  token, 413, 409) ends the connection: uvicorn would otherwise read and drop whatever
  body the client announced, for as long as it trickles in.

After a refusal or such an early answer the connection is half-closed and what the client
still sends is read and dropped (nginx's lingering close): until the client's EOF, LINGER_IDLE_S
without a byte, or LINGER_MAX_S in all. Closing with unread bytes would reset the connection,
and a client still sending its body (it reads the answer only after) would never read why.

uvicorn has no zero-copy send, so this protocol offers the ASGI extension
``http.response.zerocopysend`` (``scope["extensions"]``): the downloads send
``{"type": "http.response.zerocopysend", "file": fd, "offset": o, "count": n}``
and the bytes go from the page cache to the socket by ``os.sendfile``, as nginx
sends them, instead of through a Python buffer twice (``_send_file``). A start
message carrying ``"http.response.zerocopysend": True`` says such a body follows at
once: its head is then sent with MSG_MORE and leaves with the body (``_HeadWithFile``).

The app may also offer a quick answer (``app.quick``, ``Downloads.quick``): a function
deciding a plain download at once from the request's scope, its header fields already in
wire form. Such a request is answered from the parser's callback, head and sendfile, without
the ASGI cycle (no task, no send messages: that was most of the Python cost of a 1 MiB
range). What sendfile cannot put in the socket at once goes on in a task (``_quick_rest``); until it ends, a request pipelined behind it
waits as it would behind an ASGI response (``_QuickCycle``).

A large body may also be read with no copy on the event loop's thread at all: an app that
can take memoryviews calls ``receive.into_buffers()`` (``_body_receive``) before its first
receive, and the rest of a body of known length is read by ``_BodyInto`` straight from the
socket into a few reused 1 MiB buffers, past the parser (no bytes object per read, no copy
by httptools); the pieces are memoryviews of those buffers, each reused only once nothing
holds a view of it. The uploads take large bodies so (``packages.take_upload``).

A start message carrying ``"odst.body_follows": True`` (``BODY_FOLLOWS``; the uploads' answers)
says its whole body comes in the very next message, at once: the head is held and written
with the body, one write(2) instead of two (on loopback each write runs the receiver's TCP
path too: the head's write alone was ~8 % of an 8 KiB upload's event-loop time).

A response may also be ended short on purpose (a run of chunks cut by the sender's limit):
the ASGI extension ``http.response.cut`` (``{"type": "http.response.cut"}``) closes the
connection after what was sent, and the app returning then is no error (uvicorn logs
"ASGI callable returned without completing response" for a response left short).
"""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import sys
import urllib.parse
from dataclasses import dataclass

import httptools
import structlog
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = structlog.get_logger("odst.gateway")

BODY_HIGH_WATER = 1 << 20  # bytes of a request body held unread by the app before reading pauses
LINGER_IDLE_S = 5.0  # nginx's lingering_timeout
LINGER_MAX_S = 30.0  # nginx's lingering_time
ZEROCOPY = "http.response.zerocopysend"  # the ASGI zero-copy send extension this protocol offers
SPILL_BYTES = 256 * 1024  # what goes by copy when the socket is full (the transport waits for room)
YIELD_BYTES = 8 << 20  # a sendfile loop lets other connections run after this many bytes
CUT = "http.response.cut"  # the ASGI extension that ends a started response short, on purpose
BODY_FOLLOWS = "odst.body_follows"  # a start message's key: hold the head for the body (module doc)
INTO_BYTES = 1 << 20  # a buffer _BodyInto reads a body into (at most this much per read)
INTO_FIRST = 16 << 10  # a body's first buffer; each one its client fills makes the next twice as big
INTO_MIN_ROOM = 64 << 10  # a buffer with less room left is set aside for the next idle one
INTO_POOL = 16  # buffers one body keeps for reuse (about 11 are in use at the high-water marks)


@dataclass(frozen=True)
class HeadLimits:
    max_bytes: int = 64 * 1024
    max_fields: int = 100  # Apache's LimitRequestFields; browsers send about 15
    timeout_s: float = 10.0


def _body_receive(cycle, protocol: "GuardedHttpToolsProtocol"):
    """uvicorn's ``RequestResponseCycle.receive``, handing out the pieces ``on_body`` kept one
    at a time, as they are (no copy: uvicorn makes two, and joining the pieces one).

    ``receive.into_buffers()``: the app takes the rest of the body as memoryviews read straight
    into reused buffers (``_BodyInto``); True if it will come so (a body of known length not all
    read yet, on a connection without TLS), False if it comes as before. A view is valid for as
    long as it is held: its buffer is reused only once no view of it is left."""
    async def receive():
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        if not cycle.disconnected and not cycle.response_complete:
            if cycle.pieces_bytes <= BODY_HIGH_WATER:
                cycle.flow.resume_reading()
            await cycle.message_event.wait()
        if cycle.disconnected or cycle.response_complete:
            return {"type": "http.disconnect"}
        pieces = cycle.pieces
        if len(pieces) > 1:  # more kept: the next receive takes the next one at once
            body = pieces.popleft()
            cycle.pieces_bytes -= len(body)
            return {"type": "http.request", "body": body, "more_body": True}
        cycle.message_event.clear()
        body = pieces.popleft() if pieces else b""
        cycle.pieces_bytes = 0
        return {"type": "http.request", "body": body, "more_body": cycle.more_body}
    receive.into_buffers = lambda: protocol._read_into_buffers(cycle)
    return receive


def _held_elsewhere_refs() -> int:
    """What ``sys.getrefcount`` says of a pooled buffer nobody else holds, in ``_idle``'s loop
    (measured, not assumed: the count of the loop's own references is the interpreter's)."""
    return _idle([bytearray(1)], refs=None)


def _idle(pool: list[bytearray], refs: int | None) -> bytearray | int | None:
    for buffer in pool:  # the same shape as the measurement in _held_elsewhere_refs
        count = sys.getrefcount(buffer)
        if refs is None:
            return count
        if count <= refs:
            return buffer
    return None


class _BodyInto(asyncio.BufferedProtocol):
    """The transport's protocol while the rest of a body of known length is read straight into
    reused buffers (``receive.into_buffers``): each read lands in the room left in the current
    buffer (never past the body's end, so a pipelined request stays in the socket) and goes to
    the cycle as a memoryview of it, through the protocol's ``on_body`` (same queue, same
    high-water pause). A buffer is taken again only when nothing holds a view of it (its
    reference count says so). Once the body is in, the transport goes back to the protocol,
    with a fresh parser for the next request; the connection's other events go to it as well.

    The first buffer is small (INTO_FIRST) and each one filled makes the next twice as big, up
    to INTO_BYTES: the length a client announces is no promise that it sends, and a buffer is
    zero-filled memory from the start. A trickle into a 1 MiB first buffer pinned 1 MiB per few
    bytes received (64 slow uploads of one writer: +66 MiB of the gateway's RSS); now a slow
    body holds about twice what it sent, a fast one reaches 1 MiB reads within seven."""

    _IDLE_REFS: int | None = None

    def __init__(self, http: "GuardedHttpToolsProtocol", left: int) -> None:
        self._http, self.left = http, left
        self._pool: list[bytearray] = []
        self._buffer: bytearray | None = None
        self._at = 0
        self._size = INTO_FIRST  # of the next buffer made
        if _BodyInto._IDLE_REFS is None:
            _BodyInto._IDLE_REFS = _held_elsewhere_refs()

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = self._buffer
        if buffer is None or len(buffer) - self._at < min(INTO_MIN_ROOM, len(buffer) // 4):
            if buffer is not None and self._size < INTO_BYTES:  # filled: the client keeps up
                self._size *= 2
                self._pool = []  # smaller buffers are dropped once nothing holds them
            del buffer  # or _idle counts this reference as a holder
            self._buffer, self._at = None, 0
            idle = _idle(self._pool, self._IDLE_REFS)
            if idle is None:
                # no bigger than what is left of the body: a short body, or the last part of
                # one, pins no more for as long as its client takes to send it
                idle = bytearray(min(self._size, max(self.left, INTO_MIN_ROOM)))
                if len(self._pool) < INTO_POOL:
                    self._pool.append(idle)
            self._buffer = idle
        end = min(len(self._buffer), self._at + self.left)
        return memoryview(self._buffer)[self._at:end]

    def buffer_updated(self, nbytes: int) -> None:
        piece = memoryview(self._buffer)[self._at:self._at + nbytes]
        self._at += nbytes
        self.left -= nbytes
        self._http.on_body(piece)
        if self.left <= 0:
            self._http._body_into_done()

    def eof_received(self):
        return self._http.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._http.connection_lost(exc)

    def pause_writing(self) -> None:
        self._http.pause_writing()

    def resume_writing(self) -> None:
        self._http.resume_writing()


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that is refused."""


class _LingerOnClose:
    """The transport as a request cycle that answered early sees it: its close() lingers."""

    def __init__(self, protocol: "GuardedHttpToolsProtocol") -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._protocol.transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol.transport.is_closing()

    def close(self) -> None:
        self._protocol._linger()


class _HeadWithFile:
    """The transport as uvicorn writes a response head through it when a zero-copy body
    follows: the head is sent with MSG_MORE, so the kernel holds it for the file's first bytes
    (what nginx's tcp_nopush does with sendfile). Measured with bench/run.py: 32-connection
    1 MiB ranges went from 0.57x to 1.09x nginx's throughput; a head in a segment of its own
    stalled each response. Only for a head a body follows at once: a head held with MSG_MORE
    and nothing after it would wait for the kernel's 200 ms."""

    def __init__(self, protocol: "GuardedHttpToolsProtocol") -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        transport = self._protocol.transport
        sent = 0
        if not transport.get_write_buffer_size() and not transport.is_closing():
            try:
                sent = self._protocol._socket().send(data, socket.MSG_MORE)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:  # the connection is gone: the transport finds out and says so
                sent = 0
        if sent < len(data):
            transport.write(data[sent:])

    def is_closing(self) -> bool:
        return self._protocol.transport.is_closing()

    def close(self) -> None:
        self._protocol.transport.close()


class _HeldHead:
    """The transport as uvicorn writes a ``BODY_FOLLOWS`` head through it: kept, not sent."""

    def __init__(self, transport) -> None:
        self._transport = transport
        self.head = b""

    def write(self, data: bytes) -> None:
        self.head += data

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self._transport.close()


class _HeadThenBody:
    """The transport as uvicorn writes the body after a held head: the head goes in front of
    the body's first write; the rest passes through."""

    def __init__(self, transport, head: bytes) -> None:
        self._transport, self._head = transport, head

    def write(self, data: bytes) -> None:
        head, self._head = self._head, b""
        self._transport.write(head + data if head else data)

    def flush(self) -> None:
        """Send a held head that no body write took (a body uvicorn did not write)."""
        if self._head:
            self.write(b"")

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()


class _QuickCycle:
    """What ``self.cycle`` is while a quick answer is still being sent: uvicorn queues a
    request that comes meanwhile behind it (``pipeline``), as behind any unfinished cycle, and
    its ``shutdown`` and ``connection_lost`` mark it as they mark one."""

    __slots__ = ("response_complete", "keep_alive", "disconnected", "message_event")

    def __init__(self) -> None:
        self.response_complete = False
        self.keep_alive = True
        self.disconnected = False
        self.message_event = asyncio.Event()


_default_wire: tuple[list | None, bytes] = (None, b"")  # see GuardedHttpToolsProtocol._default_fields


def _quick_of(app):
    """The app's ``quick`` (see the module's doc), looked for through uvicorn's wrappers."""
    for _ in range(4):
        quick = getattr(app, "quick", None)
        if quick is not None:
            return quick
        app = getattr(app, "app", None)
        if app is None:
            return None
    return None


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, limits: HeadLimits = HeadLimits(), send_timeout_s: float = 60.0,
                 body_timeout_s: float = 60.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.send_timeout_s = send_timeout_s
        self.body_timeout_s = body_timeout_s
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0  # body bytes received on this connection (see _watch_body)
        self._body_bytes_seen = 0  # what _watch_body last saw of them
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_left = 0  # bytes the transport held when the send timer was last armed
        self._in_head = True  # the next bytes belong to a request head (none has come yet)
        self._head_bytes = 0
        self._head_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # refused: the rest of what the client sends is dropped
        self._linger_until = 0.0
        self._out: socket.socket | None = None  # see _socket
        self._quick = _quick_of(self.app)
        self._quick_request = False  # the request being parsed was answered quickly
        self._body_into: _BodyInto | None = None  # reading a body into buffers (receive.into_buffers)

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._body_into = None
        self._disarm_head_timer()
        self._unwatch_body()
        self._unwatch_send()
        if self._out is not None:
            self._out.close()
            self._out = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # dropped; the client is still sending, so wait for it a little longer
            if self._head_timer is not None and self.loop.time() < self._linger_until:
                self._head_timer.cancel()
                self._head_timer = self.loop.call_later(
                    min(LINGER_IDLE_S, self._linger_until - self.loop.time()), self.transport.close)
            return
        self._unset_keepalive_if_required()
        while data and not self.transport.is_closing():
            if self._in_head:
                if self._head_timer is None:
                    self._arm_head_timer()
                room = self.limits.max_bytes - self._head_bytes
                if room <= 0:
                    self._refuse(431, "Request header fields too large (at most "
                                      f"{self.limits.max_bytes} bytes)")
                    return
                piece, data = data[:room], data[room:]
                self._head_bytes += len(piece)
            else:  # a body, or a head pipelined into the same read (counted from the next read)
                piece, data = data, b""
            if not self._feed(piece):
                return

    def _feed(self, data: bytes) -> bool:
        """uvicorn's data_received, less the keep-alive reset; False when the connection is done."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadRefused):  # raised in on_header, kept by httptools
                self._refuse(431, str(exc.__context__))
                return False
            # answered as a refused head is: the answer, then a lingering close. uvicorn's
            # send_400_response closes at once, and a client still sending a body (a
            # Content-Length given twice, with Transfer-Encoding) got a reset, not the 400
            self._refuse(400, "Invalid HTTP request received.")
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    # -- send deadline ---------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_send()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch_send()

    def _watch_send(self) -> None:
        """The transport holds more than it may (every wait for room in the socket, uvicorn's
        drain after a body piece and ``_drained``, starts here): from now on, each
        ``send_timeout_s`` in which the socket took no byte of it drops the connection. Without
        this a client that asks for a package and never reads holds its connection, the file
        and a download slot (gateway.egress) for ever. Progress is looked at once per period,
        so a stalled client is dropped between one and two periods after its last byte."""
        if self._send_timer is None:
            self._send_left = self.transport.get_write_buffer_size()
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    @property
    def _client_address(self) -> str | None:
        """host:port of the client, for the log lines of a connection closed on it."""
        return f"{self.client[0]}:{self.client[1]}" if self.client else None

    def _unwatch_send(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        left = self.transport.get_write_buffer_size()
        if not left:
            return
        if left < self._send_left:  # the client reads, however slowly
            self._watch_send()
            return
        log.info("response send timed out", held=left, timeout_s=self.send_timeout_s,
                 client=self._client_address)
        # abort, not close: close() would wait for the buffer to drain, that is, for ever
        self.transport.abort()

    # -- body deadline ---------------------------------------------------------------------

    def _watch_body(self) -> None:
        """A request's body is coming: from now until it is all in, each ``body_timeout_s`` in
        which no byte of it came closes the connection (the app hears a disconnect; an upload
        removes its temp file). Not counted: a wait that is the server's (reading paused for a
        full queue, a request queued behind another, a client waiting for 100 Continue).
        Progress is looked at once per period, as ``_watch_send`` does."""
        self._body_bytes_seen = self._body_bytes
        self._body_timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def _unwatch_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._in_head:
            return
        cycle = self.cycle
        waiting = (self.flow.read_paused or cycle is None or cycle.waiting_for_100_continue
                   or self._lingering)
        if self._body_bytes != self._body_bytes_seen or waiting:
            self._watch_body()
            return
        log.info("request body timed out", timeout_s=self.body_timeout_s,
                 client=self._client_address)
        self.transport.close()

    # -- parser callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_fields = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_fields += 1
        if self._head_fields > self.limits.max_fields:
            raise _HeadRefused(f"Too many header fields (at most {self.limits.max_fields})")
        super().on_header(name, value)

    def on_body(self, body: bytes) -> None:
        """uvicorn's on_body, keeping the parser's bytes as they are (see ``_body_receive``)."""
        cycle = self.cycle
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.pieces.append(body)
        cycle.pieces_bytes += len(body)
        cycle.body_seen += len(body)
        self._body_bytes += len(body)
        if cycle.pieces_bytes > BODY_HIGH_WATER:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        if self._quick is not None and self._answer_quickly():
            return
        self.scope.setdefault("extensions", {})[ZEROCOPY] = {}  # the app's task starts after this
        self.scope["extensions"][CUT] = {}
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is None:
            return
        cycle.pieces, cycle.pieces_bytes, cycle.body_seen = collections.deque(), 0, 0
        self._unwatch_body()
        self._watch_body()  # until on_message_complete: the body, if any, is all in
        cycle.receive = _body_receive(cycle, self)
        send = cycle.send
        early = cycle.more_body  # the request has a body still to come
        held: _HeldHead | None = None  # a BODY_FOLLOWS head, until its body is sent

        async def guarded_send(message) -> None:
            nonlocal held
            if held is not None and message["type"] == "http.response.body":
                transport, cycle.transport = cycle.transport, _HeadThenBody(cycle.transport, held.head)
                held = None
                try:
                    await send(message)
                finally:
                    cycle.transport.flush()
                    cycle.transport = transport
                return
            if (message.get(BODY_FOLLOWS) and message["type"] == "http.response.start"
                    and not (early and cycle.more_body)):
                held = _HeldHead(cycle.transport)
                transport, cycle.transport = cycle.transport, held
                try:
                    await send({k: v for k, v in message.items() if k != BODY_FOLLOWS})
                finally:
                    cycle.transport = transport
                return
            if message["type"] == ZEROCOPY:
                await self._send_file(cycle, send, message)
                return
            if message["type"] == CUT:
                self._cut(cycle)
                return
            if message.get(ZEROCOPY) and message["type"] == "http.response.start":
                # the app says a zero-copy body follows: the head goes with its first bytes
                transport, cycle.transport = cycle.transport, _HeadWithFile(self)
                try:
                    await send(message)
                finally:
                    cycle.transport = transport
                return
            # An answer that starts before the request's body is all in ends the connection:
            # say so (a client must not reuse it), and let uvicorn's close linger instead.
            if early and message["type"] == "http.response.start" and cycle.more_body:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                cycle.transport = _LingerOnClose(self)
            await send(message)
        cycle.send = guarded_send

    def on_message_complete(self) -> None:
        self._unwatch_body()
        if self._quick_request:
            self._quick_request = False  # its answer was sent, or is being sent, without a cycle
        else:
            super().on_message_complete()
        self._in_head = True  # what follows is the next request's head
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # the answered request's own body is still coming; not a pipelined request's, whose
        # head the parser read meanwhile (self.cycle is then that one, not answered yet)
        if (not self._in_head and self.cycle is not None and self.cycle.response_complete
                and not self.transport.is_closing()):
            self._linger()

    def _cut(self, cycle) -> None:
        """The app ends its response short (``CUT``): what was sent goes out, then the connection
        closes; the client sees a body shorter than its Content-Length. The cycle is marked as
        uvicorn marks one whose client went away, so the app's return is no error."""
        if cycle.response_complete or cycle.disconnected:
            return
        if not cycle.response_started:
            raise RuntimeError(f"Unexpected ASGI message '{CUT}' before the response started.")
        cycle.disconnected = True
        cycle.keep_alive = False
        if not self.transport.is_closing():
            self.transport.close()

    # -- a body read into buffers (_BodyInto) ------------------------------------------------

    def _read_into_buffers(self, cycle) -> bool:
        """``receive.into_buffers()``: read the rest of ``cycle``'s body with ``_BodyInto``."""
        if self._body_into is not None:
            return cycle is self.cycle
        if (cycle is not self.cycle or not cycle.more_body or cycle.response_complete
                or self._lingering or self.transport.is_closing()
                or self.transport.get_extra_info("sslcontext") is not None):
            return False
        length = None
        for name, value in cycle.scope["headers"]:  # this request's (self.headers: the latest head's)
            if name == b"transfer-encoding":
                return False
            if name == b"content-length":
                if length is not None or not value.isdigit():  # the parser's business: leave it there
                    return False
                length = int(value)
        if length is None or length - cycle.body_seen <= 0:
            return False
        self._body_into = _BodyInto(self, length - cycle.body_seen)
        self.transport.set_protocol(self._body_into)
        return True

    def _body_into_done(self) -> None:
        """The whole body is in: the transport comes back, the next request gets a new parser
        (this one still waits for the body it never saw), and the cycle hears the body ended."""
        self._end_body_into()
        self.parser = httptools.HttpRequestParser(self)
        try:
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn's
        except AttributeError:  # httptools < 0.6.3
            pass
        self.on_message_complete()

    def _end_body_into(self) -> None:
        if self._body_into is not None:
            self._body_into = None
            if not self.transport.is_closing():
                self.transport.set_protocol(self)

    # -- quick answers -----------------------------------------------------------------------

    def _answer_quickly(self) -> bool:
        """Answer the request whose head is complete with the app's ``quick`` (True), or leave
        it to uvicorn's cycle (False). Only a GET of HTTP/1.1 kept alive, without a body, with
        nothing of an earlier response still unsent."""
        parser = self.parser
        if (parser.get_method() != b"GET" or parser.get_http_version() != "1.1"
                or not parser.should_keep_alive() or parser.should_upgrade()
                or (self.cycle is not None and not self.cycle.response_complete)
                or self.transport.get_write_buffer_size() or self.transport.is_closing()):
            return False
        for name, _ in self.headers:
            if name in (b"content-length", b"transfer-encoding"):
                return False
        scope = self.scope
        parsed = httptools.parse_url(self.url)
        path = parsed.path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["method"] = "GET"
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + parsed.path
        scope["query_string"] = parsed.query or b""
        try:
            answer = self._quick(scope)
        except Exception:  # noqa: BLE001 - the ASGI path answers it again, and says what failed
            log.exception("quick download answer failed", path=scope["path"])
            return False
        if answer is None:
            return False
        self._quick_request = True
        self._send_quick(answer)
        return True

    def _send_quick(self, answer) -> None:
        head = b"".join((STATUS_LINE[answer.status], self._default_fields(), answer.head, b"\r\n"))
        sock = self._socket()
        fd, offset, count = answer.fd, answer.start, answer.length
        try:
            put = sock.send(head, socket.MSG_MORE)
        except (BlockingIOError, InterruptedError):
            put = 0
        except OSError:  # gone: connection_lost follows
            answer.done(0)
            self.transport.close()
            return
        sent = 0
        if put < len(head):
            self.transport.write(head[put:])
        else:
            out = sock.fileno()
            while sent < count:
                try:
                    n = os.sendfile(out, fd, offset + sent, count - sent)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    n = 0
                if n == 0:  # the connection broke or the file shrank: close
                    answer.done(sent)
                    self.transport.close()
                    return
                sent += n
        if sent == count:
            answer.done(sent)
            self.server_state.total_requests += 1
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)
            return
        # the socket is full: the rest in a task; a request meanwhile waits in uvicorn's pipeline
        cycle = _QuickCycle()
        self.cycle = cycle
        self.flow.pause_reading()
        task = self.loop.create_task(self._quick_rest(cycle, answer, sent))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    def _default_fields(self) -> bytes:
        """The server's default header fields (Date, Server) as wire bytes, formatted once per
        list: uvicorn puts a new list in ``server_state`` when the Date changes (each second)."""
        global _default_wire
        fields = self.server_state.default_headers
        if _default_wire[0] is not fields:  # the list itself is held: its id is not reused
            _default_wire = (fields, b"".join(name + b": " + value + b"\r\n" for name, value in fields))
        return _default_wire[1]

    async def _quick_rest(self, cycle: _QuickCycle, answer, sent: int) -> None:
        count = answer.length
        try:
            await self._drained()
            if not cycle.disconnected:
                sent += await self._sendfile(answer.fd, answer.start + sent, count - sent)
        finally:
            answer.done(sent)
        cycle.response_complete = True
        if sent < count or not cycle.keep_alive or cycle.disconnected:
            if not self.transport.is_closing():
                self.transport.close()
            return
        if self.cycle is cycle:
            self.cycle = None
        self.on_response_complete()  # the next pipelined request starts, or the keep-alive timer

    # -- zero-copy bodies --------------------------------------------------------------------

    async def _send_file(self, cycle, send, message) -> None:
        """The ASGI zero-copy send extension: ``count`` bytes of the open ``file`` (an fd or an
        object with fileno()) from ``offset``, sent by ``os.sendfile`` straight from the page
        cache to the socket; uvicorn's own bookkeeping (Content-Length, completion, keep-alive)
        then sees an empty body message. What sendfile cannot put in a full socket buffer goes
        as one copied block through the transport, which waits for room; then sendfile again.
        A chunked response or a body longer than promised takes uvicorn's path (pread)."""
        if cycle.disconnected:
            return
        if not cycle.response_started or cycle.response_complete:
            raise RuntimeError(f"Unexpected ASGI message '{ZEROCOPY}' outside a response body.")
        file = message["file"]
        fd = file if isinstance(file, int) else file.fileno()
        offset = message.get("offset", 0)
        count = message.get("count")
        if count is None:
            count = os.fstat(fd).st_size - offset
        more = message.get("more_body", False)
        if cycle.scope["method"] == "HEAD":  # no body goes out
            await send({"type": "http.response.body", "body": b"", "more_body": more})
            return
        if cycle.chunked_encoding or count > cycle.expected_content_length:
            end = offset + count
            while True:
                data = os.pread(fd, min(SPILL_BYTES, end - offset), offset) if offset < end else b""
                offset += len(data)
                last = offset >= end or not data
                await send({"type": "http.response.body", "body": data, "more_body": more or not last})
                if last:
                    return
        sent = await self._sendfile(fd, offset, count)
        if sent < count:  # the client went away, or the file is shorter than promised: close
            if not self.transport.is_closing():
                self.transport.close()
            return
        cycle.expected_content_length -= count
        await send({"type": "http.response.body", "body": b"", "more_body": more})

    async def _sendfile(self, fd: int, offset: int, count: int) -> int:
        """Bytes sent of ``count`` (fewer: the connection broke or the file ended)."""
        transport = self.transport
        out = self._socket().fileno()
        await self._drained()  # the head uvicorn wrote goes first
        sent = since_yield = 0
        while sent < count:
            if transport.is_closing():
                break
            try:
                n = os.sendfile(out, fd, offset + sent, count - sent)
            except BlockingIOError:  # socket buffer full: one block through the transport
                piece = os.pread(fd, min(SPILL_BYTES, count - sent), offset + sent)
                if not piece:
                    break
                transport.write(piece)
                sent += len(piece)
                await self._drained()
                continue
            except OSError:  # reset, broken pipe: connection_lost follows
                break
            if n == 0:
                break  # end of file
            sent += n
            since_yield += n
            if since_yield >= YIELD_BYTES:  # a client that always keeps up must not hold the loop
                since_yield = 0
                await asyncio.sleep(0)
        return sent

    def _socket(self) -> socket.socket:
        """The connection's socket for MSG_MORE and sendfile (the transport's own stand-in has
        no send): a duplicate of its descriptor, closed with the connection."""
        if self._out is None:
            self._out = socket.socket(fileno=os.dup(self.transport.get_extra_info("socket").fileno()))
        return self._out

    async def _drained(self) -> None:
        """Wait until the transport has written everything it holds."""
        transport = self.transport
        if not transport.get_write_buffer_size() or transport.is_closing():
            return
        low, high = transport.get_write_buffer_limits()
        transport.set_write_buffer_limits(high=0)  # pauses the protocol until the buffer is empty
        try:
            await self.flow.drain()
        finally:
            if not transport.is_closing():
                transport.set_write_buffer_limits(high=high, low=low)

    # -- refusals ----------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head behind a response still being sent
            return
        if self._head_bytes:
            self._refuse(408, "Request head not complete in time")
        else:
            self.transport.close()  # nothing asked: nothing to answer

    def _refuse(self, status: int, msg: str) -> None:
        """Answer a refused head and close (the request never reaches the app)."""
        log.info("request head refused", status=status, reason=msg,
                 client=self._client_address)
        body = msg.encode("ascii")
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend([b"content-type: text/plain; charset=utf-8\r\n",
                        b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                        b"connection: close\r\n", b"\r\n", body])
        self.transport.write(b"".join(content))
        self._linger()

    def _linger(self) -> None:
        """Half-close after the answer; drop what still comes; close at the client's EOF
        (eof_received), after LINGER_IDLE_S without a byte, or LINGER_MAX_S in all."""
        if self._lingering:
            return
        self._lingering = True
        self._end_body_into()
        self._disarm_head_timer()
        self._unset_keepalive_if_required()
        # uvicorn pauses reading while a body the app never reads piles up (a 413 answered
        # from the headers): resume, or the bytes are never drained and closing resets the
        # connection before the client has read the answer
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._linger_until = self.loop.time() + LINGER_MAX_S
            self._head_timer = self.loop.call_later(LINGER_IDLE_S, self.transport.close)
        else:
            self.transport.close()
