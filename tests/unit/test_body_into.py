"""gateway.protocol._BodyInto, the reader of a large body into reused buffers, driven the way a
transport drives a BufferedProtocol (get_buffer, fill, buffer_updated): a buffer comes back only
when no piece of it is held, and no read reaches past the body's end."""

from __future__ import annotations

import gc

from odst.gateway.protocol import INTO_BYTES, _BodyInto


class _Protocol:
    """What _BodyInto calls on the HTTP protocol: the pieces it hands on, and the body's end."""

    def __init__(self) -> None:
        self.pieces: list[memoryview] = []
        self.done = False

    def on_body(self, piece: memoryview) -> None:
        self.pieces.append(piece)

    def _body_into_done(self) -> None:
        self.done = True


def read(reader: _BodyInto, data: bytes) -> int:
    """One read as a transport makes it: as much of ``data`` as the buffer offered takes."""
    buffer = reader.get_buffer(-1)
    n = min(len(buffer), len(data))
    buffer[:n] = data[:n]
    del buffer
    reader.buffer_updated(n)
    return n


def test_a_held_piece_keeps_its_buffer_from_being_read_into_again():
    http = _Protocol()
    reader = _BodyInto(http, left=10 * INTO_BYTES)
    sent = [bytes([i]) * INTO_BYTES for i in range(3)]
    for block in sent:  # each read fills one whole buffer
        assert read(reader, block) == INTO_BYTES
    assert [bytes(p) for p in http.pieces] == sent  # three buffers: every piece is still held
    held = http.pieces[1]
    http.pieces = [held]  # the others are let go: their buffers may be read into again
    gc.collect()
    for i in range(3, 8):
        read(reader, bytes([i]) * INTO_BYTES)
        http.pieces = [held]
    assert bytes(held) == sent[1]  # never overwritten while held
    assert len(reader._pool) == 3  # the two let go were reused, none more was needed


def test_reads_stop_at_the_end_of_the_body():
    http = _Protocol()
    reader = _BodyInto(http, left=INTO_BYTES + 10)
    assert read(reader, b"a" * (2 * INTO_BYTES)) == INTO_BYTES
    assert not http.done
    assert len(reader.get_buffer(-1)) == 10  # a pipelined request behind the body stays in the socket
    assert read(reader, b"b" * 100) == 10
    assert http.done and reader.left == 0
    assert b"".join(http.pieces) == b"a" * INTO_BYTES + b"b" * 10


def test_a_short_read_leaves_the_rest_of_its_buffer_to_the_next():
    http = _Protocol()
    reader = _BodyInto(http, left=3 * INTO_BYTES)
    read(reader, b"x" * 1000)
    read(reader, b"y" * 2000)
    assert [bytes(p) for p in http.pieces] == [b"x" * 1000, b"y" * 2000]
    assert len(reader._pool) == 1  # both pieces lie in one buffer, one after the other
