"""The web UI: static pages served by the gateway over the Admin API.

The UI is a static shell (``ui/index.html`` plus plain JavaScript modules and one
stylesheet); everything it shows comes from the Admin API with the session
cookie. Assets are served under ``/ui/static/<tag>/`` where ``tag`` is a hash of
every asset and the version: they can be cached for a year, and an upgrade (or
any edit) changes the URL. The HTML itself is never cached.
"""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib import resources
from typing import Any

from litestar import Response, get
from litestar.response import Redirect

from odst import __version__

CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "same-origin", "X-Frame-Options": "DENY"}
# Litestar appends "; charset=utf-8" to text/* types itself.
TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml", ".html": "text/html",
         ".png": "image/png"}
STATIC_PREFIX = "/ui/static"


@dataclass(frozen=True)
class Assets:
    """The UI's files, read once: ``files`` maps a path under ui/ to (bytes, content type)."""

    tag: str
    index: bytes
    files: dict[str, tuple[bytes, str]]


def load_assets() -> Assets:
    root = resources.files("odst.gateway") / "ui"
    files: dict[str, tuple[bytes, str]] = {}

    def walk(node, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.name.startswith("."):
                continue
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            else:
                suffix = "." + child.name.rsplit(".", 1)[-1] if "." in child.name else ""
                ctype = TYPES.get(suffix) or mimetypes.guess_type(child.name)[0] or "application/octet-stream"
                files[rel] = (child.read_bytes(), ctype)

    walk(root, "")
    digest = hashlib.sha256(__version__.encode())
    for rel, (body, _) in sorted(files.items()):
        digest.update(rel.encode() + b"\0" + hashlib.sha256(body).digest())
    tag = f"{__version__}-{digest.hexdigest()[:12]}"
    index = files.pop("index.html")[0].replace(b"{{static}}", f"{STATIC_PREFIX}/{tag}".encode())
    return Assets(tag=tag, index=index, files=files)


def ui_routes() -> list:
    """Route handlers serving the web UI: ``/`` → ``/ui/``, the shell, and its static assets."""
    assets = load_assets()

    @get("/", include_in_schema=False)
    async def root() -> Redirect:
        return Redirect("/ui/", status_code=302, headers={"Cache-Control": "no-store"})

    @get(["/ui", "/ui/"], include_in_schema=False)
    async def shell() -> Response[bytes]:
        return Response(assets.index, media_type="text/html",
                        headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    @get(STATIC_PREFIX + "/{tag:str}/{path:path}", include_in_schema=False)
    async def static(tag: str, path: str) -> Response[Any]:
        found = assets.files.get(path.lstrip("/"))
        if found is None:
            return Response({"error": "not_found", "detail": f"no UI asset {path.lstrip('/')!r}"}, status_code=404,
                            headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})
        body, ctype = found
        # An old tag (a page loaded before an upgrade) still gets today's file, but not cached.
        cache = "public, max-age=31536000, immutable" if tag == assets.tag else "no-cache"
        return Response(body, media_type=ctype, headers={**SECURITY_HEADERS, "Cache-Control": cache})

    return [root, shell, static]
