"""Distribution-point downloads: GET/HEAD /<context>/Packages/<name> and /Packages/<name>.

A raw ASGI handler (no framework body handling) streaming with os.pread in
1 MiB blocks, the fastest path measured (bench/run.py); Range, If-Range, ETag,
Last-Modified, 304/206/416 per RFC 9110 live in ``ranges``.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import re
import time
from urllib.parse import quote

import msgspec

from odst.errors import OdstError, PackageNameInvalid
from odst.naming import check_name, request_path
from odst.projections import views
from odst.store.files import content_tag
from odst.gateway.ranges import (Unsatisfiable, http_date, if_range_allows, not_modified,
                                 parse_range)

BLOCK = 1 << 20
REPAIR_RETRY_AFTER_S = 60  # Retry-After of a 503 for a package out of service here (odst.replicator.integrity)


def _headers(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in pairs]


async def _simple(send, status: int, text: str, extra: list[tuple[str, str]] = ()) -> None:
    body = text.encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": _headers([("content-type", "text/plain; charset=utf-8"),
                                     ("content-length", str(len(body))), *extra])})
    await send({"type": "http.response.body", "body": body})


def _authorised(settings, headers: dict[bytes, bytes]) -> bool:
    if settings.download_auth == "none":
        return True
    value = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, cred = value.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(cred.strip(), validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return (hmac.compare_digest(user.encode("utf-8"), settings.download_user.encode("utf-8"))
            & hmac.compare_digest(password.encode("utf-8"), settings.download_password.encode("utf-8")))


_ACCEL = re.compile(r"/[A-Za-z0-9_/-]*/")


def _accel_location(headers: dict[bytes, bytes]) -> str | None:
    """The internal location of the store in an nginx in front (deploy/nginx/odst.conf sets
    ``X-ODST-Accel-Redirect: /_odst_store/`` on the distribution point's requests, replacing
    any a client sent). With it the gateway still decides (any spelling of the name, download
    auth, the stage rule) and answers with ``X-Accel-Redirect``; nginx sends the file. A client
    that sends the header itself straight to the gateway only gets that answer back."""
    value = headers.get(b"x-odst-accel-redirect", b"").decode("latin-1")
    return value if _ACCEL.fullmatch(value) else None


def make_download_app(site, prefixes: list[str]):
    """An ASGI app serving packages under each of prefixes (e.g. '/CasperShare/Packages')."""

    async def app(scope, receive, send) -> None:
        status = 0

        async def counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                site.stats.downloads[status] += 1
            elif message["type"] == "http.response.body" and status in (200, 206):
                site.stats.bytes_served += len(message.get("body", b""))
            await send(message)
        await serve(scope, receive, counted)

    async def serve(scope, receive, send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await _simple(send, 405, "method not allowed\n", [("allow", "GET, HEAD")])
            return
        try:
            path = request_path(scope)
        except PackageNameInvalid as exc:
            await _simple(send, 400, f"{exc}\n")
            return
        name = None
        for prefix in prefixes:
            if path.startswith(prefix + "/"):
                name = path[len(prefix) + 1:]
                break
        if name is None:
            await _simple(send, 404, "not found\n")
            return
        try:
            check_name(name)
        except (OdstError, UnicodeError) as exc:
            await _simple(send, 404, f"not found: {exc}\n")
            return
        headers = dict(scope["headers"])
        if not _authorised(site.settings, headers):
            await _simple(send, 401, "authentication required\n",
                          [("www-authenticate", 'Basic realm="ODST distribution point"')])
            return
        if views.is_damaged(site.reader, name, site.id):  # never bad bytes (nor an older version): retry later
            await _simple(send, 503, "this site's copy failed its integrity check and is out of service until "
                                     "a verified copy is back; try again later\n",
                          [("retry-after", str(REPAIR_RETRY_AFTER_S))])
            return
        # any spelling of the name (naming.name_key); only while its stage is accepted here
        row = views.servable(site.reader, name, site.id, views.replicated_stages(site.reader, site.settings))
        if row is None:
            await _simple(send, 404, "no such package\n")
            return
        accel = _accel_location(headers)
        if accel:  # nginx in front sends the file, which the store names by key (Store.path)
            await send({"type": "http.response.start", "status": 200, "headers": _headers([
                ("x-accel-redirect", accel + quote(row.key)),
                ("content-type", "application/octet-stream"), ("content-length", "0")])})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            fd = os.open(site.store.path(name), os.O_RDONLY)
        except FileNotFoundError:
            await _simple(send, 404, "no such package\n")
            return
        try:
            row = _opened(site.reader, name, fd, row)
            await _serve(fd, row, method, headers, receive, send)
        finally:
            os.close(fd)

    return app


def _opened(reader, name: str, fd: int, row: views.ServedContent) -> views.ServedContent:
    """What the opened file holds, by the content label on its inode: a replacement may have
    swapped the name to a new file since the read model was asked (or the read model may
    already name the new content while this file is still the old one), and the ETag must be
    the one of these bytes. A swapped-in upload not yet in the read model is named from the
    file itself (its label, and its mtime for Last-Modified)."""
    labelled = content_tag(fd)
    if labelled is None or labelled == row.blake3:
        return row
    known = views.served_content(reader, name, labelled)
    if known is not None:
        return known
    # (only blake3 and uploaded_at name a response: _serve takes the size from the file)
    return msgspec.structs.replace(row, blake3=labelled, uploaded_at=int(os.fstat(fd).st_mtime * 1000))


async def _serve(fd: int, row: views.ServedContent, method: str, headers: dict[bytes, bytes], receive, send) -> None:
    size = os.fstat(fd).st_size
    etag = f'"{row.blake3}"'
    modified_s = min(row.uploaded_at // 1000, int(time.time()))  # never later than Date
    common = [("accept-ranges", "bytes"), ("etag", etag),
              ("last-modified", http_date(modified_s)),
              ("content-type", "application/octet-stream")]

    def h(name: bytes) -> str | None:
        v = headers.get(name)
        return v.decode("latin-1") if v is not None else None

    if not_modified(h(b"if-none-match"), h(b"if-modified-since"), etag, modified_s):
        await send({"type": "http.response.start", "status": 304, "headers": _headers(common[:3])})
        await send({"type": "http.response.body", "body": b""})
        return
    status, start, length = 200, 0, size
    extra: list[tuple[str, str]] = []
    if if_range_allows(h(b"if-range"), etag, modified_s):
        try:
            rng = parse_range(h(b"range"), size)
        except Unsatisfiable:
            await _simple(send, 416, "range not satisfiable\n",
                          [("content-range", f"bytes */{size}"), *common[:3]])
            return
        if rng is not None:
            status, start, length = 206, rng.start, rng.length
            extra.append(("content-range", f"bytes {rng.start}-{rng.end}/{size}"))
    await send({"type": "http.response.start", "status": status,
                "headers": _headers([*common, ("content-length", str(length)), *extra])})
    if method == "HEAD" or length == 0:
        await send({"type": "http.response.body", "body": b""})
        return
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
                return

    watcher = asyncio.create_task(watch()) if length > BLOCK else None
    try:
        offset, end = start, start + length
        while offset < end and not gone.is_set():
            data = os.pread(fd, min(BLOCK, end - offset), offset)
            if not data:
                break  # file shrank under us: the length promised cannot be met; close
            offset += len(data)
            await send({"type": "http.response.body", "body": data, "more_body": offset < end})
    finally:
        if watcher:
            watcher.cancel()
