"""Package names are untrusted input: the rules every name must pass."""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

from odst.errors import ExtensionNotAllowed, PackageNameInvalid

MAX_NAME_BYTES = 255
MAX_INT64 = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")


def ascii_int(text: str | None, limit: int = MAX_INT64) -> int | None:
    """The value of a plain ASCII decimal (no signs, no '²', at most ``limit``), else None."""
    if text is None or not _DIGITS.fullmatch(text):
        return None
    value = int(text)
    return value if value <= limit else None


def sent_path(scope) -> str:
    """The request path exactly as the client sent it: percent-escapes kept, query dropped.

    What a signed peer request is checked against. From the ASGI ``raw_path``; a server
    that gives none has only the decoded ``path``, which is returned as it is.
    """
    raw = scope.get("raw_path")
    return raw.decode("latin-1").split("?", 1)[0] if raw else scope["path"]


def request_path(scope) -> str:
    """The request path percent-decoded strictly as UTF-8 (PackageNameInvalid, a 400, if not).

    Frameworks decode paths leniently (U+FFFD for bad bytes, and a %2F may vanish at the
    end); a package name taken from a path must be exactly what the client sent.
    """
    if not scope.get("raw_path"):
        return scope["path"]
    try:
        return unquote(sent_path(scope), errors="strict")
    except UnicodeDecodeError:
        raise PackageNameInvalid("path is not valid UTF-8") from None


def name_in_path(scope, prefix: str) -> str:
    """The rest of the request path after ``prefix`` (see request_path): a package name, not yet
    checked (check_name). PackageNameInvalid if the path does not start with ``prefix``."""
    path = request_path(scope)
    if not path.startswith(prefix):
        raise PackageNameInvalid("package name missing from the path")
    return path[len(prefix):]


def name_key(name: str) -> str:
    """The key a package name is compared by: two names with the same key are one package.

    Names compare as a Mac compares file names. APFS (case-insensitive by default on macOS)
    is normalisation-insensitive and case-insensitive; HFS+ stores names decomposed (NFD)
    and compares them case-insensitively; an SMB share served by macOS compares the same
    way. So the key is Unicode's canonical caseless match (Unicode 15, D145):
    ``NFD(casefold(NFD(name)))``. NFD rather than NFC because that is the form HFS+ stores
    and APFS hashes by, so a key is also a name a Mac's file system would keep as given.

    Full case folding is a little broader than APFS ('Straße' and 'STRASSE' are one key
    here): folding at least as much as any Mac means two names a Mac could confuse are
    never two packages; the cost is a clear 409 for such a rare pair. Accents still count
    ('Cafe.pkg' and 'Café.pkg' stay two packages), as on every Mac file system.

    The uploader's spelling is kept for display; the key decides uniqueness, lookups
    (the distribution point and the Admin API accept any spelling) and the file name in
    the store. Idempotent: ``name_key(name_key(x)) == name_key(x)``.
    """
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


def unsafe_name(name: str) -> str:
    """Why ``name`` may not name a package file ("" if it may): the rule of ``check_name``,
    for names that come from a log (a peer's events) rather than from a request."""
    try:
        check_name(name)
    except PackageNameInvalid as exc:
        return str(exc)
    return ""


def check_name(name: str, allowed_extensions: list[str] | None = None) -> str:
    """Return the name if it is safe to use as a file name in the public directory."""
    if not name:
        raise PackageNameInvalid("package name is empty")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise PackageNameInvalid("package name is not valid UTF-8") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise PackageNameInvalid(f"package name is {len(encoded)} bytes; at most {MAX_NAME_BYTES} allowed")
    if "/" in name or "\\" in name:
        raise PackageNameInvalid("package name must not contain '/' or '\\'")
    if ".." in name:
        raise PackageNameInvalid("package name must not contain '..'")
    if name.startswith("."):
        raise PackageNameInvalid("package name must not start with '.'")
    if name != name.strip():
        raise PackageNameInvalid("package name must not start or end with white space")
    for ch in name:
        if ch == "\x00":
            raise PackageNameInvalid("package name must not contain NUL")
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            raise PackageNameInvalid(f"package name must not contain control characters (U+{ord(ch):04X})")
    if allowed_extensions is not None:
        lower = name.lower()
        if not any(lower.endswith(ext) and len(lower) > len(ext) for ext in allowed_extensions):
            raise ExtensionNotAllowed(
                f"extension not allowed; allowed: {', '.join(allowed_extensions)}")
    return name
