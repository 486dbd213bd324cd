"""Package names are untrusted input: the rules every name must pass."""

from __future__ import annotations

import unicodedata

from odst.errors import ExtensionNotAllowed, PackageNameInvalid

MAX_NAME_BYTES = 255


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
