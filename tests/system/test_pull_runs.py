"""Runs of chunks between real sites: one signed request, several chunks, each verified as it
streams; what happens when a chunk in the middle is corrupt, when the stream is cut, and when
the peer serves one chunk per request only (as older versions do).

The puller here runs in the test process with the real HTTP transport and a site's real key,
against real ``odst serve`` gateways, so each case can be made to happen for certain.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import httpx
import pytest

from odst.events.signing import SiteKey
from odst.naming import name_key
from odst.peering.requests import sign_request
from odst.replicator.puller import Puller, Want
from odst.replicator.runclient import BUFFERS
from odst.replicator.transport import HttpChunkSource, http_session, run_target
from odst.store.files import tag
from odst.store.hashing import CHUNK_SIZE, manifest_of
from tests.conftest import free_port, wait_until, write_random
from tests.system.test_bandwidth import put
from tests.system.test_replication import available_at, register, site_id, start_pair, state, upload

MIB = 1 << 20


def want_of(data: bytes, name: str) -> Want:
    return Want.of(manifest_of([data]), name=name, stage="prod", origin="s", uploaded_ts=1, uploaded_by="t")


def pull(want: Want, sources, tmp_path, **kw) -> tuple[bytes, list]:
    bad: list = []

    async def run():
        async with http_session() as http:
            made = [(HttpChunkSource(sid, url, key, http), cost) for sid, url, key, cost in sources]
            p = Puller(want, made, tmp_path, on_bad_source=lambda site, reason, index: bad.append((site, index)),
                       **kw)
            return (await p.run()).read_bytes()
    return asyncio.run(run()), bad


def pull_together(wants: list[Want], sources, tmp_path, **kw) -> tuple[list[bytes], list]:
    """Several pulls at once in one process (sharing its run client and chunk buffers)."""
    bad: list = []

    async def run():
        async with http_session() as http:
            made = [(HttpChunkSource(sid, url, key, http), cost) for sid, url, key, cost in sources]
            pullers = [Puller(w, made, tmp_path / str(i), on_bad_source=lambda site, reason, index: bad.append(
                (site, index)), **kw) for i, w in enumerate(wants)]
            for i in range(len(wants)):
                (tmp_path / str(i)).mkdir(parents=True)
            return [p.read_bytes() for p in await asyncio.gather(*(p.run() for p in pullers))]
    return asyncio.run(run()), bad


@pytest.fixture
def pair_holding(make_site, tmp_path):
    """A and B registered, both holding one 8-chunk package (B pulled it from A)."""
    a, b = start_pair(make_site)
    src = write_random(tmp_path / "runs.pkg", 8 * CHUNK_SIZE, seed=21)
    upload(a, "runs.pkg", src)
    a_id, b_id = site_id(a), site_id(b)
    wait_until(lambda: available_at(b, "runs.pkg", b_id), 60, what="the package at B")
    return a, b, a_id, b_id, src.read_bytes()


def test_a_corrupt_chunk_in_the_middle_of_a_run_is_refetched_and_the_rest_kept(pair_holding, tmp_path):
    a, b, a_id, b_id, data = pair_holding
    with open(a.data / "store" / "packages" / name_key("runs.pkg"), "r+b") as f:  # bit rot at A, chunk 3
        f.seek(3 * CHUNK_SIZE + 100)
        f.write(bytes([data[3 * CHUNK_SIZE + 100] ^ 0x01]))
    a_key, b_key = SiteKey.load_or_create(a.data / "site.key"), SiteKey.load_or_create(b.data / "site.key")
    served_a, served_b = state(a)["chunks_served"].get(b_id, 0), state(b)["chunks_served"].get(a_id, 0)
    out = tmp_path / "pull"
    out.mkdir()
    # A is asked first (cheaper) as B; B, holding a good copy, is the fallback, asked as A
    got, bad = pull(want_of(data, "runs.pkg"), [(a_id, a.url, b_key, 0.0), (b_id, b.url, a_key, 50.0)], out,
                    streams=1)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert bad == [(a_id, 3)]
    assert state(a)["chunks_served"][b_id] - served_a == 8  # one run of all eight, bad chunk 3 included
    assert state(b)["chunks_served"][a_id] - served_b == 1  # only chunk 3 again, from the other source


def test_reused_chunk_buffers_never_mix_pulls_and_a_corrupt_chunk_is_still_refused(pair_holding, tmp_path):
    """Chunk buffers go back to the process's pool once written and hashed, and the next chunks
    (of this pull, of the next, of one running beside it) are read into them: every pull must
    still come out exact, a corrupt chunk in the middle of a run still refused."""
    a, b, a_id, b_id, data = pair_holding
    other = write_random(tmp_path / "other.pkg", 12 * CHUNK_SIZE + 5, seed=26).read_bytes()
    upload(a, "other.pkg", tmp_path / "other.pkg")
    wait_until(lambda: available_at(b, "other.pkg", b_id), 60, what="other.pkg at B")
    with open(a.data / "store" / "packages" / name_key("runs.pkg"), "r+b") as f:  # bit rot at A, chunk 5
        f.seek(5 * CHUNK_SIZE + 7)
        f.write(bytes([data[5 * CHUNK_SIZE + 7] ^ 0x80]))
    a_key, b_key = SiteKey.load_or_create(a.data / "site.key"), SiteKey.load_or_create(b.data / "site.key")
    sources = [(a_id, a.url, b_key, 0.0), (b_id, b.url, a_key, 50.0)]
    runs, more = want_of(data, "runs.pkg"), want_of(other, "other.pkg")
    BUFFERS.hold()  # as a site's other pulls would: the pool outlives each pull
    try:
        (first,), bad1 = pull_together([runs], sources, tmp_path / "one", streams=1)
        assert BUFFERS.free() > 0  # every buffer of the first pull came back
        reused = BUFFERS.reused
        together, bad2 = pull_together([more, runs], sources, tmp_path / "two", streams=2)
        assert BUFFERS.reused > reused  # the second round read into the first one's buffers
    finally:
        BUFFERS.release()
    assert BUFFERS.free() == 0  # no pull running: no chunk memory kept
    assert hashlib.sha256(first).digest() == hashlib.sha256(data).digest()
    assert hashlib.sha256(together[0]).digest() == hashlib.sha256(other).digest()
    assert hashlib.sha256(together[1]).digest() == hashlib.sha256(data).digest()
    assert bad1 == [(a_id, 5)] and bad2 == [(a_id, 5)]  # refused each time, fetched from B instead


def test_a_run_cut_short_by_the_senders_limit_resumes_without_fetching_a_chunk_twice(pair_holding, tmp_path):
    a, b, a_id, b_id, _ = pair_holding
    data = write_random(tmp_path / "cut.pkg", 3 * CHUNK_SIZE, seed=22).read_bytes()
    upload(a, "cut.pkg", tmp_path / "cut.pkg")
    wait_until(lambda: available_at(b, "cut.pkg", b_id), 60, what="cut.pkg at B")
    # A sends to B at 480 KB/s: the second chunk of a run would wait > 2 s, so A cuts the run there
    put(a, f"/api/v1/bandwidth/links/{b_id}", {"send": 480_000, "local": "no"})
    served = state(a)["chunks_served"].get(b_id, 0)
    out = tmp_path / "pull"
    out.mkdir()
    got, bad = pull(want_of(data, "cut.pkg"), [(a_id, a.url, SiteKey.load_or_create(b.data / "site.key"), 0.0)],
                    out, streams=1)
    assert got == data and not bad
    assert state(a)["chunks_served"][b_id] - served == 3  # every chunk once: the cut kept what came
    log = a.log_tail(200_000)
    assert "chunk run cut short" in log
    assert "without completing response" not in log  # a deliberate cut is no server error


def test_a_peer_that_serves_one_chunk_per_request_is_still_pulled_from(make_site, tmp_path):
    leaf = free_port()
    old = make_site("old", env={"ODST_PEER_RUN_CHUNKS": "1"},  # answers a run 404, as older versions do
                    extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "Old"]).start()
    new = make_site("new", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "New"]).start()
    register(old, new)
    pkg = upload(old, "old.pkg", write_random(tmp_path / "old.pkg", 5 * CHUNK_SIZE + 7, seed=23))
    old_id, new_id = site_id(old), site_id(new)

    key = SiteKey.load_or_create(new.data / "site.key")
    target = run_target(pkg["blake3"], 0, 1)
    r = httpx.get(old.url + target, headers=sign_request(key, "GET", target))
    assert r.status_code == 404 and r.json()["error"] == "chunk_unavailable"

    wait_until(lambda: available_at(new, "old.pkg", new_id), 60, what="the pull from the one-chunk peer")
    assert hashlib.sha1(httpx.get(f"{new.url}/Packages/old.pkg").content).hexdigest() == pkg["sha1"]
    assert state(old)["chunks_served"][new_id] == 6
    assert "source serves one chunk per request" in new.log_tail(200_000)

    # and the other way: the one-chunk site pulls from the new one
    back = upload(new, "new.pkg", write_random(tmp_path / "new.pkg", 2 * CHUNK_SIZE + 1, seed=24))
    wait_until(lambda: available_at(old, "new.pkg", old_id), 60, what="the pull by the one-chunk peer")
    assert hashlib.sha1(httpx.get(f"{old.url}/Packages/new.pkg").content).hexdigest() == back["sha1"]


def test_a_run_is_signed_as_one_target_and_bounded(pair_holding):
    a, b, a_id, b_id, data = pair_holding
    blake3 = want_of(data, "runs.pkg").blake3
    key = SiteKey.load_or_create(b.data / "site.key")
    target = run_target(blake3, 2, 5)
    r = httpx.get(a.url + target, headers=sign_request(key, "GET", target))
    assert r.status_code == 200 and r.content == data[2 * CHUNK_SIZE:6 * CHUNK_SIZE]
    other = sign_request(key, "GET", run_target(blake3, 2, 6))
    assert httpx.get(a.url + target, headers=other).status_code == 403  # signed for another run
    too_long = run_target(blake3, 0, 40)
    r = httpx.get(a.url + too_long, headers=sign_request(key, "GET", too_long))
    assert r.status_code == 404 and "at most" in r.json()["detail"]


def signed_get(site, key: SiteKey, target: str) -> httpx.Response:
    return httpx.get(site.url + target, headers=sign_request(key, "GET", target), timeout=30)


def test_a_zero_copy_run_delivers_the_exact_bytes_up_to_a_short_last_chunk(pair_holding, tmp_path):
    a, b, a_id, b_id, _ = pair_holding
    data = write_random(tmp_path / "odd.pkg", 5 * CHUNK_SIZE + 12_345, seed=25).read_bytes()
    pkg = upload(a, "odd.pkg", tmp_path / "odd.pkg")
    key = SiteKey.load_or_create(b.data / "site.key")
    for first, last in ((0, 5), (3, 5), (1, 2), (5, 5), (0, 0)):  # runs, the short last chunk, single chunks
        r = signed_get(a, key, run_target(pkg["blake3"], first, last))
        assert r.status_code == 200
        expected = data[first * CHUNK_SIZE:(last + 1) * CHUNK_SIZE]
        assert int(r.headers["content-length"]) == len(expected) == len(r.content)
        assert hashlib.sha256(r.content).digest() == hashlib.sha256(expected).digest(), (first, last)


def test_a_run_under_a_send_limit_is_paced_and_still_exact(pair_holding):
    a, b, a_id, b_id, data = pair_holding
    blake3 = want_of(data, "runs.pkg").blake3
    key = SiteKey.load_or_create(b.data / "site.key")
    rate = 2_000_000  # the second to fourth chunks wait about 0.5 s each: paced, never cut (< 2 s)
    put(a, f"/api/v1/bandwidth/links/{b_id}", {"send": rate, "local": "no"})
    t0 = time.monotonic()
    r = signed_get(a, key, run_target(blake3, 0, 3))
    took = time.monotonic() - t0
    assert r.status_code == 200 and r.content == data[:4 * CHUNK_SIZE]
    # a bucket of at most one chunk lets the first go at once; the other three wait for their
    # tokens (a lower bound only: the limit can slow a run, nothing can make it faster)
    assert took >= 0.9 * 3 * CHUNK_SIZE / rate


def test_a_name_replaced_under_the_read_model_serves_no_other_contents_bytes(pair_holding, tmp_path):
    """A replacement renames a new file over the name before the read model knows: a chunk
    request for the old content must not get the new file's bytes (404: ask another source)."""
    a, b, a_id, b_id, data = pair_holding
    blake3 = want_of(data, "runs.pkg").blake3
    key = SiteKey.load_or_create(b.data / "site.key")
    assert signed_get(a, key, run_target(blake3, 0, 1)).status_code == 200
    other = write_random(tmp_path / "other.bin", 8 * CHUNK_SIZE, seed=26)  # same size, another content
    tag(other, want_of(other.read_bytes(), "runs.pkg").blake3)
    os.replace(other, a.data / "store" / "packages" / name_key("runs.pkg"))  # what Store.replace does
    for target in (run_target(blake3, 0, 1), run_target(blake3, 4, 4)):
        r = signed_get(a, key, target)
        assert r.status_code == 404 and "replaced" in r.json()["detail"]
