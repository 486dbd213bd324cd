"""Request bodies: JSON decoded into a request struct, or a clear 400."""

from __future__ import annotations

import msgspec

from odst.errors import RequestInvalid


def decode_json(body: bytes, type_, *, empty_is_object: bool = False):
    """Decode ``body`` as ``type_``; malformed JSON or a wrong shape is a 400 saying which."""
    if empty_is_object and not body:
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise RequestInvalid(f"invalid body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RequestInvalid(f"body is not valid JSON: {exc}") from None
