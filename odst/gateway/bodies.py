"""Request bodies: JSON decoded into a request struct, or a clear 400.

A struct's limits are ``msgspec.Meta`` constraints on its fields: the decoder enforces them and
the OpenAPI document shows them. A field that breaks one is refused in words, "<field> must be
<its description>", not with msgspec's "Expected `str` matching regex '…'"; a struct may name
the error a field's refusal raises in ``refusals`` (a ClassVar), so the error code stays its
named check's (``credential_name_invalid``, not ``request_invalid``).
"""

from __future__ import annotations

import re

import msgspec
import msgspec.inspect

from odst.errors import RequestInvalid

_AT = re.compile(r" - at `\$\.(\w+)`$")
_LIMIT = re.compile(r"^Expected `\w+` (of length|matching regex|[<>]=?)")


def _refusal(type_, exc: msgspec.ValidationError) -> Exception:
    message = str(exc)
    at = _AT.search(message)
    field = at.group(1) if at else None
    if field is None or field not in getattr(type_, "__struct_fields__", ()):
        return RequestInvalid(f"invalid body: {message}")
    error = (getattr(type_, "refusals", None) or {}).get(field, RequestInvalid)
    if _LIMIT.search(message):
        rule = _description(msgspec.inspect.type_info(type_), field)
        if rule:
            return error(f"{field} must be {rule}")
        message = re.sub(r"matching regex '.*' - at", "matching the pattern in the API schema - at", message, flags=re.S)
    return error(f"invalid body: {message}")


def _description(info, field: str) -> str | None:
    """The ``description`` of a struct field's Meta (through ``X | None``)."""
    kind = next(f for f in info.fields if f.name == field).type
    for candidate in [kind, *getattr(kind, "types", ())]:
        schema = getattr(candidate, "extra_json_schema", None) or {}
        if schema.get("description"):
            return schema["description"]
    return None


def _integral(value):
    """JSON numbers such as ``3600.0`` as the integers JSON Schema says they are."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def decode_json(body: bytes, type_, *, empty_is_object: bool = False):
    """Decode ``body`` as ``type_``; malformed JSON or a wrong shape is a 400 saying which."""
    if empty_is_object and not body:
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:  # a DecodeError too: caught first
        if "got `float`" not in str(exc):
            raise _refusal(type_, exc) from None
    except msgspec.DecodeError as exc:
        raise RequestInvalid(f"body is not valid JSON: {exc}") from None
    try:  # an "integer" of the schema written 3600.0: msgspec's decoder takes only 3600
        return msgspec.convert(_integral(msgspec.json.decode(body)), type_)
    except msgspec.ValidationError as exc:
        raise _refusal(type_, exc) from None
