"""HTTP/1.1 for the gateway: uvicorn's httptools protocol with limits on request heads.

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
* a response sent before its request's body was all received (401 to an upload without a
  token, 413, 409) ends the connection: uvicorn would otherwise read and drop whatever
  body the client announced, for as long as it trickles in.

After a refusal or such an early answer the connection is half-closed and what the client
still sends is read and dropped (nginx's lingering close): until the client's EOF, LINGER_IDLE_S
without a byte, or LINGER_MAX_S in all. Closing with unread bytes would reset the connection,
and a client still sending its body (it reads the answer only after) would never read why.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

import httptools
import structlog
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = structlog.get_logger("odst.gateway")

BODY_HIGH_WATER = 1 << 20  # bytes of a request body held unread by the app before reading pauses
LINGER_IDLE_S = 5.0  # nginx's lingering_timeout
LINGER_MAX_S = 30.0  # nginx's lingering_time


@dataclass(frozen=True)
class HeadLimits:
    max_bytes: int = 64 * 1024
    max_fields: int = 100  # Apache's LimitRequestFields; browsers send about 15
    timeout_s: float = 10.0


def _body_receive(cycle):
    """uvicorn's ``RequestResponseCycle.receive``, handing out the pieces ``on_body`` kept one
    at a time, as they are (no copy: uvicorn makes two, and joining the pieces one)."""
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
    return receive


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


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args, limits: HeadLimits = HeadLimits(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_head = True  # the next bytes belong to a request head (none has come yet)
        self._head_bytes = 0
        self._head_fields = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False  # refused: the rest of what the client sends is dropped
        self._linger_until = 0.0

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
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
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

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
        if cycle.pieces_bytes > BODY_HIGH_WATER:
            self.flow.pause_reading()
        cycle.message_event.set()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            cycle.pieces, cycle.pieces_bytes = collections.deque(), 0
            cycle.receive = _body_receive(cycle)
        if cycle is not None and cycle.more_body:
            send = cycle.send

            async def send_early_answer_closing(message) -> None:
                # An answer that starts before the request's body is all in ends the connection:
                # say so (a client must not reuse it), and let uvicorn's close linger instead.
                if message["type"] == "http.response.start" and cycle.more_body:
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
                    cycle.transport = _LingerOnClose(self)
                await send(message)
            cycle.send = send_early_answer_closing

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head = True  # what follows is the next request's head
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_head and not self.transport.is_closing():  # its body is still coming
            self._linger()

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
                 client=f"{self.client[0]}:{self.client[1]}" if self.client else None)
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
