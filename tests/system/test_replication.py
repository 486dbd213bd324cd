"""Two real sites linked by a NATS leaf node: replication, registration, removal, repair
(the chunk transports' contract is in test_contracts.py)."""

from __future__ import annotations

import hashlib
import sqlite3

import httpx
import pytest

from odst.datadir import read_model_path
from odst.events.signing import SiteKey
from odst.peering.requests import sign_request
from tests.conftest import free_port, wait_until, write_random


def state(site) -> dict:
    with site.client() as c:
        return c.get("/api/v1/state").json()


def register(a, b) -> dict:
    with a.client() as ca, b.client() as cb:
        token = ca.post("/api/v1/peers/invites", json={}).json()["token"]
        r = cb.post("/api/v1/peers/join", json={"token": token})
        assert r.status_code == 201, r.text
        wait_linked(a, b)
        return r.json()


def wait_linked(*sites) -> None:
    """Until every site mirrors every other (its leaf identity is accepted once registered)."""
    def linked(site):
        with site.client() as c:
            peers = c.get("/api/v1/peers").json()["peers"]
        return len(peers) >= len(sites) - 1 and all(p["link"]["link"] == "up" for p in peers)
    for s in sites:
        wait_until(lambda: linked(s), 60, what=f"{s.data.name} to mirror its peers")


def start_pair(make_site) -> tuple:
    """Sites A (leaf listener) and B (dials A), registered and mirroring each other."""
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    register(a, b)
    return a, b


@pytest.fixture
def pair(make_site):
    return start_pair(make_site)


def upload(site, name: str, path, stage: str | None = None) -> dict:
    with site.client() as c, open(path, "rb") as f:
        r = c.put(f"/api/v1/packages/{name}", content=f, params={"stage": stage} if stage else {})
        assert r.status_code in (200, 201), r.text
        return r.json()


def available_at(site, name: str, site_id: str) -> bool:
    with site.client() as c:
        r = c.get(f"/api/v1/packages/{name}")
        return r.status_code == 200 and r.json()["availability"].get(site_id, {}).get("status") == "available"


def site_id(site) -> str:
    with site.client() as c:
        return c.get("/api/v1/site").json()["site"]


def test_upload_at_one_site_is_served_verified_by_the_other(pair, tmp_path):
    a, b = pair
    src = write_random(tmp_path / "p.pkg", 3 * (1 << 20) + 11, seed=1)
    pkg = upload(a, "Firefox.pkg", src)
    b_id = site_id(b)
    wait_until(lambda: available_at(b, "Firefox.pkg", b_id), 60, what="replication to B")
    body = httpx.get(f"{b.url}/CasperShare/Packages/Firefox.pkg", timeout=30).content
    assert hashlib.sha1(body).hexdigest() == pkg["sha1"]
    wait_until(lambda: state(a)["digest"] == state(b)["digest"], 30, what="digests to agree")
    # both sites' logs pass the audit, peers' events included
    from tests.conftest import run_odst
    for s in (a, b):
        out = run_odst("audit", "--data", str(s.data))
        assert out.returncode == 0, out.stdout + out.stderr


def test_peer_requests_are_signed_and_not_replayable(pair, tmp_path):
    a, b = pair
    pkg = upload(a, "r.pkg", write_random(tmp_path / "r.pkg", 1000, seed=3))
    b_key = SiteKey.load_or_create(b.data / "site.key")
    target = f"/peer/v1/chunks/{pkg['blake3']}/0"
    assert httpx.get(a.url + target).status_code == 403  # unsigned
    headers = sign_request(b_key, "GET", target)
    assert httpx.get(a.url + target, headers=headers).status_code == 200
    assert httpx.get(a.url + target, headers=headers).status_code == 403  # replayed nonce
    other = sign_request(b_key, "GET", f"/peer/v1/chunks/{pkg['blake3']}/1")
    assert httpx.get(a.url + target, headers=other).status_code == 403  # signed for another target


def test_bad_invitations_are_refused_clearly(pair, make_site):
    a, b = pair
    with b.client() as cb, a.client() as ca:
        for token, needle in [("garbage", "odst-invite-"), ("odst-invite-AAAA", "damaged")]:
            r = cb.post("/api/v1/peers/join", json={"token": token})
            assert r.status_code == 400 and needle in r.json()["detail"]
        token = ca.post("/api/v1/peers/invites", json={}).json()["token"]
        assert ca.post("/api/v1/peers/join", json={"token": token}).status_code == 400  # itself
        assert cb.post("/api/v1/peers/join", json={"token": token}).status_code == 201
        c = make_site("c").start()  # not linked: cannot reach A by NATS; HTTP works
        with c.client() as cc:
            r = cc.post("/api/v1/peers/join", json={"token": token})
            assert r.status_code == 400 and "already used" in r.json()["detail"]
        assert cb.post("/api/v1/peers/join", json={}).status_code == 400


def test_a_removed_peer_is_ignored(make_site, tmp_path):
    """B removes A: A's later events still reach B's mirror of A's log (through their hub,
    whose link B keeps) and are folded as ignored, never as packages; nor does the hub's
    report of holding A's later package bring it in (the hub still trusts A, B does not).
    (Were A B's own hub, B would dial it no more: odst.bus.hubs, test_peer_removal_link.)"""
    from tests.system.test_mirror_injection import hub_with_spokes
    _, hub, (a, b) = hub_with_spokes(make_site, "C", "D")  # a and b: two spokes of one hub
    register(a, b)
    a_id, b_id, hub_id = site_id(a), site_id(b), site_id(hub)
    upload(a, "before.pkg", write_random(tmp_path / "1.pkg", 5000, seed=4))
    wait_until(lambda: available_at(b, "before.pkg", b_id), 60, what="first package at B")
    with b.client() as cb:
        assert cb.delete(f"/api/v1/peers/{a_id}").status_code == 200
        assert cb.delete("/api/v1/peers/snotapeer").status_code == 404
    upload(a, "after.pkg", write_random(tmp_path / "2.pkg", 5000, seed=5))

    def ignored():
        with b.client() as cb:
            q = cb.get("/api/v1/quarantine").json()["quarantine"]
            return any(x["kind"] == "ignored" and x["origin"] == a_id for x in q)
    wait_until(ignored, 60, what="B to ignore A's later event")
    wait_until(lambda: available_at(hub, "after.pkg", hub_id), 60, what="the hub to pull A's later package")

    def hub_report_folded_at_b() -> bool:
        # one PackageAvailable, or a PackagesAvailable naming it: a hub that had not pulled
        # before.pkg yet reports both together
        with sqlite3.connect(f"file:{read_model_path(b.data)}?mode=ro", uri=True) as db:
            return db.execute("SELECT 1 FROM events WHERE origin=? AND type IN ('PackageAvailable', 'PackagesAvailable')"
                              " AND (subject_name='after.pkg' OR id IN (SELECT event_id FROM event_names"
                              " WHERE name='after.pkg'))", (hub_id,)).fetchone() is not None
    wait_until(hub_report_folded_at_b, 60, what="B to fold the hub's report of A's later package")
    with b.client() as cb:
        assert cb.get("/api/v1/packages/after.pkg").status_code == 404
        assert cb.get("/api/v1/packages/before.pkg").status_code == 200


def test_verify_finds_bit_rot_and_repairs_from_the_peer(pair, tmp_path):
    a, b = pair
    pkg = upload(a, "rot.pkg", write_random(tmp_path / "rot.pkg", 2 * (1 << 20), seed=6))
    b_id = site_id(b)
    wait_until(lambda: available_at(b, "rot.pkg", b_id), 60, what="replication to B")
    stored = b.data / "store" / "packages" / "rot.pkg"
    with open(stored, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\x00\xff" * 8)
    with b.client() as cb:
        report = cb.post("/api/v1/verify").json()
    assert report["damaged"] == ["rot.pkg"] and report["repairing"] == ["rot.pkg"]
    wait_until(lambda: available_at(b, "rot.pkg", b_id) and stored.exists()
               and hashlib.sha1(stored.read_bytes()).hexdigest() == pkg["sha1"], 60, what="repair")
    with b.client() as cb:
        assert cb.post("/api/v1/verify").json()["ok"] == 1


def test_stage_policy_and_promotion(make_site, tmp_path):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}",
                                   "--accept-stage", "prod"]).start()
    register(a, b)
    b_id = site_id(b)
    upload(a, "beta.pkg", write_random(tmp_path / "b.pkg", 4000, seed=7), stage="test")
    upload(a, "marker.pkg", write_random(tmp_path / "m.pkg", 4000, seed=8), stage="prod")
    wait_until(lambda: available_at(b, "marker.pkg", b_id), 60, what="the prod package at B")
    assert not available_at(b, "beta.pkg", b_id)  # same age, not accepted: never pulled
    with a.client() as ca:
        assert ca.patch("/api/v1/packages/beta.pkg", json={"stage": "prod"}).status_code == 200
    wait_until(lambda: available_at(b, "beta.pkg", b_id), 60, what="the promoted package at B")


def test_delete_reaches_the_other_site(pair, tmp_path):
    a, b = pair
    b_id = site_id(b)
    upload(a, "gone.pkg", write_random(tmp_path / "g.pkg", 4000, seed=9))
    wait_until(lambda: available_at(b, "gone.pkg", b_id), 60, what="replication to B")
    with a.client() as ca:
        assert ca.delete("/api/v1/packages/gone.pkg").status_code == 200
    stored = b.data / "store" / "packages" / "gone.pkg"
    wait_until(lambda: not stored.exists(), 60, what="B to remove the deleted package")
    assert httpx.get(f"{b.url}/Packages/gone.pkg").status_code == 404


def test_a_leaf_loop_is_refused_with_a_clear_message(make_site):
    p1, p2 = free_port(), free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{p1}", "--leaf-remote", f"nats-leaf://127.0.0.1:{p2}"])
    b = make_site("b", extra_args=["--leaf-listen", f"127.0.0.1:{p2}", "--leaf-remote", f"nats-leaf://127.0.0.1:{p1}"])
    for s in (a, b):
        s.start_process()
    for s in (a, b):
        wait_until(lambda: httpx.get(f"{s.url}/api/v1/site", timeout=2,
                                     headers={"Authorization": f"Bearer {s.token}"}).status_code == 200,
                   60, what=f"{s.data.name} to answer")
    # leaf links are refused until the sites know each other's keys: register them, over HTTP
    with a.client() as ca, b.client() as cb:
        token = ca.post("/api/v1/peers/invites", json={}).json()["token"]
        assert cb.post("/api/v1/peers/join", json={"token": token}).status_code == 201

    def loop_reported():
        for s in (a, b):
            r = httpx.get(f"{s.url}/healthz", timeout=2)
            if r.status_code == 503 and "loop" in r.json()["reason"] and "tree" in r.json()["reason"]:
                return True
    wait_until(loop_reported, 60, what="a site to report the leaf loop on /healthz")


def test_a_site_unreachable_over_http_replicates_over_nats(make_site, tmp_path):
    """The firewalled case: B can reach A only through the leaf link A dialled out on."""
    leaf = free_port()
    b = make_site("b", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}"]).start()
    a = make_site("a", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}",
                                   "--public-url", "http://127.0.0.1:9"]).start()  # closed port
    joined = register(a, b)  # A invites; B joins over NATS (A's HTTP is unreachable)
    assert joined["via"] == "nats"
    pkg = upload(a, "fw.pkg", write_random(tmp_path / "fw.pkg", 3 * (1 << 20) + 3, seed=10))
    b_id = site_id(b)
    wait_until(lambda: available_at(b, "fw.pkg", b_id), 90, what="replication over NATS")
    assert hashlib.sha1(httpx.get(f"{b.url}/Packages/fw.pkg").content).hexdigest() == pkg["sha1"]
    assert state(a)["chunks_served"].get(b_id, 0) >= 4
