"""Batches of small packages between real sites: one signed request names up to 32 small
contents and gets their bytes back to back; the receiver checks each content's chunks against
their SHA1s and the whole against its blake3 before it is written, so a peer sending corrupt
bytes for one package of a batch gets that package alone rejected; a peer that serves no
batches (``peer_run_chunks = 1``, as older versions) is pulled from one package at a time."""

from __future__ import annotations

import hashlib

import blake3
import httpx
import pytest

from odst.events.signing import SiteKey
from odst.naming import name_key
from odst.peering.requests import sign_request
from odst.replicator.transport import BATCH_MAX, batch_target
from odst.store.files import content_tag
from tests.conftest import all_events, free_port, wait_until, write_random
from tests.system.test_replication import available_at, register, site_id, start_pair, upload
from tests.system.test_sync_derived import held_at, upload_many

pytestmark = pytest.mark.timeout(300)


def small_bodies(n: int, prefix: str) -> dict[str, bytes]:
    return {f"{prefix} {i:02d}.pkg": hashlib.sha512(f"{prefix}{i}".encode()).digest() * (30 + i) for i in range(n)}


def signed_get(site, key: SiteKey, target: str) -> httpx.Response:
    return httpx.get(site.url + target, headers=sign_request(key, "GET", target), timeout=30)


def test_a_batch_is_one_signed_target_and_bounded(make_site, tmp_path):
    a, b = start_pair(make_site)
    bodies = small_bodies(3, "B")
    pkgs = {name: upload_one(a, name, body) for name, body in bodies.items()}
    big = upload(a, "big.pkg", write_random(tmp_path / "big.pkg", (1 << 20) + 1, seed=3))
    b_id = site_id(b)
    wait_until(lambda: all(available_at(b, n, b_id) for n in [*bodies, "big.pkg"]), 60, what="the packages at B")
    key = SiteKey.load_or_create(b.data / "site.key")
    blake3s = [pkgs[n]["blake3"] for n in bodies]

    r = signed_get(a, key, batch_target(blake3s))
    assert r.status_code == 200 and r.content == b"".join(bodies.values())
    r = signed_get(a, key, batch_target(blake3s[::-1]))  # in the order asked
    assert r.status_code == 200 and r.content == b"".join(list(bodies.values())[::-1])
    other = sign_request(key, "GET", batch_target(blake3s[:2]))
    assert httpx.get(a.url + batch_target(blake3s), headers=other).status_code == 403  # signed for another batch
    for target, why in ((batch_target(blake3s * (BATCH_MAX // 3 + 1)), "at most"),
                        (batch_target([*blake3s, big["blake3"]]), "not for a batch"),
                        (batch_target([*blake3s, "0" * 64]), "not held here")):
        r = signed_get(a, key, target)
        assert r.status_code == 404 and why in r.json()["detail"], r.text
        assert r.json()["error"] == "batch_unavailable"  # this batch: its contents one by one


def upload_one(site, name: str, body: bytes) -> dict:
    with site.client() as c:
        r = c.put(f"/api/v1/packages/{name}", content=body)
        assert r.status_code == 201, r.text
        return r.json()


def test_corrupt_bytes_for_one_package_of_a_batch_reject_that_package_alone(make_site):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    bodies = small_bodies(20, "C")
    upload_many(a, bodies)
    bad = "C 07.pkg"
    stored = a.data / "store" / "packages" / name_key(bad)
    with open(stored, "r+b") as f:  # same size, same label: only the bytes are wrong
        f.seek(100)
        f.write(bytes(b ^ 0xFF for b in bodies[bad][100:110]))
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    register(a, b)
    a_id, b_id = site_id(a), site_id(b)

    wait_until(lambda: held_at(b, b_id) == len(bodies) - 1, 120, interval=0.3, what="B to hold every good package")

    def rejected() -> list[dict]:
        with b.client() as c:
            return [e for e in all_events(c) if e["type"] == "ChunkRejected"]
    wait_until(rejected, 60, what="B to record the corrupt package's bytes as rejected")
    assert {(e["envelope"]["event"]["name"], e["envelope"]["event"]["source"]) for e in rejected()} == {(bad, a_id)}
    folder = b.data / "store" / "packages"
    assert not (folder / name_key(bad)).exists() and not available_at(b, bad, b_id)
    for name, body in bodies.items():
        if name != bad:
            assert (folder / name_key(name)).read_bytes() == body, f"{name} differs at B"
            with open(folder / name_key(name), "rb") as f:  # labelled with its content (set by fd as written)
                assert content_tag(f.fileno()) == blake3.blake3(body).hexdigest(), f"{name}'s label at B"
    # the good ones came in batches: only the rejected one was pulled again on its own
    pulled_alone = [line for line in b.log(1 << 22).splitlines() if "pulling package" in line]
    assert pulled_alone and all(bad in line for line in pulled_alone), pulled_alone[:5]


def test_a_peer_that_serves_no_batches_is_pulled_from_one_package_at_a_time(make_site):
    leaf = free_port()
    old = make_site("old", env={"ODST_PEER_RUN_CHUNKS": "1"},  # answers a batch 404, as older versions do
                    extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "Old"]).start()
    bodies = small_bodies(6, "O")
    upload_many(old, bodies)
    new = make_site("new", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "New"]).start()
    register(old, new)
    new_id = site_id(new)
    key = SiteKey.load_or_create(new.data / "site.key")
    with old.client() as c:
        blake3 = c.get("/api/v1/packages/O 00.pkg").json()["blake3"]
    r = signed_get(old, key, batch_target([blake3]))
    assert r.status_code == 404 and r.json()["error"] == "chunk_unavailable"  # as older versions answer
    wait_until(lambda: held_at(new, new_id) == len(bodies), 60, what="the pulls from the peer without batches")
    folder = new.data / "store" / "packages"
    for name, body in bodies.items():
        assert (folder / name_key(name)).read_bytes() == body
    assert "peer serves no batches" in new.log(1 << 22)


def test_one_content_under_several_names_in_one_batch_arrives_under_every_name(make_site):
    """A catch-up whose batch holds the same bytes under three names (a copy kept under a
    second name, as admins do): every name arrives soon, not at the next full rescan (5 min)."""
    leaf = free_port()
    hq = make_site("hq", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "HQ"]).start()
    bodies = small_bodies(4, "D")
    same = bodies["D 01.pkg"]
    bodies.update({"D 01 copy.pkg": same, "D 01 latest.pkg": same})
    upload_many(hq, bodies)
    branch = make_site("branch", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}",
                                             "--site-name", "Branch"]).start()
    register(hq, branch)
    branch_id = site_id(branch)
    wait_until(lambda: held_at(branch, branch_id) == len(bodies), 60, what="every name at the branch")
    folder = branch.data / "store" / "packages"
    for name, body in bodies.items():
        assert (folder / name_key(name)).read_bytes() == body
