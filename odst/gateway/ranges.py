"""HTTP Range and conditional-request semantics (RFC 9110), as pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime

from odst.naming import MAX_INT64, ascii_int


class Unsatisfiable(Exception):
    """No requested range overlaps the representation: 416."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive

    @property
    def length(self) -> int:
        return self.end - self.start + 1


_FIRST_LAST = re.compile(r"bytes=([0-9]{1,19})-([0-9]{1,19})")


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The single byte range to serve, or None to serve the whole representation.

    Syntactically invalid headers and multi-range requests are ignored (RFC 9110
    14.2 allows a server to ignore Range); a valid but unsatisfiable range
    raises Unsatisfiable.
    """
    if not header:
        return None
    plain = _FIRST_LAST.fullmatch(header)
    if plain is not None:  # what clients send (curl, wrk, macOS): no need to take it apart
        first, last = int(plain[1]), int(plain[2])
        if last > MAX_INT64 or last < first:
            return None  # past int64, or invalid: ignored, as below
        if first >= size:
            raise Unsatisfiable()
        return ByteRange(first, min(last, size - 1))
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in spec.split(",")]
    if len(specs) != 1 or not specs[0]:
        return None
    first, dash, last = specs[0].partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if first and ascii_int(first) is None or last and ascii_int(last) is None:
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable()
        return ByteRange(max(0, size - suffix), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None  # invalid: ignore
    if start >= size:
        raise Unsatisfiable()
    return ByteRange(start, min(end, size - 1))


def http_date(ts_seconds: float) -> str:
    return formatdate(ts_seconds, usegmt=True)


def _parse_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def if_range_allows(if_range: str | None, etag: str, last_modified_s: int) -> bool:
    """True if the Range header may be honoured (If-Range absent or it matches strongly)."""
    if if_range is None:
        return True
    v = if_range.strip()
    if v.startswith('"') or v.startswith("W/"):
        return v == etag  # strong comparison: a weak tag never matches
    t = _parse_date(v)
    return t is not None and int(t) == int(last_modified_s)


def not_modified(if_none_match: str | None, if_modified_since: str | None, etag: str,
                 last_modified_s: int) -> bool:
    if if_none_match is not None:
        tags = [t.strip() for t in if_none_match.split(",")]
        return "*" in tags or any(t.removeprefix("W/") == etag for t in tags)  # weak comparison
    if if_modified_since is not None:
        t = _parse_date(if_modified_since)
        return t is not None and int(last_modified_s) <= int(t)
    return False
