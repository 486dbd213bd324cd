"""The two forms of a download's header fields: pairs (the ASGI path) and wire bytes (a quick
answer) must say the same thing (the HTTP-level tests are in test_downloads)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from odst.gateway.downloads import _Label, _range_fields, _range_wire, _wire


@given(st.integers(0, 2**63 - 1), st.integers(1, 2**40), st.integers(0, 2**40))
def test_range_fields_on_the_wire(start, length, extra):
    size = start + length + extra
    assert _range_wire(start, length, size) == _wire(_range_fields(start, length, size))


def test_label_fields_on_the_wire():
    label = _Label("ab" * 32, 1_700_000_000_000, 12345)
    assert label.wire_full == _wire(label.full)
    assert label.wire_common == _wire(label.common)
    assert label.wire_full.endswith(b"content-length: 12345\r\n")
    assert b'etag: "' + b"ab" * 32 + b'"\r\n' in label.wire_common
