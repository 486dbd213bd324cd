"""Range and conditional requests as pure functions (the HTTP-level tests are in test_downloads)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from odst.gateway.ranges import (ByteRange, Unsatisfiable, http_date, if_range_allows,
                                 not_modified, parse_range)


@pytest.mark.parametrize("header,size,expected", [
    (None, 10, None), ("bytes=0-0", 10, ByteRange(0, 0)), ("bytes=2-5", 10, ByteRange(2, 5)),
    ("bytes=5-", 10, ByteRange(5, 9)), ("bytes=-3", 10, ByteRange(7, 9)),
    ("bytes=-30", 10, ByteRange(0, 9)), ("bytes=8-100", 10, ByteRange(8, 9)),
    ("BYTES=1-2", 10, ByteRange(1, 2)), ("bytes=0-1,4-5", 10, None), ("items=0-1", 10, None),
    ("bytes=5-2", 10, None), ("bytes=a-b", 10, None), ("bytes=", 10, None), ("bytes=-", 10, None),
    ("bytes 0-1", 10, None), ("bytes=0-9223372036854775808", 10, None),  # past int64: ignored
    ("bytes=0-9223372036854775807", 10, ByteRange(0, 9)),
])
def test_parse(header, size, expected):
    assert parse_range(header, size) == expected


@pytest.mark.parametrize("header,size", [("bytes=10-", 10), ("bytes=10-20", 10), ("bytes=-0", 10),
                                         ("bytes=0-", 0), ("bytes=-5", 0)])
def test_unsatisfiable(header, size):
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


@given(st.integers(0, 10_000), st.integers(0, 20_000), st.integers(0, 20_000))
def test_a_satisfiable_range_always_lies_inside_the_file(size, a, b):
    try:
        r = parse_range(f"bytes={a}-{b}", size)
    except Unsatisfiable:
        assert a >= size
        return
    if r is None:
        assert b < a
    else:
        assert 0 <= r.start <= r.end < size and r.start == a and r.end == min(b, size - 1)


def test_if_range():
    etag, t = '"abc"', 1_700_000_000
    assert if_range_allows(None, etag, t)
    assert if_range_allows('"abc"', etag, t)
    assert not if_range_allows('"abd"', etag, t)
    assert not if_range_allows('W/"abc"', etag, t)  # weak never matches strongly
    assert if_range_allows(http_date(t), etag, t)
    assert not if_range_allows(http_date(t - 1), etag, t)
    assert not if_range_allows("garbage", etag, t)


def test_not_modified():
    etag, t = '"abc"', 1_700_000_000
    assert not_modified('"abc"', None, etag, t)
    assert not_modified('"x", W/"abc"', None, etag, t)
    assert not_modified("*", None, etag, t)
    assert not not_modified('"x"', http_date(t + 10), etag, t)  # If-None-Match wins
    assert not_modified(None, http_date(t), etag, t)
    assert not not_modified(None, http_date(t - 1), etag, t)
    assert not not_modified(None, None, etag, t)


@given(st.integers(0, 10_000), st.integers(0, 2**64), st.integers(0, 2**64))
def test_the_plain_form_is_read_as_any_other_spelling_of_it(size, a, b):
    """'bytes=A-B' has a quick path of its own; spaces take the general one, which must agree
    (past int64 too: ignored by both)."""
    def answer(header):
        try:
            return parse_range(header, size)
        except Unsatisfiable:
            return "416"
    assert answer(f"bytes={a}-{b}") == answer(f"bytes= {a} - {b} ")
