"""The Admin API end to end against a real ``odst serve`` (embedded NATS, 127.0.0.1).

Each test is a story: start a site, act through HTTP (or the CLI), then look at
what the API, the event log and the store on disk say.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import random
import re
import socket
import threading
import time
from urllib.parse import quote

import blake3
import httpx
import nacl.exceptions
import nacl.signing
import pytest

from tests.conftest import (ADMIN_TOKEN, SiteProcess, free_port, module_site, read_status_line, run_odst,
                            wait_until, write_random)

MiB = 1 << 20

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- helpers

def raw_request(site: SiteProcess, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
    """Send a request with the path exactly as given (httpx would normalise '..' and escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def auth(token: str = ADMIN_TOKEN) -> dict:
    return {"Authorization": f"Bearer {token}"}


def assert_json_error(status: int, body: bytes, expected: int | range) -> dict:
    """A clear error: the expected 4xx and a JSON body with 'error' and 'detail'."""
    assert status != 500, body
    if isinstance(expected, range):
        assert status in expected, (status, body)
    else:
        assert status == expected, (status, body)
    doc = json.loads(body)
    assert doc.get("error") and doc.get("detail"), doc
    return doc


def assert_error(r: httpx.Response, expected: int | range) -> dict:
    return assert_json_error(r.status_code, r.content, expected)


def store_files(site: SiteProcess) -> tuple[list[str], list[str]]:
    store = site.data / "store"
    return (sorted(p.name for p in (store / "packages").iterdir()),
            sorted(p.name for p in (store / "tmp").iterdir()))


def events_of(c: httpx.Client, **params) -> list[dict]:
    r = c.get("/api/v1/events", params={"limit": 1000, **params})
    assert r.status_code == 200, r.text
    return r.json()["events"]


def history_of(c: httpx.Client, name: str) -> list[str]:
    """The admin-visible history of a name (uploads, stage changes, deletes), oldest first."""
    kinds = ("PackageUploaded", "PackageStaged", "PackageDeleted")
    return [e["type"] for e in events_of(c, name=name) if e["type"] in kinds]


def site_id(c: httpx.Client) -> str:
    return c.get("/api/v1/site").json()["site"]


def expected_manifest(data: bytes) -> dict:
    return {
        "size": len(data),
        "sha1": hashlib.sha1(data).hexdigest(),
        "sha512": hashlib.sha512(data).hexdigest(),
        "blake3": blake3.blake3(data).hexdigest(),
        "chunk_size": MiB,
        "chunks": [hashlib.sha1(data[i:i + MiB]).hexdigest() for i in range(0, len(data), MiB)],
    }


def upload(c: httpx.Client, name: str, data: bytes, **params) -> httpx.Response:
    return c.put(f"/api/v1/packages/{quote(name, safe='')}", content=data, params=params)


def randbytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------- auth

def _api_routes(openapi: dict) -> list[tuple[str, str]]:
    """Every (method, concrete path) of the Admin API, path parameters filled in."""
    routes = []
    for path, ops in openapi["paths"].items():
        if not path.startswith("/api/"):
            continue
        concrete = re.sub(r"\{[^}]*\}", "some.pkg", path)
        for method in ops:
            if method in ("get", "put", "patch", "delete", "post"):
                routes.append((method.upper(), concrete))
    return routes


def test_every_api_route_needs_a_valid_token(site):
    openapi = httpx.get(f"{site.url}/schema/openapi.json", timeout=10).json()
    routes = _api_routes(openapi)
    assert all("{" not in path for _, path in routes), routes
    # The contract's routes are all there, so the loop below really covers them.
    for must in [("PUT", "/api/v1/packages/some.pkg"), ("GET", "/api/v1/packages"),
                 ("GET", "/api/v1/packages/some.pkg"), ("PATCH", "/api/v1/packages/some.pkg"),
                 ("DELETE", "/api/v1/packages/some.pkg"), ("GET", "/api/v1/events"),
                 ("GET", "/api/v1/events/stream"), ("POST", "/api/v1/tokens")]:
        assert must in routes, (must, routes)

    bad_credentials = [
        {},                                              # none at all
        {"Authorization": "Bearer not-the-token"},       # wrong token
        {"Authorization": "Bearer"},                     # empty token
        {"Authorization": ADMIN_TOKEN},                  # no scheme
        {"Authorization": "Basic " + base64.b64encode(b"admin:" + ADMIN_TOKEN.encode()).decode()},
    ]
    with httpx.Client(base_url=site.url, timeout=10) as c:
        for method, path in routes:
            if (method, path) == ("POST", "/api/v1/session"):
                continue  # signing in is how a browser gets credentials (tests/system/test_accounts.py)
            for headers in bad_credentials:
                r = c.request(method, path, headers=headers, content=b"x" if method == "PUT" else None)
                assert_error(r, 401)
        # Nothing was created by any of those requests.
        r = c.get("/api/v1/packages", headers=auth())
        assert r.json()["count"] == 0
    assert store_files(site) == ([], [])


def test_roles_auditor_reads_only_and_revoked_token_is_refused(site):
    admin = site.client()
    assert upload(admin, "tool.pkg", b"tool v1").status_code == 201

    r = admin.post("/api/v1/tokens", json={"name": "audit bot", "role": "auditor"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["role"] == "auditor" and created["token"].startswith("odst_")
    auditor = site.client(token=created["token"])

    # The token is listed, but its secret never is.
    listed = admin.get("/api/v1/tokens").json()["tokens"]
    assert created["token_id"] in {t["token_id"] for t in listed}
    assert created["token"] not in json.dumps(listed)

    # An auditor reads everything...
    for path in ("/api/v1/packages", "/api/v1/packages/tool.pkg", "/api/v1/events", "/api/v1/site"):
        assert auditor.get(path).status_code == 200, path
    # ...and changes nothing.
    for method, path, kw in [("PUT", "/api/v1/packages/new.pkg", {"content": b"new"}),
                             ("PATCH", "/api/v1/packages/tool.pkg", {"json": {"stage": "test"}}),
                             ("DELETE", "/api/v1/packages/tool.pkg", {}),
                             ("POST", "/api/v1/tokens", {"json": {"name": "x", "role": "admin"}}),
                             ("GET", "/api/v1/tokens", {}),
                             ("DELETE", f"/api/v1/tokens/{created['token_id']}", {})]:
        r = auditor.request(method, path, **kw)
        doc = assert_error(r, 403)
        assert "auditor" in doc["detail"], doc
    assert admin.get("/api/v1/packages/tool.pkg").json()["stage"] == "prod"
    assert admin.get("/api/v1/packages/new.pkg").status_code == 404
    assert store_files(site) == (["tool.pkg"], [])

    # An operator may change packages but not tokens.
    operator = site.client(token=admin.post("/api/v1/tokens", json={"name": "ci"}).json()["token"])
    assert upload(operator, "ci.pkg", b"from ci").status_code == 201
    assert_error(operator.post("/api/v1/tokens", json={"name": "y"}), 403)

    # Bad token requests are a clear 400.
    for body in (b'{"name": "x", "role": "root"}', b'{"name": ""}', b'{"name": "x", "extra": 1}', b"{"):
        r = admin.post("/api/v1/tokens", content=body)
        assert_error(r, 400)

    # Revoke: the auditor's next request is refused.
    r = admin.delete(f"/api/v1/tokens/{created['token_id']}")
    assert r.status_code == 200, r.text
    r = auditor.get("/api/v1/packages")
    assert_error(r, 401)
    revoked = [t for t in admin.get("/api/v1/tokens").json()["tokens"]
               if t["token_id"] == created["token_id"]]
    assert revoked and revoked[0]["revoked_at"] is not None
    # Revoking twice, or an unknown id, is a 404.
    r = admin.delete(f"/api/v1/tokens/{created['token_id']}")
    assert_error(r, 404)
    # The admin still works.
    assert admin.get("/api/v1/packages").status_code == 200


# ---------------------------------------------------------------- upload

def test_upload_returns_manifest_and_file_downloads_identically(site):
    data = randbytes(3 * MiB + 17, seed=7)
    c = site.client()
    sid = site_id(c)

    r = upload(c, "Firefox 140.pkg", data)
    assert r.status_code == 201, r.text
    pkg = r.json()
    want = expected_manifest(data)
    for key, value in want.items():
        assert pkg[key] == value, key
    assert pkg["name"] == "Firefox 140.pkg"
    assert len(pkg["chunks"]) == 4  # 3 full chunks and one of 17 bytes
    assert pkg["chunks"][-1] == hashlib.sha1(data[3 * MiB:]).hexdigest()
    assert pkg["stage"] == "prod"  # the default stage
    assert pkg["availability"][sid]["status"] == "available"

    # GET returns the same manifest.
    got = c.get(f"/api/v1/packages/{quote('Firefox 140.pkg')}").json()
    assert {k: got[k] for k in want} == want

    # The file is served, byte for byte, and nothing is left in tmp.
    r = httpx.get(f"{site.url}/CasperShare/Packages/{quote('Firefox 140.pkg')}", timeout=30)
    assert r.status_code == 200
    assert hashlib.sha1(r.content).hexdigest() == want["sha1"] and r.content == data
    assert store_files(site) == (["firefox 140.pkg"], [])  # named by the key of its name (name_key)
    assert (site.data / "store" / "packages" / "firefox 140.pkg").read_bytes() == data

    # One PackageUploaded event carries the same manifest.
    [event] = events_of(c, type="PackageUploaded")
    body = event["envelope"]["event"]
    assert {k: body[k] for k in want} == want and body["name"] == "Firefox 140.pkg"


def test_upload_with_stage_parameter(site):
    c = site.client()
    r = upload(c, "beta.dmg", b"beta", stage="test")
    assert r.status_code == 201 and r.json()["stage"] == "test"
    r = upload(c, "other.dmg", b"other", stage="canary")
    doc = assert_error(r, 400)
    assert "canary" in doc["detail"]
    assert store_files(site) == (["beta.dmg"], [])


def test_reupload_same_content_is_idempotent_and_conflicts_are_refused(site):
    data = randbytes(MiB + 5, seed=3)
    c = site.client()
    first = upload(c, "app.pkg", data)
    assert first.status_code == 201

    again = upload(c, "app.pkg", data)
    assert again.status_code == 200, again.text
    assert again.json()["sha1"] == first.json()["sha1"]
    assert len(events_of(c, type="PackageUploaded")) == 1

    # Same size, different bytes: refused after hashing, with a message naming the package.
    other = bytearray(data)
    other[-1] ^= 0xFF
    r = upload(c, "app.pkg", bytes(other))
    doc = assert_error(r, 409)
    assert "app.pkg" in doc["detail"]

    # A different size is refused early: from the headers alone, before any body is sent.
    with socket.create_connection(("127.0.0.1", site.port), timeout=20) as s:
        s.sendall(b"PUT /api/v1/packages/app.pkg HTTP/1.1\r\nHost: test\r\n"
                  + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {len(data) + 1}\r\n\r\n".encode())
        status, head = read_status_line(s)
    assert status == 409, head

    # The original is untouched and still the only upload.
    assert c.get("/api/v1/packages/app.pkg").json()["sha1"] == hashlib.sha1(data).hexdigest()
    assert httpx.get(f"{site.url}/Packages/app.pkg", timeout=30).content == data
    assert len(events_of(c, type="PackageUploaded")) == 1
    wait_until(lambda: store_files(site) == (["app.pkg"], []), 10, what="tmp to be empty")


# ---------------------------------------------------------------- list, stage, delete

def test_list_filter_stage_delete_and_reupload(site):
    c = site.client()
    assert upload(c, "alpha-tool.pkg", b"alpha").status_code == 201
    assert upload(c, "beta-tool.dmg", b"beta", stage="test").status_code == 201
    assert upload(c, "gamma.zip", b"gamma").status_code == 201

    def names(**params):
        r = c.get("/api/v1/packages", params=params)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["count"] == len(doc["packages"])
        return [p["name"] for p in doc["packages"]]

    assert names() == ["alpha-tool.pkg", "beta-tool.dmg", "gamma.zip"]
    assert names(q="tool") == ["alpha-tool.pkg", "beta-tool.dmg"]
    assert names(q="TOOL") == ["alpha-tool.pkg", "beta-tool.dmg"]
    assert names(q="nothing-like-this") == []
    assert names(stage="test") == ["beta-tool.dmg"]
    assert names(stage="prod") == ["alpha-tool.pkg", "gamma.zip"]
    assert names(stage="dev") == []
    assert names(stage="prod", q="gam") == ["gamma.zip"]
    # a one-value parameter given twice is a 400 naming it (not silently the last); name repeats
    r = c.get("/api/v1/packages", params=[("stage", "prod"), ("stage", "test")])
    assert r.status_code == 400 and "'stage'" in r.json()["detail"], r.text
    r = c.get("/api/v1/packages", params=[("limit", "1"), ("limit", "2")])
    assert r.status_code == 400 and "'limit'" in r.json()["detail"], r.text
    r = c.get("/api/v1/packages", params=[("name", "gamma.zip"), ("name", "beta-tool.dmg")])
    assert r.status_code == 200 and sorted(p["name"] for p in r.json()["packages"]) == ["beta-tool.dmg", "gamma.zip"]

    # Re-stage: an event records the change and the previous stage.
    r = c.patch("/api/v1/packages/alpha-tool.pkg", json={"stage": "test"})
    assert r.status_code == 200, r.text
    assert r.json()["stage"] == "test"
    [staged] = events_of(c, type="PackageStaged")
    body = staged["envelope"]["event"]
    assert (body["type"], body["name"], body["stage"], body["previous"]) == \
        ("PackageStaged", "alpha-tool.pkg", "test", "prod")
    assert names(stage="test") == ["alpha-tool.pkg", "beta-tool.dmg"]
    # The same stage again changes nothing and records nothing.
    assert c.patch("/api/v1/packages/alpha-tool.pkg", json={"stage": "test"}).status_code == 200
    assert len(events_of(c, type="PackageStaged")) == 1

    # Bad PATCH bodies are clear 400s and change nothing.
    for body in (b'{"stage": "staging"}', b'{"stage": ', b"not json", b'{"stage": "prod", "colour": "red"}',
                 b'["prod"]', b'{"stage": 3}'):
        r = c.patch("/api/v1/packages/alpha-tool.pkg", content=body,
                    headers={"Content-Type": "application/json"})
        assert_error(r, 400)
    r = c.patch("/api/v1/packages/missing.pkg", json={"stage": "test"})
    assert_error(r, 404)
    assert c.get("/api/v1/packages/alpha-tool.pkg").json()["stage"] == "test"
    assert len(events_of(c, type="PackageStaged")) == 1

    # Delete: the file disappears from the distribution point, the history stays.
    r = c.delete("/api/v1/packages/alpha-tool.pkg")
    assert r.status_code == 200, r.text
    assert r.json()["deleted"] == "alpha-tool.pkg"
    assert httpx.get(f"{site.url}/CasperShare/Packages/alpha-tool.pkg", timeout=10).status_code == 404
    assert_error(c.get("/api/v1/packages/alpha-tool.pkg"), 404)
    assert_error(c.delete("/api/v1/packages/alpha-tool.pkg"), 404)
    assert names() == ["beta-tool.dmg", "gamma.zip"]
    assert store_files(site)[0] == ["beta-tool.dmg", "gamma.zip"]
    assert history_of(c, "alpha-tool.pkg") == ["PackageUploaded", "PackageStaged", "PackageDeleted"]

    # The name is free again: new content may take it.
    r = upload(c, "alpha-tool.pkg", b"alpha, second edition")
    assert r.status_code == 201, r.text
    assert r.json()["stage"] == "prod"
    assert httpx.get(f"{site.url}/Packages/alpha-tool.pkg", timeout=10).content == b"alpha, second edition"
    assert history_of(c, "alpha-tool.pkg") == ["PackageUploaded", "PackageStaged", "PackageDeleted",
                                               "PackageUploaded"]

    # Deleting again and bringing back the very first content works too (a tombstone is not forever).
    assert c.delete("/api/v1/packages/alpha-tool.pkg").status_code == 200
    r = upload(c, "alpha-tool.pkg", b"alpha")
    assert r.status_code == 201, r.text
    assert r.json()["sha1"] == hashlib.sha1(b"alpha").hexdigest()
    assert httpx.get(f"{site.url}/Packages/alpha-tool.pkg", timeout=10).content == b"alpha"
    assert names() == ["alpha-tool.pkg", "beta-tool.dmg", "gamma.zip"]


# ---------------------------------------------------------------- hostile names

@pytest.fixture(scope="module")
def shared_site(tmp_path_factory):
    """One site for the many small cases below (hostile names, odd query values); each leaves it clean."""
    with module_site(tmp_path_factory, "hostile") as s:
        yield s


@pytest.fixture
def clean_site(shared_site):
    yield shared_site
    # If a case wrongly created a package, remove it so the next case starts clean.
    with shared_site.client() as c:
        for p in c.get("/api/v1/packages").json()["packages"]:
            c.delete(f"/api/v1/packages/{quote(p['name'], safe='')}")


HOSTILE = [
    # (raw path segment, expected status or range)
    ("a%2Fb.pkg", range(400, 500)),             # encoded slash
    ("..%2F..%2Fsite.key", range(400, 500)),    # traversal with encoded slashes
    ("%2E%2E%2Fx.pkg", range(400, 500)),
    ("%2Fetc%2Fpasswd.pkg", range(400, 500)),   # absolute path
    ("x.pkg%2F", range(400, 500)),              # a trailing encoded slash is part of the name
    ("a%5Cb.pkg", 400),                         # backslash
    ("..%5C..%5Cx.pkg", 400),
    ("..pkg", 400),                             # '..' inside a name
    ("%2E%2E", 400),
    ("a..b.pkg", 400),
    ("a%00.pkg", 400),                          # NUL
    ("a.pkg%00.txt", 400),
    ("a%01.pkg", 400),                          # control characters
    ("a%7F.pkg", 400),
    ("a%0A.pkg", 400),
    ("a%0D%0AX-Injected:%201.pkg", 400),
    ("a%E2%80%AE.pkg", 400),                    # right-to-left override (U+202E)
    ("%20", 400),                               # empty-ish
    ("%20.pkg", 400),
    ("a.pkg%20", 400),
    ("%09.pkg", 400),
    ("a" * 252 + ".pkg", 400),                  # 256 bytes
    ("%C3%A9" * 126 + ".pkg", 400),             # 256 bytes in 130 characters
    (".hidden.pkg", 400),                       # leading dot
    (".pkg", 400),
    ("tool.exe", 415),                          # disallowed extensions
    ("tool.pkg.exe", 415),
    ("tool.sh", 415),
    ("tool", 415),
    ("tool.pkg.", 415),
    ("a%FF.pkg", 400),                          # not UTF-8
    ("%C0%AF.pkg", 400),                        # overlong UTF-8 for '/'
    ("x%ED%A0%80.pkg", 400),                    # UTF-8 encoded surrogate
]


@pytest.mark.parametrize("segment,expected", HOSTILE, ids=[h[0][:40] for h in HOSTILE])
def test_hostile_name_is_a_clear_4xx_and_leaves_nothing(clean_site, segment, expected):
    site = clean_site
    path = f"/api/v1/packages/{segment}"
    with site.client() as c:
        before = c.get("/api/v1/events", params={"limit": 1}).json()["last_position"]
    status, _, body = raw_request(site, "PUT", path, body=b"payload" * 100, headers=auth())
    assert_json_error(status, body, expected)
    for method, kw in [("GET", {}), ("DELETE", {}),
                       ("PATCH", {"body": b'{"stage":"test"}',
                                  "headers": {**auth(), "Content-Type": "application/json"}})]:
        status, _, body = raw_request(site, method, path, **{"headers": auth(), **kw})
        assert_json_error(status, body, range(400, 500))
    with site.client() as c:
        assert c.get("/api/v1/packages").json()["count"] == 0
        assert events_of(c, after=before) == []
    wait_until(lambda: store_files(site) == ([], []), 10, what="store to be empty")


def test_put_without_a_name_is_a_clear_4xx(clean_site):
    for path in ("/api/v1/packages/", "/api/v1/packages"):
        status, _, body = raw_request(clean_site, "PUT", path, body=b"payload", headers=auth())
        assert_json_error(status, body, range(400, 500))
    assert store_files(clean_site) == ([], [])


def test_longest_allowed_name_is_accepted(clean_site):
    name = "a" * 251 + ".pkg"  # 255 bytes, the limit
    with clean_site.client() as c:
        r = upload(c, name, b"long name")
        assert r.status_code == 201, r.text
        assert httpx.get(f"{clean_site.url}/Packages/{name}", timeout=10).content == b"long name"


# ---------------------------------------------------------------- interrupted and oversized uploads

def test_truncated_upload_is_cleaned_up_and_server_stays_healthy(site):
    tmp = site.data / "store" / "tmp"
    c = site.client()
    # a small body (held until it is all in: no temp file is made before), within the first
    # chunk, and past two chunks (threads)
    def truncated() -> int:
        return site.log(1 << 22).count("upload truncated: client disconnected")
    for sent in (100_000, 1_000_000, 2 * MiB + 12345):
        before = truncated()
        s = socket.create_connection(("127.0.0.1", site.port), timeout=20)
        s.sendall(b"PUT /api/v1/packages/truncated.pkg HTTP/1.1\r\nHost: test\r\n"
                  + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 5000000\r\n\r\n".encode())
        s.sendall(randbytes(sent, seed=sent))
        if sent > 256 * 1024:
            wait_until(lambda: list(tmp.glob("*.part")), 10, what="the upload's temp file to appear")
        s.close()
        wait_until(lambda: truncated() > before, 15, what="the server to drop the truncated upload")
        wait_until(lambda: store_files(site) == ([], []), 15, what="the temp file to be removed")
        assert c.get("/api/v1/packages").json()["count"] == 0
        assert c.get("/api/v1/packages/truncated.pkg").status_code == 404
        assert events_of(c, type="PackageUploaded") == []
        assert httpx.get(f"{site.url}/Packages/truncated.pkg", timeout=10).status_code == 404

    r = httpx.get(f"{site.url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    data = randbytes(5_000_000, seed=9)
    r = upload(c, "truncated.pkg", data)
    assert r.status_code == 201, r.text
    assert r.json()["sha1"] == hashlib.sha1(data).hexdigest()
    assert httpx.get(f"{site.url}/Packages/truncated.pkg", timeout=30).content == data


def test_upload_over_the_configured_limit_is_413(make_site):
    site = make_site(env={"ODST_MAX_UPLOAD_BYTES": "1000000"}).start()
    c = site.client()

    # Announced too large: refused from the headers, before any body is sent.
    with socket.create_connection(("127.0.0.1", site.port), timeout=20) as s:
        s.sendall(b"PUT /api/v1/packages/big.pkg HTTP/1.1\r\nHost: test\r\n"
                  + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: 2000000\r\n\r\n".encode())
        status, head = read_status_line(s)
    assert status == 413, head
    assert b"\r\nconnection: close\r\n" in head.lower(), head  # answered early: no client may reuse it

    # Announced too large with the body sent along.
    r = upload(c, "big.pkg", randbytes(2_000_000))
    doc = assert_error(r, 413)
    assert "1000000" in doc["detail"]

    # Chunked (no Content-Length): refused once the stream passes the limit.
    def body():
        for i in range(32):  # 2 MiB in 64 KiB pieces
            yield randbytes(64 * 1024, seed=i)
    r = c.put("/api/v1/packages/big.pkg", content=body())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in r.request.headers
    doc = assert_error(r, 413)

    wait_until(lambda: store_files(site) == ([], []), 15, what="the store to be empty")
    assert c.get("/api/v1/packages").json()["count"] == 0
    assert events_of(c, type="PackageUploaded") == []

    # Exactly at the limit is fine; one byte over is not.
    assert upload(c, "edge.pkg", randbytes(1_000_000)).status_code == 201
    r = upload(c, "edge2.pkg", randbytes(1_000_001))
    assert_error(r, 413)
    assert store_files(site) == (["edge.pkg"], [])


# ---------------------------------------------------------------- the event feed

def test_events_are_signed_chained_and_paged(site):
    c = site.client()
    for i in range(4):
        assert upload(c, f"pkg{i}.pkg", f"content {i}".encode()).status_code == 201
    assert c.patch("/api/v1/packages/pkg1.pkg", json={"stage": "dev"}).status_code == 200
    assert c.delete("/api/v1/packages/pkg2.pkg").status_code == 200
    assert c.post("/api/v1/tokens", json={"name": "bot", "role": "auditor"}).status_code == 201

    info = c.get("/api/v1/site").json()
    verify_key = nacl.signing.VerifyKey(bytes.fromhex(info["public_key"]))

    # Page through with a small limit.
    paged, after = [], 0
    while True:
        r = c.get("/api/v1/events", params={"after": after, "limit": 3})
        assert r.status_code == 200, r.text
        page = r.json()["events"]
        if not page:
            break
        assert len(page) <= 3
        assert all(e["position"] > after for e in page)
        paged += page
        after = page[-1]["position"]
    everything = events_of(c)
    assert [e["position"] for e in paged] == [e["position"] for e in everything]
    assert len(paged) == info["events"] >= 9
    assert r.json()["last_position"] == after
    types = [e["type"] for e in paged]
    assert types[0] == "SiteFounded"
    assert types.count("PackageUploaded") == 4
    assert "PackageStaged" in types and "PackageDeleted" in types

    prev_signed = None
    for k, e in enumerate(paged):
        signed = base64.b64decode(e["signed"])
        message = verify_key.verify(signed)  # raises if the signature does not verify
        assert message == signed[64:]
        assert json.loads(message) == e["envelope"]
        env = e["envelope"]
        assert env["origin"] == info["site"] and env["seq"] == k + 1 and env["id"] == e["id"]
        assert env["event"]["type"] == e["type"]
        if prev_signed is None:
            assert env["prev"] == ""
        else:
            assert env["prev"] == blake3.blake3(prev_signed).hexdigest()
        prev_signed = signed

    # A single flipped bit breaks the signature.
    tampered = bytearray(base64.b64decode(paged[1]["signed"]))
    tampered[-5] ^= 0x01
    with pytest.raises(nacl.exceptions.BadSignatureError):
        verify_key.verify(bytes(tampered))

    # Filters.
    assert [e["type"] for e in events_of(c, type="PackageDeleted")] == ["PackageDeleted"]
    assert history_of(c, "pkg1.pkg") == ["PackageUploaded", "PackageStaged"]
    assert len(events_of(c, origin=info["site"])) == len(paged)
    assert events_of(c, after=after) == []
    for bad in ({"after": -1}, {"after": "x"}, {"limit": 0}, {"limit": 100000}):
        r = c.get("/api/v1/events", params=bad)
        assert_error(r, 400)


def _sse_events(lines):
    """Yield (event, id, data) for each complete Server-Sent Event."""
    event, ident, data = None, None, []
    for line in lines:
        if line == "":
            if data:
                yield event, ident, "\n".join(data)
            event, ident, data = None, None, []
        elif line.startswith(":"):
            yield None, None, None  # a comment: lets the caller notice the stream is open
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "id":
                ident = value
            elif field == "data":
                data.append(value)


def test_event_stream_delivers_a_new_upload(site):
    c = site.client()
    last = c.get("/api/v1/events", params={"limit": 1}).json()["last_position"]
    uploader: threading.Thread | None = None
    result: dict = {}

    def upload_later():
        with site.client() as c2:
            result["status"] = upload(c2, "streamed.pkg", b"streamed").status_code

    deadline = time.monotonic() + 30
    got = None
    timeout = httpx.Timeout(10, read=20)
    with httpx.Client(base_url=site.url, timeout=timeout, headers=auth()) as sc:
        with sc.stream("GET", "/api/v1/events/stream", params={"after": last}) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for event, ident, data in _sse_events(r.iter_lines()):
                assert time.monotonic() < deadline, "no PackageUploaded event within 30 s"
                if uploader is None:
                    uploader = threading.Thread(target=upload_later, daemon=True)
                    uploader.start()
                if event == "PackageUploaded":
                    got = (ident, json.loads(data))
                    break
    assert uploader is not None
    uploader.join(30)
    assert result.get("status") == 201
    assert got is not None
    ident, doc = got
    assert doc["type"] == "PackageUploaded" and doc["envelope"]["event"]["name"] == "streamed.pkg"
    assert int(ident) == doc["position"] > last

    # Resuming with Last-Event-ID replays from just after that position.
    with httpx.Client(base_url=site.url, timeout=timeout, headers=auth()) as sc:
        with sc.stream("GET", "/api/v1/events/stream",
                       headers={"Last-Event-ID": str(doc["position"] - 1)}) as r:
            for event, ident, data in _sse_events(r.iter_lines()):
                if event is not None:
                    assert int(ident) == doc["position"] and event == "PackageUploaded"
                    break


BAD_LAST_EVENT_IDS = ["\u00b2", "-1", "abc", "1e3", str(2 ** 64)]


@pytest.mark.parametrize("last_event_id", BAD_LAST_EVENT_IDS, ids=["superscript-2", "-1", "abc", "1e3", "2**64"])
def test_event_stream_with_a_malformed_last_event_id_is_not_a_crash(clean_site, last_event_id):
    """Last-Event-ID is client input: a value that is no usable position is refused with a 400,
    or ignored (the stream then still delivers what happens next), never a 500 or a torn stream."""
    site = clean_site
    name = f"lei-{BAD_LAST_EVENT_IDS.index(last_event_id)}.pkg"
    with httpx.Client(base_url=site.url, timeout=httpx.Timeout(10, read=20), headers=auth()) as c:
        with c.stream("GET", "/api/v1/events/stream",
                      headers={"Last-Event-ID": last_event_id.encode("latin-1")}) as r:
            if r.status_code != 200:
                r.read()
                assert_error(r, 400)
            else:
                assert r.headers["content-type"].startswith("text/event-stream")
                deadline = time.monotonic() + 30
                uploaded = False
                for event, ident, data in _sse_events(r.iter_lines()):
                    assert time.monotonic() < deadline, "no event within 30 s"
                    if not uploaded:
                        with site.client() as admin:
                            assert upload(admin, name, name.encode()).status_code == 201
                        uploaded = True
                    if event == "PackageUploaded" and json.loads(data)["envelope"]["event"]["name"] == name:
                        break
                else:
                    pytest.fail("the stream ended before the new upload's event arrived")
    assert httpx.get(f"{site.url}/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("path", [
    f"/api/v1/events?after={2 ** 64}",
    f"/api/v1/events?after={2 ** 63}",
    f"/api/v1/packages?offset={2 ** 64}",
    f"/api/v1/packages?limit=10&offset={2 ** 63}",
    f"/api/v1/events/stream?after={2 ** 64}",
])
def test_huge_numbers_in_the_query_are_400(clean_site, path):
    with httpx.Client(base_url=clean_site.url, timeout=httpx.Timeout(10, read=20), headers=auth()) as c:
        with c.stream("GET", path) as r:
            if r.status_code == 200:
                pytest.fail(f"{path} answered 200 ({r.headers.get('content-type')}) instead of 400")
            r.read()
            assert_error(r, 400)
    assert httpx.get(f"{clean_site.url}/healthz", timeout=10).status_code == 200


# ---------------------------------------------------------------- health, schema, CLI

def test_health_and_openapi_schema(site):
    r = httpx.get(f"{site.url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = httpx.get(f"{site.url}/schema/openapi.json", timeout=10)
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.")
    assert "/api/v1/packages" in doc["paths"]
    assert {"put", "get", "patch", "delete"} <= set(doc["paths"]["/api/v1/packages/{name}"])
    assert "/api/v1/events" in doc["paths"]


def test_cli_upload_list_stage_delete(site, tmp_path):
    path = write_random(tmp_path / "Chrome.pkg", 2 * MiB + 3, seed=5)
    data = path.read_bytes()
    flags = ["--server", site.url, "--token", ADMIN_TOKEN]

    p = run_odst("upload", str(path), *flags, "--quiet")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["name"] == "Chrome.pkg" and out["size"] == len(data)
    assert out["sha1"] == hashlib.sha1(data).hexdigest()
    assert out["sha512"] == hashlib.sha512(data).hexdigest()
    assert httpx.get(f"{site.url}/Packages/Chrome.pkg", timeout=30).content == data

    p = run_odst("upload", str(path), *flags, "--quiet", "--name", "Chrome Beta.pkg", "--stage", "test")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["stage"] == "test"

    p = run_odst("packages", *flags)
    assert p.returncode == 0, p.stderr
    header, *rows = [line.split("\t") for line in p.stdout.splitlines()]
    assert header == ["NAME", "SIZE", "STAGE", "SHA1", "AVAILABLE AT"]
    assert [r[0] for r in rows] == ["Chrome Beta.pkg", "Chrome.pkg"]
    assert rows[1][1:4] == [str(len(data)), "prod", hashlib.sha1(data).hexdigest()]
    p = run_odst("packages", *flags, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["count"] == 2

    p = run_odst("stage", "Chrome.pkg", "test", *flags)
    assert p.returncode == 0, p.stderr
    assert "Chrome.pkg" in p.stdout and "test" in p.stdout
    assert site.client().get("/api/v1/packages/Chrome.pkg").json()["stage"] == "test"

    p = run_odst("delete", "Chrome.pkg", *flags)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["deleted"] == "Chrome.pkg"
    assert httpx.get(f"{site.url}/Packages/Chrome.pkg", timeout=10).status_code == 404

    # Failures: exit 2 and a message a person can act on, never a traceback.
    p = run_odst("upload", str(path), "--server", site.url, "--token", "wrong", "--quiet")
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "401" in p.stderr and "token" in p.stderr and "Traceback" not in p.stderr
    p = run_odst("packages", "--server", site.url, "--token", "wrong")
    assert p.returncode == 2 and "401" in p.stderr and "Traceback" not in p.stderr
    p = run_odst("packages", "--server", site.url, env={"ODST_TOKEN": ""})
    assert p.returncode == 2 and "token" in p.stderr and "Traceback" not in p.stderr
    p = run_odst("delete", "Chrome.pkg", *flags)
    assert p.returncode == 2 and "404" in p.stderr and "Traceback" not in p.stderr
    p = run_odst("stage", "Chrome Beta.pkg", "staging", *flags)
    assert p.returncode == 2 and "staging" in p.stderr and "Traceback" not in p.stderr
    p = run_odst("upload", str(tmp_path / "missing.pkg"), *flags)
    assert p.returncode == 2 and "missing.pkg" in p.stderr
    p = run_odst("packages", "--server", f"http://127.0.0.1:{free_port()}", "--token", ADMIN_TOKEN)
    assert p.returncode == 2 and "cannot reach" in p.stderr and "Traceback" not in p.stderr
    # The upload with the wrong token left nothing behind.
    assert store_files(site) == (["chrome beta.pkg"], [])


def test_metrics_in_prometheus_format(site, tmp_path):
    with site.client() as c:
        assert c.put("/api/v1/packages/m.pkg", content=b"x" * 5000).status_code == 201
        assert c.put("/api/v1/packages/m.pkg", content=b"x" * 5000).status_code == 200
    assert httpx.get(f"{site.url}/Packages/m.pkg").status_code == 200
    assert httpx.get(f"{site.url}/Packages/none.pkg").status_code == 404
    assert httpx.get(f"{site.url}/metrics").status_code == 401  # an API token of any role (metrics_public)
    with site.client() as c:
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for line in ['odst_uploads_total{result="published"} 1.0', 'odst_uploads_total{result="identical"} 1.0',
                 'odst_downloads_total{status="200"} 1.0', 'odst_downloads_total{status="404"} 1.0',
                 "odst_bytes_served_total 5000", 'odst_projection_lag{stream="EVENTS"} 0.0',
                 "odst_quarantined_events 0.0", "odst_packages 1.0", 'odst_replication_queue{status="pending"} 0.0']:
        assert any(l.startswith(line) for l in text.splitlines()), line


def test_event_log_filters_by_actor_and_time_and_pages_backwards(site):
    c = site.client()
    for i in range(3):
        assert upload(c, f"f{i}.pkg", b"x" * (i + 1)).status_code == 201
    ev = events_of(c)
    uploads = [e for e in ev if e["type"] == "PackageUploaded"]
    assert [e["actor"] for e in events_of(c, actor=uploads[0]["actor"])] == [uploads[0]["actor"]] * 3
    assert events_of(c, actor="user:nobody") == []
    t = uploads[1]["ts"]
    assert all(e["ts"] >= t for e in events_of(c, since=t)) and uploads[1]["id"] in {e["id"] for e in events_of(c, since=t)}
    assert all(e["ts"] < t for e in events_of(c, until=t))
    last = ev[-1]["position"]
    newest = events_of(c, before=last + 1, limit=2)
    assert [e["position"] for e in newest] == [last, ev[-2]["position"]]
    assert c.get("/api/v1/events", params={"since": "-1"}).status_code == 400
