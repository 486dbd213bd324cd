"""Distribution-point downloads: GET/HEAD /<context>/Packages/<name> and /Packages/<name>.

A raw ASGI app in front of the Litestar app (``Downloads.front``): a request under one of the
download prefixes never passes the framework. Range, If-Range, ETag, Last-Modified and
304/206/416 per RFC 9110 live in ``ranges``.

What a request costs is kept to what must be asked each time (bench/run.py measures it against
nginx):

* the answer for a name (servable here? damaged? which content?) comes from the read model
  once and is kept until the read model changes: ``PRAGMA data_version`` (one call, no table
  read) moves whenever another connection commits, i.e. at every fold, so a package deleted,
  demoted, replaced or withdrawn stops being served by the first request after the fold
  (read through ``ReadModelWatch``: one stat of the write-ahead log while it is unchanged);
* the package file stays open between requests, keyed by the identity of the inode its path
  names (one ``stat`` a request): a replacement renames a new file over the name, the stat
  sees another inode and the new file is opened, its ETag read from the label
  (``user.odst.blake3``) of the inode actually opened; the old descriptor closes when the
  last response reading it ends;
* the headers of a file are built once per opened file and answer;
* the body goes by ``sendfile`` when the server offers the ASGI zero-copy extension
  (``gateway.protocol`` does), else by ``pread`` in 1 MiB blocks;
* the plain case (a GET of a servable package, whole or one range, no conditional headers,
  no Mac download caps set, no nginx in front) is decided without the ASGI cycle:
  ``gateway.protocol`` asks ``quick`` from the parser's callback and sends the head and the
  file itself, without a task per request (``protocol._Quick``). Whatever ``quick`` declines
  (None) takes the ASGI path below, which answers every case.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import os
import re
import resource
import time
from urllib.parse import quote

from odst.errors import OdstError, PackageNameInvalid
from odst.naming import check_name, request_path
from odst.projections import views
from odst.store.files import content_tag
from odst.gateway.protocol import ZEROCOPY
from odst.gateway.ranges import (Unsatisfiable, http_date, if_range_allows, not_modified,
                                 parse_range)

BLOCK = 1 << 20
REPAIR_RETRY_AFTER_S = 60  # Retry-After of a 503 for a package out of service here (odst.replicator.integrity)
MAX_CACHED = 4096  # names (answers) and open files kept; past it the cache starts again


def max_open_files() -> int:
    """Package files kept open at most: MAX_CACHED, but never more than a quarter of the
    process's descriptor limit (``odst serve`` started from a shell gets 1024 on Linux, 256 on
    macOS): the held files must leave room for connections, the broker and SQLite."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return MAX_CACHED if soft == resource.RLIM_INFINITY else max(8, min(MAX_CACHED, soft // 4))
IDLE_CLOSE_S = 10.0  # an open file no request used for this long is closed (a deleted one frees its space)

_OCTETS = (b"content-type", b"application/octet-stream")
_ACCEPT_RANGES = (b"accept-ranges", b"bytes")


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


def content_named(reader, name: str, labelled: str | None, row: views.ServedContent,
                  mtime_ms: int) -> tuple[str, int]:
    """(blake3, uploaded_at ms) of the bytes an opened file holds, by its content label
    (``labelled``, ``store.files.content_tag``): the read model's ``row`` unless the label names
    other content, which is then looked up; a swapped-in upload not yet folded is named from its
    label and ``mtime_ms``."""
    if labelled is None or labelled == row.blake3:
        return row.blake3, row.uploaded_at
    known = views.served_content(reader, name, labelled)
    return labelled, (known.uploaded_at if known is not None else mtime_ms)


class ReadModelWatch:
    """The read model's ``PRAGMA data_version`` (it moves whenever another connection commits:
    at every fold), for one ``stat`` of its write-ahead log while nothing was written to it.

    The PRAGMA takes and drops a read lock (two ``fcntl``) and runs a statement: under 32
    connections of 1 MiB ranges it was the largest Python cost per request left. In WAL mode
    every commit writes to ``<db>-wal``, and a write sets the file's mtime to the (coarse, at
    most a jiffy late) wall clock. So the version last read stays true while the log's
    (inode, size, mtime) is what a stat showed just before that read AND that mtime is older
    than the read by more than ``MARGIN_NS``: a commit after the read would have set an mtime
    no earlier than the read less one tick, which differs. Anything else (a recent write, no
    log, a stat that fails) reads the PRAGMA."""

    MARGIN_NS = 50_000_000  # five times the coarsest timestamp tick (HZ=100)

    def __init__(self, reader, clock=time.time_ns) -> None:
        self.reader, self.clock = reader, clock
        row = reader.execute("PRAGMA database_list").fetchone()
        mode = reader.execute("PRAGMA journal_mode").fetchone()[0]
        self.wal = f"{row[2]}-wal" if row is not None and row[2] and mode == "wal" else None
        self._key = None
        self._read_ns = 0
        self._version = None

    def version(self) -> int:
        key = None
        if self.wal is not None:
            try:
                st = os.stat(self.wal)
            except OSError:
                pass
            else:
                key = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
                if key == self._key and st.st_mtime_ns < self._read_ns - self.MARGIN_NS:
                    return self._version
        read_ns = self.clock()
        self._version = self.reader.execute("PRAGMA data_version").fetchone()[0]
        self._key, self._read_ns = key, read_ns
        return self._version


class _Answer:
    """What the read model says about a name here, until it changes: 404, 503 (out of service
    for repair) or 200 with the row of the content served."""

    __slots__ = ("status", "row", "path", "text")

    def __init__(self, status: int, row=None, path: str = "", text: str = "") -> None:
        self.status, self.row, self.path, self.text = status, row, path, text


class _File:
    """One opened package file, shared by the responses reading it. ``ident`` is what a stat of
    its path must still show for the name to mean this inode; ``labels`` caches, per read-model
    row, the ETag, Last-Modified and headers of these bytes."""

    __slots__ = ("fd", "ident", "size", "tag", "mtime_ms", "users", "retired", "labels", "used")

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.fd = fd
        self.ident = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        self.size = st.st_size
        self.mtime_ms = int(st.st_mtime * 1000)
        self.tag = content_tag(fd)
        self.users = 0
        self.used = time.monotonic()
        self.retired = False
        self.labels: dict[tuple, _Label] = {}

    def release(self) -> None:
        self.users -= 1
        if self.retired and self.users == 0:
            os.close(self.fd)

    def retire(self) -> None:
        self.retired = True
        if self.users == 0:
            os.close(self.fd)


def _wire(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """Header fields as they go on the wire, each line ending in CRLF."""
    return b"".join(name + b": " + value + b"\r\n" for name, value in pairs)


class _Label:
    """ETag, Last-Modified (seconds) and the headers every answer of these bytes carries, as
    pairs for the ASGI path and as wire bytes for a quick answer (``Quick.head``): formatting
    them once per opened file and read-model version, not per request."""

    __slots__ = ("etag", "modified_s", "common", "full", "until", "wire_common", "wire_full")

    def __init__(self, blake3: str, uploaded_at_ms: int, size: int) -> None:
        now = int(time.time())
        self.etag = f'"{blake3}"'
        self.modified_s = min(uploaded_at_ms // 1000, now)  # never later than Date
        # a date in the future is capped at now: such a label is built again next second
        self.until = now + 1 if uploaded_at_ms // 1000 > now else None
        self.common = [_ACCEPT_RANGES, (b"etag", self.etag.encode("latin-1")),
                       (b"last-modified", http_date(self.modified_s).encode("latin-1")), _OCTETS]
        self.full = [*self.common, (b"content-length", str(size).encode("latin-1"))]
        self.wire_common, self.wire_full = _wire(self.common), _wire(self.full)


class Downloads:
    """The distribution point: an ASGI app serving packages under each of ``prefixes``
    (e.g. '/CasperShare/Packages'). ``site`` is the GatewayContext; ``wrap`` (egress caps)
    wraps the app for GETs."""

    def __init__(self, site, prefixes: list[str], wrap=None) -> None:
        self.site = site
        self.prefixes = [p.rstrip("/") for p in prefixes]
        self._starts = tuple(p + "/" for p in self.prefixes)
        self._version = None  # the read model's data_version the answers were read at
        self._answers: dict[str, _Answer] = {}
        self._files: dict[str, _File] = {}  # by store path
        self._sweep: asyncio.TimerHandle | None = None  # closes idle files
        self._watch: ReadModelWatch | None = None  # made at the first request (the reader is open)
        self.app = wrap(self.serve) if wrap is not None else self.serve

    # -- dispatch ----------------------------------------------------------------------------

    def serves(self, path: str) -> bool:
        return path.startswith(self._starts) or path in self.prefixes

    def front(self, app):
        """An ASGI app sending download paths here and everything else to ``app``."""
        downloads = self.app

        async def front(scope, receive, send) -> None:
            if scope["type"] == "http" and self.serves(scope["path"]):
                await downloads(scope, receive, send)
            else:
                await app(scope, receive, send)
        front.quick = self.quick  # what gateway.protocol looks for (see quick)
        return front

    # -- the read model, cached until it changes ---------------------------------------------

    def _answer(self, name: str) -> _Answer:
        reader = self.site.reader
        if self._watch is None or self._watch.reader is not reader:
            self._watch = ReadModelWatch(reader)
        version = self._watch.version()
        if version != self._version:
            self._answers.clear()
            self._version = version
        answer = self._answers.get(name)
        if answer is None:
            answer = self._ask(name)
            if answer.status == 400:
                # not a name: nothing to save by keeping it, and a request head may carry a
                # 64 KiB one (4096 of them held 240 MB until the next fold)
                return answer
            if len(self._answers) >= MAX_CACHED:
                self._answers.clear()
            self._answers[name] = answer
        return answer

    def _ask(self, name: str) -> _Answer:
        site = self.site
        try:
            check_name(name)
        except (OdstError, UnicodeError) as exc:
            return _Answer(400, text=f"not found: {exc}\n")  # answered 404, before the auth check
        if views.is_damaged(site.reader, name, site.id):  # never bad bytes (nor an older version)
            return _Answer(503)
        # any spelling of the name (naming.name_key); only while its stage is accepted here
        row = views.servable(site.reader, name, site.id, views.replicated_stages(site.reader, site.settings))
        if row is None:
            return _Answer(404, text="no such package\n")
        return _Answer(200, row, str(site.store.path(name)))

    # -- open files, by the identity of the inode their path names -----------------------------

    def _open(self, path: str) -> _File | None:
        """The open file ``path`` names now (None: no such file); stat, and open only when the
        name points at another inode than the one held."""
        held = self._files.get(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if held is not None:
                del self._files[path]
                held.retire()
            return None
        if held is not None and held.ident == (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns,
                                               st.st_ctime_ns):
            return held
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        opened = _File(fd)
        if held is not None:
            held.retire()
        elif len(self._files) >= max_open_files():
            for old in self._files.values():
                old.retire()
            self._files.clear()
        self._files[path] = opened
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._close_idle)
        return opened

    def _close_idle(self) -> None:
        """Close the files no response read for IDLE_CLOSE_S: a package deleted (its file
        unlinked) while no one asks for it again must not keep its disk space."""
        self._sweep = None
        now = time.monotonic()
        for path, file in list(self._files.items()):
            if file.users == 0 and now - file.used >= IDLE_CLOSE_S:
                del self._files[path]
                file.retire()
        if self._files:
            self._sweep = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._close_idle)

    def _label(self, name: str, file: _File, row) -> _Label:
        """What the opened file holds, by the content label on its inode: a replacement may have
        swapped the name to a new file since the read model was asked (or the read model may
        already name the new content while this file is still the old one), and the ETag must be
        the one of these bytes. A swapped-in upload not yet in the read model is named from the
        file itself (its label, and its mtime for Last-Modified)."""
        key = (self._version, row.blake3, row.uploaded_at)  # served_content may change too
        label = file.labels.get(key)
        if label is not None and (label.until is None or time.time() < label.until):
            return label
        blake3, uploaded_at = content_named(self.site.reader, name, file.tag, row, file.mtime_ms)
        label = _Label(blake3, uploaded_at, file.size)
        if len(file.labels) >= 8:  # older read-model versions
            file.labels.clear()
        file.labels[key] = label
        return label

    # -- the request -------------------------------------------------------------------------

    def _name_in(self, path: str) -> str | None:
        """The package name a download path asks for (None: not under a served prefix)."""
        for start in self._starts:
            if path.startswith(start):
                return path[len(start):]
        return None

    def quick(self, scope) -> "Quick | None":
        """The plain GET decided at once, for the server to send without the ASGI cycle
        (``gateway.protocol``): what to send, or None when the request takes the ASGI path
        (``serve``), which answers every case. Only a 200 or 206 with a body, no conditional
        request headers, download auth passed, no ``X-ODST-Accel-Redirect``, and no download
        cap set (``egress``: a cap may refuse or pace, which the ASGI wrapper does). The file's
        ``users`` count is taken for the caller, who calls ``Quick.done`` at the end."""
        gate = self.site.download_gate
        if scope["method"] != "GET" or not self.serves(scope["path"]):
            return None
        if gate is not None:
            caps = gate.caps()
            if caps.egress_bps or caps.max_concurrent or caps.per_client:
                return None
        try:
            path = request_path(scope)
        except PackageNameInvalid:
            return None
        name = self._name_in(path)
        if name is None:
            return None
        answer = self._answer(name)
        if answer.status != 200:
            return None
        headers = dict(scope["headers"])
        if (b"if-none-match" in headers or b"if-modified-since" in headers
                or b"x-odst-accel-redirect" in headers):
            return None
        if self.site.settings.download_auth != "none" and not _authorised(self.site.settings, headers):
            return None
        file = self._open(answer.path)
        if file is None:
            return None
        file.users += 1
        file.used = time.monotonic()
        try:
            label = self._label(name, file, answer.row)
            status, start, length = self._extent(file, label, headers)
        except Unsatisfiable:
            file.release()
            return None
        except BaseException:
            file.release()
            raise
        if length == 0:
            file.release()
            return None
        self.site.stats.downloads[status] += 1
        head = label.wire_full if status == 200 else label.wire_common + _range_wire(start, length, file.size)
        return Quick(self, file, status, head, start, length, gate)

    def _extent(self, file: _File, label: _Label, headers: dict[bytes, bytes]) -> tuple[int, int, int]:
        """(status, start, length) of a GET or HEAD past the conditional checks: the whole
        file, or the one range asked (Unsatisfiable: a 416)."""
        size = file.size
        if b"range" in headers:
            v = headers.get(b"if-range")
            if if_range_allows(v.decode("latin-1") if v is not None else None, label.etag, label.modified_s):
                rng = parse_range(headers[b"range"].decode("latin-1"), size)
                if rng is not None:
                    return 206, rng.start, rng.length
        return 200, 0, size

    def _body(self, file: _File, label: _Label, headers: dict[bytes, bytes]):
        """(status, start, length, head) of ``_extent``, with the head's header pairs."""
        status, start, length = self._extent(file, label, headers)
        if status == 200:
            return status, start, length, label.full
        return status, start, length, [*label.common, *_range_fields(start, length, file.size)]

    async def serve(self, scope, receive, send) -> None:
        stats = self.site.stats
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            return await self._refuse(send, 405, "method not allowed\n", [("allow", "GET, HEAD")])
        try:
            path = request_path(scope)
        except PackageNameInvalid as exc:
            return await self._refuse(send, 400, f"{exc}\n")
        name = self._name_in(path)
        if name is None:
            return await self._refuse(send, 404, "not found\n")
        answer = self._answer(name)
        if answer.status == 400:  # not a package name at all
            return await self._refuse(send, 404, answer.text)
        headers = dict(scope["headers"])
        if self.site.settings.download_auth != "none" and not _authorised(self.site.settings, headers):
            return await self._refuse(send, 401, "authentication required\n",
                                      [("www-authenticate", 'Basic realm="ODST distribution point"')])
        if answer.status == 503:
            return await self._refuse(send, 503, "this site's copy failed its integrity check and is out of "
                                                 "service until a verified copy is back; try again later\n",
                                      [("retry-after", str(REPAIR_RETRY_AFTER_S))])
        if answer.status != 200:
            return await self._refuse(send, 404, answer.text)
        accel = _accel_location(headers)
        if accel:  # nginx in front sends the file, which the store names by key (Store.path)
            stats.downloads[200] += 1
            await send({"type": "http.response.start", "status": 200, "headers": _headers([
                ("x-accel-redirect", accel + quote(answer.row.key)),
                ("content-type", "application/octet-stream"), ("content-length", "0")])})
            await send({"type": "http.response.body", "body": b""})
            return
        file = self._open(answer.path)
        if file is None:
            return await self._refuse(send, 404, "no such package\n")
        file.users += 1
        file.used = time.monotonic()
        try:
            label = self._label(name, file, answer.row)
            await self._send(scope, file, label, method, headers, receive, send)
        finally:
            file.release()

    async def _refuse(self, send, status: int, text: str, extra: list[tuple[str, str]] = ()) -> None:
        self.site.stats.downloads[status] += 1
        await _simple(send, status, text, extra)

    async def _send(self, scope, file: _File, label: _Label, method: str, headers: dict[bytes, bytes],
                    receive, send) -> None:
        stats = self.site.stats
        size = file.size
        etag, modified_s = label.etag, label.modified_s

        def h(name: bytes) -> str | None:
            v = headers.get(name)
            return v.decode("latin-1") if v is not None else None

        if ((b"if-none-match" in headers or b"if-modified-since" in headers)
                and not_modified(h(b"if-none-match"), h(b"if-modified-since"), etag, modified_s)):
            stats.downloads[304] += 1
            await send({"type": "http.response.start", "status": 304, "headers": label.common[:3]})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            status, start, length, head = self._body(file, label, headers)
        except Unsatisfiable:
            stats.downloads[416] += 1
            await send({"type": "http.response.start", "status": 416, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"22"),
                (b"content-range", f"bytes */{size}".encode("latin-1")), *label.common[:3]]})
            await send({"type": "http.response.body", "body": b"range not satisfiable\n"})
            return
        stats.downloads[status] += 1
        if method == "HEAD" or length == 0:
            await send({"type": "http.response.start", "status": status, "headers": head})
            await send({"type": "http.response.body", "body": b""})
        elif ZEROCOPY in (scope.get("extensions") or ()):
            # ZEROCOPY in the start: the body follows at once, so the head may wait for it
            await send({"type": "http.response.start", "status": status, "headers": head, ZEROCOPY: True})
            await send({"type": ZEROCOPY, "file": file.fd, "offset": start, "count": length})
            stats.bytes_served += length
        else:
            await send({"type": "http.response.start", "status": status, "headers": head})
            await _pread_body(file.fd, start, length, receive, send, stats)


def _range_fields(start: int, length: int, size: int) -> list[tuple[bytes, bytes]]:
    """Content-Length and Content-Range of a 206 of ``length`` bytes from ``start``."""
    return [(b"content-length", str(length).encode("latin-1")),
            (b"content-range", f"bytes {start}-{start + length - 1}/{size}".encode("latin-1"))]


def _range_wire(start: int, length: int, size: int) -> bytes:
    """``_range_fields`` as wire bytes, formatted in one step (a quick answer's per-request part)."""
    return b"content-length: %d\r\ncontent-range: bytes %d-%d/%d\r\n" % (length, start, start + length - 1, size)


class Quick:
    """A GET decided by ``Downloads.quick``: ``status`` and ``head`` (the answer's own header
    fields, as wire bytes: each line with its CRLF, without the status line, the server's
    default fields and the blank line that ends the head), ``length`` bytes of ``fd`` from
    ``start``. The server calls ``done`` once, with the bytes it sent."""

    __slots__ = ("_downloads", "_file", "_gate", "status", "head", "fd", "start", "length")

    def __init__(self, downloads: Downloads, file: _File, status: int, head, start: int, length: int,
                 gate) -> None:
        self._downloads, self._file, self._gate = downloads, file, gate
        self.status, self.head, self.fd, self.start, self.length = status, head, file.fd, start, length
        if gate is not None:  # counted as the egress wrapper counts (GET /api/v1/bandwidth shows them)
            gate.active += 1
            gate.peak = max(gate.peak, gate.active)

    def done(self, sent: int) -> None:
        self._file.release()
        self._downloads.site.stats.bytes_served += sent
        gate = self._gate
        if gate is not None:
            gate.active -= 1
            gate.meter.add(sent, gate.clock())


async def _pread_body(fd: int, start: int, length: int, receive, send, stats) -> None:
    """The body in 1 MiB blocks read with pread (a server without the zero-copy extension)."""
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
            stats.bytes_served += len(data)
            await send({"type": "http.response.body", "body": data, "more_body": offset < end})
    finally:
        if watcher:
            watcher.cancel()
