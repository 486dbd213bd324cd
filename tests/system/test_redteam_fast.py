"""Red team of the paths made fast for issue 13, as an attacker sees them, against real
processes: the distribution point answered in front of Litestar from cached read-model answers
and open files, signed chunk runs between peers, group commit of concurrent appends, and the
two-thread streaming upload on a full disk."""

from __future__ import annotations

import asyncio
import base64
import http.client as httpclient
import os
import random
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import nats
import pytest

from odst.events import catalogue as ev
from odst.events.log import Appended, EventLog
from odst.events.signing import SiteKey
from odst.naming import name_key
from odst.peering.requests import (HEADER_NONCE, HEADER_SIG, HEADER_TS, NonceStoreUnavailable, PeerRequestRefused,
                                   RequestVerifier, SharedNonces, sign_request)
from odst.projections.batch import GroupCommit
from odst.replicator.transport import run_target
from odst.store.hashing import CHUNK_SIZE, manifest_of
from tests.conftest import founded_log, free_port, module_site, wait_until, write_random
from tests.system.test_eventlog import assert_one_chain, messages
from tests.system.test_pull_runs import pair_holding  # noqa: F401 - a fixture

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def raw(site, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """A request sent exactly as written: no client-side normalisation of path or method."""
    conn = httpclient.HTTPConnection("127.0.0.1", site.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "odst")
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- downloads

def _holding_foo_and_t(site):
    data = random.Random(1).randbytes(3 * MiB + 17)
    with site.client() as admin:
        assert admin.put("/api/v1/packages/Foo.pkg", params={"stage": "prod"}, content=data).status_code == 201
        assert admin.put("/api/v1/packages/T.pkg", params={"stage": "test"}, content=b"t" * 999).status_code == 201
    return site, data


@pytest.fixture
def prod_site(make_site):
    """A site replicating only the stage 'prod', holding Foo.pkg (prod, 3 MB) and T.pkg (test)."""
    return _holding_foo_and_t(make_site(extra_args=["--accept-stage", "prod"]).start())


@pytest.fixture(scope="module")
def prod_site_read_only(tmp_path_factory):
    """``prod_site`` shared by the tests below that only read from it."""
    with module_site(tmp_path_factory, "prod", extra_args=["--accept-stage", "prod"]) as site:
        yield _holding_foo_and_t(site)


def test_a_warm_download_cache_follows_every_fold(prod_site):
    """The answer and the open file are kept between requests: a demotion, a damaged copy found
    by `verify` and a deletion must each stop the bytes at the first request after the change
    is folded (the Admin API answers once it is), for every spelling, GET, HEAD and Range."""
    site, data = prod_site
    spellings = ["/Packages/Foo.pkg", "/CasperShare/Packages/foo.PKG", "/Packages/%46oo%2Epkg"]

    def statuses() -> set[int]:
        return {raw(site, m, p, h)[0] for p in spellings for m in ("GET", "HEAD")
                for h in ({}, {"Range": "bytes=0-9"})}

    def warm() -> None:
        for _ in range(2):
            s, _, body = raw(site, "GET", "/Packages/Foo.pkg")
            assert s == 200 and body == data

    with site.client() as admin:
        warm()
        assert admin.patch("/api/v1/packages/Foo.pkg", json={"stage": "test"}).status_code == 200
        assert statuses() == {404}                     # demoted out of this site's stages
        assert admin.patch("/api/v1/packages/Foo.pkg", json={"stage": "prod"}).status_code == 200
        assert statuses() <= {200, 206}
        warm()
        path = site.data / "store" / "packages" / name_key("Foo.pkg")
        with open(path, "r+b") as f:                   # bit rot under the held descriptor
            f.seek(MiB + 5)
            f.write(bytes([data[MiB + 5] ^ 0xFF]))
        r = admin.post("/api/v1/verify")
        assert r.status_code == 200 and r.json()["damaged"] == ["Foo.pkg"], r.text
        assert statuses() == {503}                     # never the bad bytes
        assert admin.delete("/api/v1/packages/Foo.pkg").status_code == 200
        assert statuses() == {404}


NOT_SERVED = ["/Packages/Foo.pkg/", "/Packages//Foo.pkg", "/packages/Foo.pkg", "/CASPERSHARE/Packages/Foo.pkg",
              "/Packages/Foo.pkg;x", "/Packages/Foo.pkg%20", "/Packages/Foo.pkg%0d%0aX-Evil:%201",
              "/Packages/Foo.pkg%00", "/Packages/" + "A" * 5000, "/Packages", "/CasperShare/Packages",
              "/Packages/T.pkg", "/Packages/t.PKG"]  # the last two: a stage this site does not replicate


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_path_spellings_that_are_not_a_served_package_are_4xx(prod_site_read_only, method):
    site, data = prod_site_read_only
    for path in NOT_SERVED:
        status, headers, body = raw(site, method, path)
        assert 400 <= status < 500, (path, status)
        assert "x-evil" not in headers and data[:64] not in body, path
    status, _, body = raw(site, "GET", "/Packages/Foo.pkg?x=1&y=%2F..")  # a query is not part of the name
    assert status == 200 and body == data


def test_other_methods_and_the_accel_header(prod_site_read_only):
    site, data = prod_site_read_only
    for method in ("OPTIONS", "TRACE", "CONNECT", "PROPFIND", "DELETE"):
        status, headers, body = raw(site, method, "/Packages/Foo.pkg")
        assert status == 405 and headers["allow"] == "GET, HEAD" and data[:64] not in body, method
    assert raw(site, "get", "/Packages/Foo.pkg")[0] == 400  # methods are case-sensitive
    # X-ODST-Accel-Redirect (nginx sets it): only a plain location is echoed, only for a served package
    accel = {"X-ODST-Accel-Redirect": "/_odst_store/"}
    status, headers, body = raw(site, "GET", "/Packages/FOO.pkg", accel)
    assert (status, headers["x-accel-redirect"], body) == (200, "/_odst_store/foo.pkg", b"")
    assert "x-accel-redirect" not in raw(site, "GET", "/Packages/T.pkg", accel)[1]
    for bad in ("/../etc/", "/x/../", "_odst_store/", "/a b/", "http://evil/"):
        status, headers, body = raw(site, "GET", "/Packages/Foo.pkg", {"X-ODST-Accel-Redirect": bad})
        assert status == 200 and "x-accel-redirect" not in headers and body == data, bad


def test_range_abuse_never_amplifies_nor_fails(prod_site_read_only):
    """Many ranges, overlapping ranges and numbers past 64 bits: the whole file once (multiple
    ranges are not served), a 416, or the one range; never a 5xx, never more than the file."""
    site, data = prod_site_read_only
    size = len(data)
    cases = {"bytes=" + ",".join(f"{i}-{i + 1000}" for i in range(0, 2000 * 7, 7)): 200,
             "bytes=0-99999999999999999999999999": 200, "bytes=99999999999999999999999-": 200,
             "bytes=-99999999999999999999999": 200, "bytes=0-1,0-1": 200, "bytes=5-4": 200,
             f"bytes={size}-": 416, "bytes=0-0x10": 200, "bytes=\xd9\xa0-1": 200, "bytes=-5": 206}
    for rng, expected in cases.items():
        status, headers, body = raw(site, "GET", "/Packages/Foo.pkg", {"Range": rng})
        assert status == expected, (rng[:40], status)
        assert len(body) <= size and int(headers["content-length"]) == len(body)
        if status == 200:
            assert body == data


def _rss_mib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) // 1024


def test_long_names_that_are_not_names_are_not_kept(site):
    """The answers cache is keyed by the name asked for, and a request head may be 64 KiB: 4000
    requests for 60 KB non-names (a control character) used to keep 240 MB in the gateway until
    the next fold. Only answers for real package names are kept now."""
    before = _rss_mib(site.proc.pid)
    with socket.create_connection(("127.0.0.1", site.port), timeout=30) as s, s.makefile("rb") as f:
        for i in range(4000):
            s.sendall(f"GET /Packages/{i:05d}%01{'a' * 60000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, length = f.readline(), 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            f.read(length)
            assert b" 404 " in status, status
    assert _rss_mib(site.proc.pid) - before < 80  # was +236 MiB


def test_held_package_files_stay_within_the_descriptor_limit(site):
    """Each package asked for keeps its file open (up to 4096, for 10 s after its last use): a
    gateway under a shell's descriptor limit (1024 on Linux, 256 on macOS) ran out of
    descriptors when Macs asked for more packages than that at once, and then failed every
    connection. The files held are now a quarter of the limit at most."""
    import resource

    names = [f"p{i:03d}.pkg" for i in range(150)]
    with site.client() as admin, ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda n: admin.put(f"/api/v1/packages/{n}", content=n.encode()).status_code,
                            names)) == {201}
    fds = f"/proc/{site.proc.pid}/fd"
    resource.prlimit(site.proc.pid, resource.RLIMIT_NOFILE, (len(os.listdir(fds)) + 100,) * 2)
    with httpx.Client(base_url=site.url, timeout=30) as c:
        got = [c.get(f"/Packages/{n}") for n in names]
        assert [(r.status_code, r.content) for r in got] == [(200, n.encode()) for n in names]
    assert httpx.get(f"{site.url}/healthz", timeout=10).status_code == 200


def _set_caps(site, **caps) -> None:
    with site.client() as admin:
        assert admin.put("/api/v1/bandwidth/downloads", json=caps).status_code == 200
    wait_until(lambda: httpx.get(f"{site.url}/api/v1/bandwidth", timeout=10, headers={
        "Authorization": f"Bearer {site.token}"}).json()["downloads"]["max_concurrent"] == caps["max_concurrent"],
        10, what="the caps in force")


def test_download_auth_and_per_client_caps_hold_against_header_tricks(make_site):
    """With download_auth=basic, nothing of a package without the password: not the accel
    answer, not a 503 that tells it exists. The per-client cap counts the connection's address:
    X-Forwarded-For from a client is not believed (no trusted_proxies). A client that hangs up
    gives its slot back."""
    site = make_site(env={"ODST_DOWNLOAD_AUTH": "basic", "ODST_DOWNLOAD_USER": "mac",
                          "ODST_DOWNLOAD_PASSWORD": "pw"}).start()
    with site.client() as admin:
        assert admin.put("/api/v1/packages/Big.pkg", content=random.Random(3).randbytes(16 * MiB)).status_code == 201
    right = "Basic bWFjOnB3"  # mac:pw
    for headers in ({"X-ODST-Accel-Redirect": "/_odst_store/"}, {"Authorization": "Basic bWFjOnB3IA=="},
                    {"Authorization": f"{right}, Basic x"}, {"X-Original-URL": "/healthz"}):
        status, got, body = raw(site, "GET", "/Packages/Big.pkg", headers)
        assert status == 401 and "x-accel-redirect" not in got and len(body) < 100, headers
    status, got, _ = raw(site, "GET", "/Packages/Big.pkg", {"Authorization": right,
                                                          "X-ODST-Accel-Redirect": "/_odst_store/"})
    assert (status, got["x-accel-redirect"]) == (200, "/_odst_store/big.pkg")
    _set_caps(site, max_concurrent=0, per_client=1)
    auth = {"Authorization": right}
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    held.connect(("127.0.0.1", site.port))
    held.sendall(b"GET /Packages/Big.pkg HTTP/1.1\r\nHost: x\r\nAuthorization: Basic bWFjOnB3\r\n\r\n")
    try:
        wait_until(lambda: raw(site, "HEAD", "/Packages/Big.pkg", auth)[0] == 200 and
                   raw(site, "GET", "/Packages/Big.pkg", {**auth, "Range": "bytes=0-0"})[0] == 503, 10,
                   what="the one slot of this address taken")
        for spoof in ("10.9.8.7", "10.9.8.7, 127.0.0.1"):
            assert raw(site, "GET", "/Packages/Big.pkg", {**auth, "Range": "bytes=0-0",
                                                          "X-Forwarded-For": spoof})[0] == 503, spoof
    finally:
        held.close()
    wait_until(lambda: raw(site, "GET", "/Packages/Big.pkg", {**auth, "Range": "bytes=0-0"})[0] == 206, 10,
               what="the slot given back when the client hung up")


def test_a_client_that_stops_reading_does_not_hold_a_download_slot_for_ever(make_site):
    """A response body waited for room in the socket with no deadline, so a client that requests
    a package and never reads kept its connection, descriptors and, under the ``max_concurrent``
    download cap, its slot for ever: a handful of such clients and every Mac got 503 (measured:
    the slot still held after 75 s). Now the response is dropped after ``send_timeout_s``
    without a byte taken (nginx's ``send_timeout``, 60 s by default; 2 s here)."""
    site = make_site(env={"ODST_SEND_TIMEOUT_S": "2"}).start()
    with site.client() as admin:
        assert admin.put("/api/v1/packages/Big.pkg", content=random.Random(2).randbytes(16 * MiB)).status_code == 201
    _set_caps(site, max_concurrent=1)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", site.port))
    try:
        stalled.sendall(b"GET /Packages/Big.pkg HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
        wait_until(lambda: httpx.get(f"{site.url}/Packages/Big.pkg", timeout=10).status_code == 503, 10,
                   what="the stalled download to take the one slot")
        wait_until(lambda: httpx.get(f"{site.url}/Packages/Big.pkg", timeout=30).status_code == 200, 15,
                   what="the slot of a client that stopped reading to be given back")
    finally:
        stalled.close()


# ---------------------------------------------------------------- chunk runs between peers

def test_chunk_requests_an_attacker_can_make(pair_holding):
    """Unsigned, replayed, signed for another target, reversed, out of bounds, past 64 bits,
    content not held, and content deleted: never a chunk's bytes, never a 5xx."""
    a, b, a_id, b_id, data = pair_holding
    blake3 = manifest_of([data]).blake3
    key = SiteKey.load_or_create(b.data / "site.key")

    def get(target: str, headers: dict | None = None) -> httpx.Response:
        return httpx.get(a.url + target, headers=sign_request(key, "GET", target) if headers is None else headers,
                         timeout=30)

    ok = run_target(blake3, 1, 2)
    assert get(ok).content == data[CHUNK_SIZE:3 * CHUNK_SIZE]
    assert get(ok, {}).status_code == 403                                          # unsigned
    signed = sign_request(key, "GET", ok)
    assert get(ok, signed).status_code == 200
    assert get(ok, signed).status_code == 403                                      # replayed
    forged = {**sign_request(key, "GET", ok), "x-odst-site": a_id}
    assert get(ok, forged).status_code == 403                                      # another site's name
    stale = {**sign_request(key, "GET", ok), "x-odst-ts": str(int(time.time()) - 3600)}
    assert get(ok, stale).status_code == 403                                       # old (and not its signature)
    for target in (f"/peer/v1/chunks/{blake3}/5-2", f"/peer/v1/chunks/{blake3}/7-8",
                   f"/peer/v1/chunks/{blake3}/8", f"/peer/v1/chunks/{blake3}/9223372036854775806-9223372036854775807",
                   f"/peer/v1/chunks/{blake3}/99999999999999999999", f"/peer/v1/chunks/{blake3}/-1",
                   f"/peer/v1/chunks/{blake3}/1-", f"/peer/v1/chunks/{blake3}/%31", f"/peer/v1/chunks/{blake3}/+1",
                   f"/peer/v1/chunks/{'0' * 64}/0", f"/peer/v1/chunks/{blake3}/0/1", f"/peer/v1/chunks/{blake3}"):
        r = get(target)
        assert r.status_code in (403, 404), (target, r.status_code, r.text[:200])
        assert data[:64] not in r.content
    assert httpx.post(a.url + ok, headers=sign_request(key, "POST", ok), timeout=30).status_code == 405
    with a.client() as admin:
        assert admin.delete("/api/v1/packages/runs.pkg").status_code == 200
    r = get(ok)
    assert r.status_code == 404 and data[:64] not in r.content                     # deleted: no longer served


def test_a_removed_peer_gets_no_chunks(pair_holding):
    a, b, a_id, b_id, data = pair_holding
    blake3 = manifest_of([data]).blake3
    key = SiteKey.load_or_create(b.data / "site.key")
    target = run_target(blake3, 0, 0)
    assert httpx.get(a.url + target, headers=sign_request(key, "GET", target), timeout=30).status_code == 200
    with a.client() as admin:
        r = admin.delete(f"/api/v1/peers/{b_id}")
        assert r.status_code == 200, r.text
    r = httpx.get(a.url + target, headers=sign_request(key, "GET", target), timeout=30)
    assert r.status_code == 403 and "not a registered peer" in r.text


def test_a_signed_chunk_request_is_not_replayable_across_gateway_processes(make_site, tmp_path):
    """With http_workers > 1 each gateway process kept its own nonces (RequestVerifier), so one
    captured signed request was served once per process within the 300 s window (measured with
    2 workers: 200, 200, then 403s). The nonce is now claimed in a bucket every process of the
    site shares (peering.requests.SharedNonces): served once, whichever process answers."""
    from tests.system.test_replication import register, upload

    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"],
                  env={"ODST_HTTP_WORKERS": "2"}).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    register(a, b)
    src = write_random(tmp_path / "x.pkg", 2 * MiB, seed=3)
    upload(a, "x.pkg", src)
    target = run_target(manifest_of([src.read_bytes()]).blake3, 0, 0)
    signed = sign_request(SiteKey.load_or_create(b.data / "site.key"), "GET", target)
    codes = [httpx.get(a.url + target, headers=signed, timeout=30).status_code for _ in range(12)]  # new connections
    assert codes == [200] + [403] * 11, codes


def test_the_shared_nonce_record_accepts_a_nonce_once_whichever_process_asks(nats_server, tmp_path):
    """Two processes' verifiers, each on its own connection to one broker: a request one of them
    accepted is a replay to the other (and to itself, already in process); a nonce is one
    site's (another site may use the same); with the broker unreachable nothing is accepted."""
    peer, other = (SiteKey.load_or_create(tmp_path / f"{n}.key") for n in ("peer", "other"))
    keys = {peer.site_id: peer.public_key, other.site_id: other.public_key}

    async def story():
        ncs = [await nats.connect(nats_server.url) for _ in range(2)]
        try:
            first, second = [RequestVerifier(keys.get, shared=await SharedNonces(nc.jetstream()).open())
                             for nc in ncs]
            signed = sign_request(peer, "GET", "/t")
            assert await first.check("GET", "/t", signed) == peer.site_id
            for verifier in (second, first):
                with pytest.raises(PeerRequestRefused, match="replayed"):
                    await verifier.check("GET", "/t", signed)
            assert await second.check("GET", "/t", sign_request(peer, "GET", "/t")) == peer.site_id
            theirs = {**sign_request(other, "GET", "/t"), HEADER_NONCE: signed[HEADER_NONCE]}
            theirs[HEADER_SIG] = base64.b64encode(other.sign_detached(
                f"GET\n/t\n{theirs[HEADER_TS]}\n{signed[HEADER_NONCE]}\n{other.site_id}".encode())).decode()
            assert await second.check("GET", "/t", theirs) == other.site_id
        finally:
            await ncs[1].close()
        await ncs[0].close()
        with pytest.raises(NonceStoreUnavailable):
            await first.check("GET", "/t", sign_request(peer, "GET", "/t"))
    asyncio.run(story())


# ---------------------------------------------------------------- group commit

def test_a_group_commit_beside_another_writer_of_the_same_log(nats_server, tmp_path):
    """A second gateway process (http_workers > 1) appends to the same log while a group is in
    flight: runs are refused at the point the other writer got in and re-chained; every caller
    gets its own event, and the log stays one chain."""
    async def run():
        async with founded_log(nats_server.url, tmp_path) as (js, key, _, writer, _reader):
            other = EventLog(js, key)  # the other process's writer: its own idea of the head
            group = GroupCommit(writer.append, writer.append_many, max_batch=8)
            mine = [ev.PackageStaged(name=f"g{i}.pkg", stage="test") for i in range(40)]
            theirs = [ev.PackageStaged(name=f"o{i}.pkg", stage="test") for i in range(40)]

            async def other_writer():
                out = []
                for e in theirs:
                    out.append(await other.append(e, actor="other"))
                    await asyncio.sleep(0)
                return out
            grouped, alone = await asyncio.gather(
                asyncio.gather(*(group(e, actor="t") for e in mine), return_exceptions=True), other_writer())
            total = 1 + len(mine) + len(theirs)
            return grouped, alone, dict(group.counts), await messages(js, total), total, key

    grouped, alone, counts, msgs, total, key = asyncio.run(run())
    assert all(isinstance(r, Appended) for r in grouped), [r for r in grouped if not isinstance(r, Appended)][:3]
    assert [r.envelope.event.name for r in grouped] == [f"g{i}.pkg" for i in range(40)]  # each its own
    assert [r.envelope.event.name for r in alone] == [f"o{i}.pkg" for i in range(40)]
    assert len({r.seq for r in grouped} | {r.seq for r in alone}) == 80
    assert counts["rounds"] < counts["events"] == 40  # grouped at least once
    assert assert_one_chain(msgs, key) == total


# ---------------------------------------------------------------- uploads on a full disk

@pytest.fixture
def small_store(tmp_path):
    """An 8 MiB tmpfs as the store: a real ENOSPC (mounting needs root), and a 2% reserve
    smaller than a small body, so one can be admitted and still not fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "small-store"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_uploads_on_a_full_store_are_507_and_leave_nothing(make_site, small_store):
    store = small_store / "store"
    site = make_site(env={"ODST_STORE": str(store)}).start()

    def stream(n: int, seed: int, piece: int = 64 * 1024):
        r, left = random.Random(seed), n
        while left:
            k = min(piece, left)
            left -= k
            yield r.randbytes(k)

    def files() -> tuple[list[str], list[str]]:
        return sorted(os.listdir(store / "tmp")), sorted(os.listdir(store / "packages"))

    def free_over_reserve() -> int:
        st = os.statvfs(store)
        return st.f_bavail * st.f_frsize - min(64 * MiB, st.f_blocks * st.f_frsize // 50)

    with site.client() as admin:
        # no Content-Length: admitted, then the writer thread meets ENOSPC part way
        r = admin.put("/api/v1/packages/big.pkg", content=stream(24 * MiB, 2))
        assert r.status_code == 507 and "no space" in r.json()["detail"], r.text
        # announced: refused before a byte is written
        r = admin.put("/api/v1/packages/cl.pkg", content=b"x" * (24 * MiB))
        assert r.status_code == 507 and "not enough free space" in r.json()["detail"], r.text
        # leave 20 kB over the reserve: a small body (one hand-off, on the pool) is admitted,
        # then its write meets ENOSPC
        assert admin.put("/api/v1/packages/fill.pkg",
                         content=stream(free_over_reserve() - 20_000, 1)).status_code == 201
        r = admin.put("/api/v1/packages/small.pkg", content=stream(250_000, 3))
        assert r.status_code == 507 and "no space" in r.json()["detail"], r.text
        assert admin.put("/api/v1/packages/tiny.pkg", content=b"t" * 1000).status_code == 201  # still works
        published = {p["name"] for p in admin.get("/api/v1/packages").json()["packages"]}
    assert published == {"fill.pkg", "tiny.pkg"}
    assert files() == ([], sorted(name_key(n) for n in published))  # no temp file, nothing half published
    assert httpx.get(f"{site.url}/healthz", timeout=10).status_code == 200


def test_a_truncated_upload_publishes_nothing(site):
    s = socket.create_connection(("127.0.0.1", site.port))
    s.sendall(b"PUT /api/v1/packages/trunc.pkg HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
              + site.token.encode() + b"\r\nContent-Length: 5000000\r\n\r\n" + b"y" * 3_000_000)
    tmp = site.data / "store" / "tmp"
    wait_until(lambda: any(tmp.iterdir()), 10, what="the upload under way")
    s.close()
    wait_until(lambda: not any(tmp.iterdir()), 10, what="the truncated upload's temp file removed")
    with site.client() as admin:
        assert admin.get("/api/v1/packages/trunc.pkg").status_code == 404
    assert not (site.data / "store" / "packages" / "trunc.pkg").exists()
