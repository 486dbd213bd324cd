"""The chunk target, parsed once for both transports (ChunkServer.serve)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from odst.replicator.transport import chunk_target, parse_target, run_target

B3 = "ab" * 32


def test_one_chunk_and_a_run_parse_back():
    assert parse_target(chunk_target(B3, 7)) == (B3, 7, 7)
    assert parse_target(run_target(B3, 3, 10)) == (B3, 3, 10)
    assert run_target(B3, 4, 4) == chunk_target(B3, 4)  # a run of one is the old single-chunk target


def test_malformed_targets_are_refused():
    for bad in ["", "/peer/v1/chunks", f"/peer/v1/chunks/{B3}", f"/peer/v1/chunks/{B3}/", f"/peer/v1/chunks/{B3}/-1",
                f"/peer/v1/chunks/{B3}/5-3", f"/peer/v1/chunks/{B3}/3-", f"/peer/v1/chunks/{B3}/1-2-3",
                f"/peer/v1/chunks/{B3}/+1", f"/peer/v1/chunks/{B3}/１", "/peer/v1/chunks//1",
                f"/peer/v1/chunks/{B3}/1/2", f"/peer/v2/chunks/{B3}/1", f"/peer/v1/chunks/{B3}/0x1"]:
        assert parse_target(bad) is None, bad


@given(st.integers(0, 2**40), st.integers(0, 64))
def test_any_run_round_trips(first, extra):
    assert parse_target(run_target(B3, first, first + extra)) == (B3, first, first + extra)
