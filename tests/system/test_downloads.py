"""The distribution point against a real ``odst serve``: what a managed Mac sees.

GET/HEAD /<context>/Packages/<name> and /Packages/<name>, with Range, If-Range,
ETag, Last-Modified, 206/304/416 as RFC 9110 says, hostile paths, the
configurable context and optional HTTP Basic download auth.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client as httpclient
import os
import random
import re
import socket
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.wait import wait_until
from tests.conftest import SiteProcess, free_port

MiB = 1 << 20

pytestmark = pytest.mark.timeout(120)

BIG = "Office Suite 2026.pkg"   # > 3 blocks of 1 MiB, a space in its name
SMALL = "small.pkg"             # a few hundred KB, for the many Range cases
EMPTY = "empty.pkg"             # zero bytes


@dataclass
class Dist:
    site: SiteProcess
    files: dict[str, bytes]
    started: float

    def url(self, name: str, prefix: str = "/CasperShare/Packages") -> str:
        return f"{prefix}/{quote(name)}"


def _bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """One site for the read-only download tests, with three packages uploaded."""
    site = SiteProcess(data=tmp_path_factory.mktemp("dist") / "site", port=free_port())
    started = time.time()
    site.start()
    files = {BIG: _bytes(3 * MiB + 4321, 1), SMALL: _bytes(300_000, 2), EMPTY: b""}
    try:
        with site.client() as c:
            for name, data in files.items():
                r = c.put(f"/api/v1/packages/{quote(name, safe='')}", content=data)
                assert r.status_code == 201, r.text
        yield Dist(site, files, started)
    finally:
        site.stop()


@pytest.fixture(scope="module")
def anon(dist):
    """An anonymous client, as a Mac would be."""
    with httpx.Client(base_url=dist.site.url, timeout=30) as c:
        yield c


def raw(site: SiteProcess, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A request with the path sent exactly as written (no client-side normalisation)."""
    conn = httpclient.HTTPConnection("127.0.0.1", site.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def assert_partial(r: httpx.Response, data: bytes, start: int, end: int) -> None:
    assert r.status_code == 206, (r.status_code, r.headers)
    assert r.headers["content-range"] == f"bytes {start}-{end}/{len(data)}"
    assert int(r.headers["content-length"]) == end - start + 1
    assert r.content == data[start:end + 1]


def assert_whole(r: httpx.Response, data: bytes) -> None:
    assert r.status_code == 200, (r.status_code, r.headers)
    assert "content-range" not in r.headers
    assert int(r.headers["content-length"]) == len(data)
    assert r.content == data


def assert_unsatisfiable(r: httpx.Response, size: int) -> None:
    assert r.status_code == 416, (r.status_code, r.headers)
    assert r.headers["content-range"] == f"bytes */{size}"


# ---------------------------------------------------------------- whole files

@pytest.mark.parametrize("prefix", ["/CasperShare/Packages", "/Packages"])
@pytest.mark.parametrize("name", [BIG, SMALL])
def test_full_download_on_both_paths(dist, anon, prefix, name):
    data = dist.files[name]
    r = anon.get(dist.url(name, prefix))
    assert_whole(r, data)
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha1(r.content).hexdigest() == hashlib.sha1(data).hexdigest()


def test_head_has_the_headers_of_get_and_no_body(dist, anon):
    data = dist.files[BIG]
    got = anon.get(dist.url(BIG))
    # Same connection: if HEAD leaked a body, the GET after it would be garbled.
    conn = httpclient.HTTPConnection("127.0.0.1", dist.site.port, timeout=30)
    try:
        conn.request("HEAD", dist.url(BIG))
        head = conn.getresponse()
        assert head.status == 200
        assert head.read() == b""
        assert int(head.getheader("content-length")) == len(data)
        for h in ("etag", "last-modified", "accept-ranges", "content-type"):
            assert head.getheader(h) == got.headers[h], h
        conn.request("HEAD", dist.url(BIG), headers={"Range": "bytes=10-19"})
        head = conn.getresponse()
        assert head.status == 206 and head.read() == b""
        assert head.getheader("content-range") == f"bytes 10-19/{len(data)}"
        assert head.getheader("content-length") == "10"
        conn.request("GET", dist.url(SMALL))
        after = conn.getresponse()
        assert after.status == 200 and after.read() == dist.files[SMALL]
    finally:
        conn.close()


def test_strong_etag_and_last_modified(dist, anon):
    r1, r2 = anon.get(dist.url(SMALL)), anon.head(f"/Packages/{SMALL}")
    etag = r1.headers["etag"]
    assert re.fullmatch(r'"[\x21\x23-\x7e]+"', etag), etag  # quoted, not W/
    assert r2.headers["etag"] == etag  # stable, and the same on both paths
    assert anon.get(dist.url(BIG)).headers["etag"] != etag  # different content, different tag

    lm = r1.headers["last-modified"]
    assert lm.endswith(" GMT") and r2.headers["last-modified"] == lm
    when = parsedate_to_datetime(lm).timestamp()
    assert dist.started - 2 <= when <= time.time() + 1


def test_large_ranges_across_block_boundaries_and_in_parallel(dist, anon):
    data = dist.files[BIG]
    assert_partial(anon.get(dist.url(BIG), headers={"Range": f"bytes={MiB - 5}-{MiB + 5}"}),
                   data, MiB - 5, MiB + 5)
    assert_partial(anon.get(dist.url(BIG), headers={"Range": "bytes=100-"}), data, 100, len(data) - 1)
    assert_partial(anon.get(dist.url(BIG), headers={"Range": f"bytes={2 * MiB}-{3 * MiB - 1}"}),
                   data, 2 * MiB, 3 * MiB - 1)

    # Eight clients at once, each its own slice.
    spans = [(i * 400_000 + 7, i * 400_000 + 7 + 500_000) for i in range(8)]
    results: dict[int, tuple[int, bytes, str]] = {}

    def fetch(i, start, end):
        with httpx.Client(base_url=dist.site.url, timeout=30) as c:
            r = c.get(dist.url(BIG), headers={"Range": f"bytes={start}-{end}"})
            results[i] = (r.status_code, r.content, r.headers.get("content-range"))
    threads = [threading.Thread(target=fetch, args=(i, *s)) for i, s in enumerate(spans)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, (start, end) in enumerate(spans):
        status, body, content_range = results[i]
        end = min(end, len(data) - 1)  # the last span runs past the end: clamped
        assert status == 206 and body == data[start:end + 1]
        assert content_range == f"bytes {start}-{end}/{len(data)}"


def test_client_that_hangs_up_mid_download_does_not_hurt(dist, anon):
    data = dist.files[BIG]
    for _ in range(3):
        with httpx.Client(base_url=dist.site.url, timeout=30) as c:
            with c.stream("GET", dist.url(BIG)) as r:
                assert r.status_code == 200
                got = 0
                for piece in r.iter_raw():
                    got += len(piece)
                    if got > 200_000:
                        break  # leave with most of the file unread
    assert httpx.get(f"{dist.site.url}/healthz", timeout=10).status_code == 200
    assert_whole(anon.get(dist.url(BIG)), data)


# ---------------------------------------------------------------- Range

SIZE = 300_000
RANGE_CASES = [
    # header, expected: (start, end) for 206, None for 200 with the whole file, 416 for 416
    ("bytes=0-0", (0, 0)),
    ("bytes=10-20", (10, 20)),
    ("bytes=-100", (SIZE - 100, SIZE - 1)),
    ("bytes=100-", (100, SIZE - 1)),
    ("bytes=0-", (0, SIZE - 1)),
    (f"bytes={SIZE - 10}-{SIZE * 10}", (SIZE - 10, SIZE - 1)),       # end beyond size: clamped
    (f"bytes=0-{SIZE}", (0, SIZE - 1)),
    (f"bytes={SIZE - 1}-{SIZE - 1}", (SIZE - 1, SIZE - 1)),          # exactly the last byte
    (f"bytes={SIZE - 1}-", (SIZE - 1, SIZE - 1)),
    ("bytes=-1", (SIZE - 1, SIZE - 1)),
    (f"bytes=-{SIZE * 2}", (0, SIZE - 1)),                           # suffix longer than the file
    ("bytes=00-09", (0, 9)),
    ("BYTES=5-6", (5, 6)),                                           # the unit is case-insensitive
    (f"bytes={SIZE}-", 416),                                          # start at size
    (f"bytes={SIZE}-{SIZE + 10}", 416),
    ("bytes=99999999999-", 416),
    ("bytes=-0", 416),
    ("bytes=abc", None),                                              # invalid: ignored
    ("bytes=20-10", None),
    ("bytes=0-1,5-6", None),                                          # multi-range: whole file
    ("bytes=0-1, 3-4", None),
    ("items=0-1", None),
    ("bytes", None),
    ("bytes=", None),
    ("bytes=-", None),
    ("0-10", None),
    ("bytes=1-2-3", None),
    ("bytes=0x10-20", None),
    ("bytes=+1-2", None),
    ("bytes=1.5-2", None),
    ("bytes=\u00b2-5", None),                                         # '²' is no DIGIT (RFC 5234)
    ("bytes=0-\u00b3", None),
    ("bytes=-\u00b9", None),
]


@pytest.mark.parametrize("header,expected", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_range(dist, anon, header, expected):
    data = dist.files[SMALL]
    assert len(data) == SIZE
    r = anon.get(dist.url(SMALL), headers={"Range": header.encode("latin-1")})
    assert r.status_code != 500, r.text
    if expected is None:
        assert_whole(r, data)
    elif expected == 416:
        assert_unsatisfiable(r, SIZE)
        assert data[:64] not in r.content
    else:
        assert_partial(r, data, *expected)
        assert r.headers["etag"] == anon.head(dist.url(SMALL)).headers["etag"]


def test_if_range(dist, anon):
    data = dist.files[SMALL]
    head = anon.head(dist.url(SMALL)).headers
    etag, lm = head["etag"], head["last-modified"]

    def get(if_range: str) -> httpx.Response:
        return anon.get(dist.url(SMALL), headers={"Range": "bytes=10-20", "If-Range": if_range})

    assert_partial(get(etag), data, 10, 20)              # still the same file: the range
    assert_whole(get('"not-the-current-etag"'), data)    # changed: the whole file
    assert_whole(get("W/" + etag), data)                 # weak tags never match in If-Range
    assert_partial(get(lm), data, 10, 20)                # the exact Last-Modified date
    assert_whole(get(formatdate(parsedate_to_datetime(lm).timestamp() - 86400, usegmt=True)), data)
    assert_whole(get("yesterday"), data)
    # If-Range without Range is just a GET.
    assert_whole(anon.get(dist.url(SMALL), headers={"If-Range": etag}), data)
    # A matching If-Range with an unsatisfiable range is still 416.
    r = anon.get(dist.url(SMALL), headers={"Range": f"bytes={SIZE}-", "If-Range": etag})
    assert_unsatisfiable(r, SIZE)


def test_conditional_get(dist, anon):
    data = dist.files[SMALL]
    head = anon.head(dist.url(SMALL)).headers
    etag, lm = head["etag"], head["last-modified"]

    for inm in (etag, f'"other", {etag}', "*", "W/" + etag):  # If-None-Match compares weakly
        r = anon.get(dist.url(SMALL), headers={"If-None-Match": inm})
        assert r.status_code == 304, inm
        assert r.content == b"" and r.headers["etag"] == etag
    r = anon.head(dist.url(SMALL), headers={"If-None-Match": etag})
    assert r.status_code == 304
    assert_whole(anon.get(dist.url(SMALL), headers={"If-None-Match": '"other"'}), data)

    r = anon.get(dist.url(SMALL), headers={"If-Modified-Since": lm})
    assert r.status_code == 304 and r.content == b""
    earlier = formatdate(parsedate_to_datetime(lm).timestamp() - 3600, usegmt=True)
    assert_whole(anon.get(dist.url(SMALL), headers={"If-Modified-Since": earlier}), data)
    assert_whole(anon.get(dist.url(SMALL), headers={"If-Modified-Since": "garbage"}), data)
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.1.3).
    assert_whole(anon.get(dist.url(SMALL), headers={"If-None-Match": '"other"', "If-Modified-Since": lm}),
                 data)


# ---------------------------------------------------------------- methods, unknown and hostile names

@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_only_get_and_head(dist, anon, method):
    r = anon.request(method, dist.url(SMALL), content=b"x")
    assert r.status_code == 405
    assert set(re.split(r"\s*,\s*", r.headers["allow"])) >= {"GET", "HEAD"}
    assert_whole(anon.get(dist.url(SMALL)), dist.files[SMALL])


def test_unknown_and_deleted_packages_are_404(dist, anon):
    for path in ("/CasperShare/Packages/nope.pkg", "/Packages/nope.pkg", "/CasperShare/Packages/"):
        assert anon.get(path).status_code == 404, path
        assert anon.head(path).status_code == 404, path
    with dist.site.client() as admin:
        assert admin.put("/api/v1/packages/gone.pkg", content=b"soon gone").status_code == 201
        assert anon.get("/Packages/gone.pkg").content == b"soon gone"
        assert admin.delete("/api/v1/packages/gone.pkg").status_code == 200
    for path in ("/CasperShare/Packages/gone.pkg", "/Packages/gone.pkg"):
        assert anon.get(path).status_code == 404
        assert anon.get(path, headers={"Range": "bytes=0-1"}).status_code == 404


def test_the_inode_under_the_name_decides_the_bytes_and_the_etag(dist, anon):
    """The gateway keeps a package's file open between requests and its answer until the read
    model changes: a name asked for before its upload is served once the upload is folded. A file renamed over the name (what the replicator's swap does before its
    PackageAvailable is folded) is served at once, named by its own label; a file gone from
    the store is 404 at once, though a descriptor of it was held."""
    from odst.naming import name_key
    from odst.store.files import CONTENT_ATTR
    from odst.store.hashing import manifest_of

    name, old, new = "held open.pkg", _bytes(2 * MiB + 11, 7), _bytes(MiB + 5, 8)
    path = dist.site.data / "store" / "packages" / name_key(name)
    with dist.site.client() as admin:
        assert anon.get(dist.url(name)).status_code == 404  # an answer kept until the next fold
        assert admin.put(f"/api/v1/packages/{quote(name)}", content=old).status_code == 201
        try:
            for _ in range(2):  # the second answer comes from what the first one kept
                r = anon.get(dist.url(name))
                assert_whole(r, old)
                assert r.headers["etag"] == f'"{manifest_of([old]).blake3}"'
            swapped = path.with_name("swap.part")
            swapped.write_bytes(new)
            os.setxattr(swapped, CONTENT_ATTR, manifest_of([new]).blake3.encode())
            os.replace(swapped, path)
            r = anon.get(dist.url(name))
            assert_whole(r, new)
            assert r.headers["etag"] == f'"{manifest_of([new]).blake3}"'
            assert_partial(anon.get(dist.url(name), headers={"Range": "bytes=-100"}), new, len(new) - 100, len(new) - 1)
            path.unlink()
            assert anon.get(dist.url(name)).status_code == 404
            assert anon.head(dist.url(name)).status_code == 404
        finally:
            assert admin.delete(f"/api/v1/packages/{quote(name)}").status_code == 200


def test_a_client_with_a_tiny_window_gets_every_byte_in_order(dist):
    """Bodies go by sendfile until the socket is full, then a block through the transport, then
    sendfile again: a client with a 4 KiB receive buffer (the socket is full all the time) must
    still get the exact bytes, twice on one connection."""
    data = dist.files[BIG]
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect(("127.0.0.1", dist.site.port))
        f = s.makefile("rb", buffering=0)
        for first in (0, 12345):
            s.sendall(f"GET {dist.url(BIG)} HTTP/1.1\r\nHost: x\r\nRange: bytes={first}-\r\n\r\n".encode())
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += f.read(1)
            assert head.startswith(b"HTTP/1.1 206"), head
            got = bytearray()
            while len(got) < len(data) - first:
                piece = f.read(min(4096, len(data) - first - len(got)))
                assert piece, f"connection closed after {len(got)} bytes"
                got += piece
            assert hashlib.sha256(got).digest() == hashlib.sha256(data[first:]).digest()


def _read_response(f, body: bool = True) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response, not chunked, from a socket file: (head, body); ``body``
    False for the answer to a HEAD."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        c = f.read(1)
        assert c, f"connection closed in a head: {head!r}"
        head += c
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    length = int(length.group(1)) if length else 0  # a 304 has none
    got = bytearray()
    while body and len(got) < length:
        piece = f.read(min(65536, length - len(got)))
        assert piece, f"connection closed after {len(got)} of {length} bytes"
        got += piece
    return head, bytes(got)


def test_pipelined_requests_behind_a_download_still_being_sent_answer_in_order(dist):
    """A plain GET is answered from the parser's callback (protocol._send_quick); what the
    socket cannot take at once goes on in a task, and requests pipelined behind it (quick
    ones, a conditional one, a HEAD and one for the Litestar app) must wait for it and be
    answered in order, each with its own bytes."""
    name, big, small = "pipelined.pkg", _bytes(10 * MiB + 17, 7), dist.files[SMALL]
    # larger than the most a loopback socket buffers (tcp_wmem's 4 MiB), so sendfile fills it
    with dist.site.client() as admin:
        assert admin.put(f"/api/v1/packages/{name}", content=big).status_code == 201
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(30)
        s.connect(("127.0.0.1", dist.site.port))
        f = s.makefile("rb", buffering=0)
        s.sendall(f"HEAD {dist.url(SMALL)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head, _ = _read_response(f, body=False)
        etag = re.search(rb"(?i)\r\netag: *(\S+)", head).group(1).decode()
        asks = [
            (f"GET {dist.url(name)} HTTP/1.1", "", b"HTTP/1.1 200", big),
            (f"GET {dist.url(SMALL)} HTTP/1.1", "Range: bytes=1000-1999\r\n", b"HTTP/1.1 206", small[1000:2000]),
            ("GET /healthz HTTP/1.1", "", b"HTTP/1.1 200", None),
            (f"GET {dist.url(SMALL)} HTTP/1.1", f"If-None-Match: {etag}\r\n", b"HTTP/1.1 304", b""),
            (f"GET {dist.url(name)} HTTP/1.1", "Range: bytes=5-\r\n", b"HTTP/1.1 206", big[5:]),
            (f"GET {dist.url(SMALL)} HTTP/1.1", "", b"HTTP/1.1 200", small),
        ]
        s.sendall(b"".join(f"{line}\r\nHost: x\r\n{extra}\r\n".encode() for line, extra, _, _ in asks))
        for line, _, status, expected in asks:
            head, body = _read_response(f)
            assert head.startswith(status), (line, head)
            if expected is not None:
                assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest(), line
            else:
                assert b'"status":"ok"' in body.replace(b" ", b""), body
    with dist.site.client() as admin:
        assert admin.delete(f"/api/v1/packages/{name}").status_code == 200


def test_a_deleted_package_does_not_keep_its_disk_space(dist, anon):
    """The file a download opened stays open for the next request, but not once the package is
    deleted: no descriptor of the unlinked file is left in the gateway (its space is freed)."""
    from odst.naming import name_key

    name = "freed.pkg"
    path = str(dist.site.data / "store" / "packages" / name_key(name))
    fds = f"/proc/{dist.site.proc.pid}/fd"

    def held() -> list[str]:
        found = []
        for fd in os.listdir(fds):
            with contextlib.suppress(FileNotFoundError):
                if os.readlink(f"{fds}/{fd}").startswith(path):
                    found.append(fd)
        return found

    with dist.site.client() as admin:
        assert admin.put(f"/api/v1/packages/{name}", content=_bytes(MiB, 9)).status_code == 201
        assert anon.get(dist.url(name)).status_code == 200
        assert held()  # kept open for the next request
        assert admin.delete(f"/api/v1/packages/{name}").status_code == 200
    wait_until(lambda: not held(), timeout=60, what="the deleted package's file closed")


HOSTILE_PATHS = [
    "/CasperShare/Packages/..%2F..%2Fsite.key",
    "/CasperShare/Packages/../../site.key",
    "/Packages/..%2Fsite.key",
    "/Packages/../site.key",
    "/CasperShare/Packages/%2E%2E%2F%2E%2E%2Fsite.key",
    "/CasperShare/Packages/%2e%2e/%2e%2e/site.key",
    "/CasperShare/Packages/..%5C..%5Csite.key",
    "/CasperShare/Packages/..%2Fpackages%2Fsmall.pkg",       # traversal back to a real package
    "/CasperShare/Packages/..%2F..%2Fstore%2Fpackages%2Fsmall.pkg",
    "/CasperShare/Packages/small.pkg%2F..%2F..%2F..%2Fsite.key",
    "/CasperShare/Packages/%2Fetc%2Fpasswd",
    "/CasperShare/Packages//etc/passwd",
    "/CasperShare/Packages/small.pkg%00",
    "/CasperShare/Packages/small.pkg%00.txt",
    "/CasperShare/Packages/%00",
    "/CasperShare/Packages/%01small.pkg",
    "/CasperShare/Packages/%FF",
    "/CasperShare/Packages/%C0%AE%C0%AE%2Fsite.key",         # overlong UTF-8 for '..'
    "/CasperShare/Packages/%252E%252E%252Fsite.key",          # double encoding
    "/CasperShare/Packages/..",
    "/CasperShare/Packages/.",
    "/CasperShare/Packages/.hidden.pkg",
    "/CasperShare/Packages/" + "a" * 300 + ".pkg",
    "/CasperShare/../site.key",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS, ids=[p[:60] for p in HOSTILE_PATHS])
def test_hostile_path_is_4xx_and_never_file_contents(dist, path):
    key = (dist.site.data / "site.key").read_text().strip()
    for method in ("GET", "HEAD"):
        status, _, body = raw(dist.site, method, path)
        assert 400 <= status < 500, (method, path, status, body[:200])
        assert key.encode() not in body
        assert dist.files[SMALL][:1000] not in body and len(body) < 4096


def test_zero_byte_package(dist, anon):
    r = anon.get(dist.url(EMPTY))
    assert r.status_code == 200 and r.content == b""
    assert r.headers["content-length"] == "0" and r.headers["etag"]
    r = anon.head(dist.url(EMPTY))
    assert r.status_code == 200 and r.headers["content-length"] == "0"
    for rng in ("bytes=0-0", "bytes=0-", "bytes=-5", "bytes=-0"):
        assert_unsatisfiable(anon.get(dist.url(EMPTY), headers={"Range": rng}), 0)
    assert_whole(anon.get(dist.url(EMPTY), headers={"Range": "bytes=junk"}), b"")


# ---------------------------------------------------------------- properties

@settings(max_examples=60, deadline=None)
@given(pair=st.integers(0, SIZE - 1).flatmap(lambda s: st.tuples(st.just(s), st.integers(s, SIZE + 1000))))
def test_any_satisfiable_range_returns_the_slice(dist, anon, pair):
    start, end = pair
    data = dist.files[SMALL]
    r = anon.get(dist.url(SMALL), headers={"Range": f"bytes={start}-{end}"})
    assert_partial(r, data, start, min(end, SIZE - 1))


@settings(max_examples=60, deadline=None)
@given(first=st.one_of(st.none(), st.integers(0, SIZE + 100)),
       last=st.one_of(st.none(), st.integers(0, SIZE + 100)))
def test_any_single_range_follows_rfc_9110(dist, anon, first, last):
    """The model: suffix, open-ended, closed, inverted and empty ranges, all at once."""
    data = dist.files[SMALL]
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    r = anon.get(dist.url(SMALL), headers={"Range": header})
    if first is None and last is None:
        assert_whole(r, data)                                  # "bytes=-": invalid, ignored
    elif first is None:
        if last == 0:
            assert_unsatisfiable(r, SIZE)
        else:
            assert_partial(r, data, max(0, SIZE - last), SIZE - 1)
    elif last is not None and last < first:
        assert_whole(r, data)                                  # invalid, ignored
    elif first >= SIZE:
        assert_unsatisfiable(r, SIZE)
    else:
        assert_partial(r, data, first, SIZE - 1 if last is None else min(last, SIZE - 1))


# ---------------------------------------------------------------- configuration

def test_context_is_configurable(make_site):
    site = make_site(env={"ODST_CONTEXT": "Dist"}).start()
    data = _bytes(50_000, 3)
    with site.client() as admin:
        assert admin.put("/api/v1/packages/tool.pkg", content=data).status_code == 201
        assert admin.get("/api/v1/site").json()["context"] == "Dist"
    with httpx.Client(base_url=site.url, timeout=30) as c:
        assert_whole(c.get("/Dist/Packages/tool.pkg"), data)
        assert_whole(c.get("/Packages/tool.pkg"), data)       # the alias stays
        assert_partial(c.get("/Dist/Packages/tool.pkg", headers={"Range": "bytes=5-9"}), data, 5, 9)
        assert c.get("/CasperShare/Packages/tool.pkg").status_code == 404
        assert c.get("/Dist/Packages/none.pkg").status_code == 404


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode("utf-8")).decode("ascii")


def test_download_basic_auth(make_site):
    site = make_site(env={"ODST_DOWNLOAD_AUTH": "basic", "ODST_DOWNLOAD_USER": "mac",
                          "ODST_DOWNLOAD_PASSWORD": "pw"}).start()
    data = _bytes(20_000, 4)
    with site.client() as admin:  # the Admin API keeps its bearer tokens
        assert admin.put("/api/v1/packages/tool.pkg", content=data).status_code == 201

    def refused(r):
        assert r.status_code == 401, (r.status_code, r.text)
        assert r.headers["www-authenticate"].lower().startswith("basic realm=")
        assert data[:100] not in r.content

    with httpx.Client(base_url=site.url, timeout=30) as c:
        for path in ("/CasperShare/Packages/tool.pkg", "/Packages/tool.pkg"):
            refused(c.get(path))
            refused(c.head(path))
            refused(c.get(path, headers={"Range": "bytes=0-10"}))
        # Unknown names without credentials are 401 too: no probing which packages exist.
        refused(c.get("/CasperShare/Packages/unknown.pkg"))
        for header in (_basic("mac", "wrong"), _basic("root", "pw"), _basic("mac", ""), _basic("", "pw"),
                       _basic("mac", "pw ") , "Basic bWFjcHc=",  # 'macpw': no colon
                       "Basic !!!not base64", "Bearer pw", "Basic", _basic("mac", "pw")[:-2]):
            refused(c.get("/CasperShare/Packages/tool.pkg", headers={"Authorization": header}))

        ok = {"Authorization": _basic("mac", "pw")}
        assert_whole(c.get("/CasperShare/Packages/tool.pkg", headers=ok), data)
        assert_whole(c.get("/Packages/tool.pkg", auth=("mac", "pw")), data)
        assert_partial(c.get("/CasperShare/Packages/tool.pkg", headers={**ok, "Range": "bytes=3-4"}),
                       data, 3, 4)
        assert c.head("/CasperShare/Packages/tool.pkg", headers=ok).headers["content-length"] == str(len(data))
        assert c.get("/CasperShare/Packages/unknown.pkg", headers=ok).status_code == 404


def test_download_basic_auth_with_non_ascii_credentials_is_401_not_500(make_site):
    site = make_site(env={"ODST_DOWNLOAD_AUTH": "basic", "ODST_DOWNLOAD_USER": "mac",
                          "ODST_DOWNLOAD_PASSWORD": "pw"}).start()
    with site.client() as admin:
        assert admin.put("/api/v1/packages/tool.pkg", content=b"tool").status_code == 201
    with httpx.Client(base_url=site.url, timeout=30) as c:
        for header in (_basic("mac", "pé"), _basic("mäc", "pw"), _basic("mac", "pw\u00a0")):
            r = c.get("/CasperShare/Packages/tool.pkg", headers={"Authorization": header})
            assert r.status_code == 401, (header, r.status_code, r.text)
    assert httpx.get(f"{site.url}/healthz", timeout=10).status_code == 200


def test_download_basic_auth_with_a_non_ascii_password(make_site):
    site = make_site(env={"ODST_DOWNLOAD_AUTH": "basic", "ODST_DOWNLOAD_USER": "mäc",
                          "ODST_DOWNLOAD_PASSWORD": "pässwörd"}).start()
    with site.client() as admin:
        assert admin.put("/api/v1/packages/tool.pkg", content=b"tool").status_code == 201
    with httpx.Client(base_url=site.url, timeout=30) as c:
        r = c.get("/CasperShare/Packages/tool.pkg", headers={"Authorization": _basic("mäc", "pässwörd")})
        assert r.status_code == 200 and r.content == b"tool"
        r = c.get("/CasperShare/Packages/tool.pkg", headers={"Authorization": _basic("mäc", "passwort")})
        assert r.status_code == 401
