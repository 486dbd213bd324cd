"""gateway.protocol._BodyInto, the reader of a large body into reused buffers, driven the way a
transport drives a BufferedProtocol (get_buffer, fill, buffer_updated): a buffer comes back only
when no piece of it is held, and no read reaches past the body's end."""

from __future__ import annotations

import gc

from odst.gateway.protocol import INTO_BYTES, INTO_FIRST, _BodyInto


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


def grown(reader: _BodyInto, http: _Protocol) -> int:
    """Fill buffers until the reader offers INTO_BYTES at a time (a client that keeps up);
    the pieces are let go. Bytes read."""
    n = 0
    while len(reader.get_buffer(-1)) < INTO_BYTES:
        n += read(reader, b"g" * INTO_BYTES)
    http.pieces = []
    gc.collect()
    return n


def test_a_held_piece_keeps_its_buffer_from_being_read_into_again():
    http = _Protocol()
    reader = _BodyInto(http, left=12 * INTO_BYTES)
    grown(reader, http)
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
    while reader.left > 10:
        read(reader, b"a" * (reader.left - 10))
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


def test_a_trickle_holds_one_small_buffer_and_a_fast_body_grows_to_full_reads():
    """A client announcing a long body and sending a byte at a time pins one INTO_FIRST buffer,
    not a zero-filled INTO_BYTES; one that fills every buffer reaches INTO_BYTES reads, and the
    smaller buffers are not taken again."""
    http = _Protocol()
    reader = _BodyInto(http, left=100 * INTO_BYTES)
    for _ in range(1000):
        read(reader, b"t")
    assert [len(b) for b in reader._pool] == [INTO_FIRST]
    assert b"".join(http.pieces) == b"t" * 1000
    fast = _BodyInto(_Protocol(), left=100 * INTO_BYTES)
    sizes = [read(fast, b"f" * INTO_BYTES) for _ in range(10)]
    assert sizes[0] == INTO_FIRST and sizes[-3:] == [INTO_BYTES] * 3
    assert sizes.index(INTO_BYTES) <= 7
    assert all(len(b) == INTO_BYTES for b in fast._pool)
