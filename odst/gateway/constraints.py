"""The rules of request fields as schema constraints: one regex per rule, used by msgspec (which
enforces it while decoding a body) and Litestar (path and query parameters), and so written
into the OpenAPI document. The named checks (``naming.check_name``, ``check_site_name``, ...)
stay the authority; tests/unit/test_constraints.py holds each regex to its check.

The patterns read the same in Python's ``re`` (msgspec, Litestar) and in the ECMA 262 dialect
the OpenAPI document promises (schemathesis validates with a Rust engine that checks it): only
lookaheads, classes, ``\\uXXXX`` escapes for the Basic Multilingual Plane and characters beyond
it written as themselves (ECMA 262 has no escape for them that Python reads). White space is
spelled out (str.isspace) rather than ``\\s``, whose meaning differs between the engines, and a
pattern ends with END, not ``$``, which Python also matches before a final newline.
"""

from __future__ import annotations

import unicodedata

from litestar.exceptions import ValidationException
from odst.naming import MAX_NAME_BYTES


END = r"$(?!\n)"  # the end of the string in both readings


def _escape(code: int) -> str:
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


# Planes 2 to 13 hold ideographs and unassigned code points, 15 and 16 private use: no control
# or format characters (a unit test scans them all), so they are not scanned at import.
SCANNED = (range(0x0000, 0x20000), range(0xE0000, 0xF0000))


def char_class(categories: tuple[str, ...], planes=SCANNED, *, space: bool = False) -> str:
    """The body of a regex character class (no brackets) of every code point in ``planes``
    whose Unicode category is one of ``categories`` (as this Python's unicodedata sees them),
    or (``space``) that is white space."""
    ranges: list[tuple[int, int]] = []
    for code in (c for plane in planes for c in plane):
        if (chr(code).isspace() if space else unicodedata.category(chr(code)) in categories):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return "".join(_escape(a) if a == b else f"{_escape(a)}-{_escape(b)}" for a, b in ranges)


# Control, format, line and paragraph separator characters: never in a name. (Surrogates, which
# check_name refuses too, cannot reach it: a path is strict UTF-8, and no regex engine names them.)
_UNSEEN = char_class(("Cc", "Cf", "Zl", "Zp"))
_SPACE = char_class((), (range(0x10000),), space=True)

# odst.naming.check_name: not empty, no '/', '\\', '..', no leading '.', no white space at
# either end, no control or format characters. Its limit is 255 UTF-8 *bytes*: maxLength
# (characters) is that limit only for ASCII names; a longer encoding is a 400.
PACKAGE_NAME = rf"^(?!\.)(?!.*\.\.)(?![{_SPACE}])(?!.*[{_SPACE}]$)[^/\\{_UNSEEN}]+{END}"
PACKAGE_NAME_MAX = MAX_NAME_BYTES


def package_name_with_extension(extensions: list[str]) -> str:
    """PACKAGE_NAME that also ends in one of ``extensions`` (any case) after at least one
    character: check_name with the site's allowed_extensions."""
    ends = "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else _literal(c) for c in ext)
                    for ext in extensions)
    return PACKAGE_NAME[:-len(END) - 1] + rf"+(?:{ends}){END}"


def _literal(c: str) -> str:
    return "\\" + c if c in r".^$*+?()[]{}|\-/" else c


# odst.gateway.settings.check_site_name: 1 to 100 characters, one of them not white space, no
# control or format characters; checked as sent (the check trims first, so it also takes a
# name with a trailing newline or one over 100 characters only with the spaces around it).
SITE_NAME = rf"^[^{_UNSEEN}]*[^{_SPACE}{_UNSEEN}][^{_UNSEEN}]*{END}"
SITE_NAME_MAX = 100

# A user's display name (users._display_name): no control characters (C0 and DEL).
DISPLAY_NAME = r"^[^\u0000-\u001f\u007f]*" + END
DISPLAY_NAME_MAX = 200

# A label such as an API token's name: at least one character that is not white space.
NOT_BLANK = rf"[^{_SPACE}]"

# notifications.EMAIL, with white space allowed around the address (the handler trims it).
EMAIL_ADDRESS = rf"^[{_SPACE}]*[^@{_SPACE}<>,;]{{1,64}}@[^@{_SPACE}<>,;]{{1,255}}[{_SPACE}]*{END}"


def one_value_each(request) -> None:
    """Litestar's ``before_request``: a query parameter the handler takes as one value, given
    more than once (``?stage=a&stage=b``), is a 400 naming it. Litestar would silently keep the
    last; the answer would then depend on an order the caller may not control. Parameters the
    handler takes as a list (``name``) repeat freely; ones it does not take are ignored as before."""
    query = request.query_params
    repeated = [k for k in query.keys() if len(query.getall(k)) > 1]
    if not repeated:
        return None
    once = set()
    for pname, param in request.route_handler.parsed_fn_signature.parameters.items():
        field = getattr(param, "field_definition", param)
        alias = getattr(getattr(field, "kwarg_definition", None), "query", None) or pname
        if not field.is_non_string_sequence:
            once.add(alias)
    for key in repeated:
        if key in once:
            raise ValidationException(f"query parameter {key!r} was given more than once; it takes one value")
    return None
