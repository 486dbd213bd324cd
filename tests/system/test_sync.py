"""Catalogue sync driven by what changed, with real sites: the replicator looks at the packages
the folded events touched (views.changed_keys), not at the whole catalogue on every change;
a full rescan runs at start, on catalogue-wide events (a peer registered, accepted stages) and
every few minutes as a safety net. Each full rescan is logged, so these tests can tell that
uploads, stage changes, replacements, withdrawals and deletions were all picked up without one.
A new site catching up with a few hundred small packages pulls them in batches (several per
worker turn, leases taken together, PackageAvailable appended together) and gets every byte."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import free_port, wait_until
from tests.system.test_replication import available_at, register, site_id


def upload_many(site, bodies: dict[str, bytes]) -> None:
    """Upload every (name, body), eight at a time, each answered 201."""
    def one(item) -> None:
        name, body = item
        with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {site.token}"}, timeout=120) as c:
            r = c.put(f"/api/v1/packages/{name}", content=body)
            assert r.status_code == 201, r.text

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, bodies.items()))

pytestmark = pytest.mark.timeout(300)

FULL_RESCAN = "full rescan of the catalogue"


def full_rescans(site) -> int:
    return site.log_path.read_text(errors="replace").count(FULL_RESCAN)


def put(site, name: str, body: bytes, **params) -> dict:
    with site.client() as c:
        r = c.put(f"/api/v1/packages/{name}", content=body, params=params)
        assert r.status_code in (200, 201), r.text
        return r.json()


def status_at(site, name: str, sid: str) -> str | None:
    with site.client() as c:
        r = c.get(f"/api/v1/packages/{name}")
        return r.json()["availability"].get(sid, {}).get("status") if r.status_code == 200 else None


def test_each_kind_of_change_is_picked_up_without_a_full_rescan(make_site):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B",
                                   "--accept-stage", "prod"], env={"ODST_WITHDRAW_GRACE_S": "0"}).start()
    register(a, b)
    b_id = site_id(b)
    put(a, "warm.pkg", b"w" * 5000, stage="prod")
    wait_until(lambda: available_at(b, "warm.pkg", b_id), 60, what="the first package at B")
    before = full_rescans(b)
    assert before >= 1  # at start, at least

    # upload
    put(a, "new.pkg", b"n" * 7000, stage="prod")
    wait_until(lambda: available_at(b, "new.pkg", b_id), 60, what="an upload at A to reach B")
    stored = b.data / "store" / "packages" / "new.pkg"
    assert stored.read_bytes() == b"n" * 7000

    # stage change: not accepted at B until promoted
    put(a, "beta.pkg", b"b" * 3000, stage="test")
    with a.client() as ca:
        assert ca.patch("/api/v1/packages/beta.pkg", json={"stage": "prod"}).status_code == 200
    wait_until(lambda: available_at(b, "beta.pkg", b_id), 60, what="a promotion at A to reach B")

    # replace in place: B swaps to the new bytes
    new = put(a, "new.pkg", b"N" * 9000, stage="prod", replace="true")
    wait_until(lambda: stored.exists() and hashlib.sha1(stored.read_bytes()).hexdigest() == new["sha1"]
               and available_at(b, "new.pkg", b_id), 60, what="a replacement at A to reach B")

    # withdrawal: demoted out of B's accepted stages, the file goes (grace 0) and B says so
    with a.client() as ca:
        assert ca.patch("/api/v1/packages/new.pkg", json={"stage": "test"}).status_code == 200
    wait_until(lambda: not stored.exists() and status_at(b, "new.pkg", b_id) == "withdrawn", 60,
               what="B to withdraw the demoted package")

    # deletion at the peer: the file here goes
    beta = b.data / "store" / "packages" / "beta.pkg"
    assert beta.exists()
    with a.client() as ca:
        assert ca.delete("/api/v1/packages/beta.pkg").status_code == 200
    wait_until(lambda: not beta.exists(), 60, what="a deletion at A to remove B's file")

    assert full_rescans(b) == before, "a change was picked up by rescanning the whole catalogue"
    assert (b.data / "store" / "packages" / "warm.pkg").exists()  # nothing else touched


def test_a_new_site_catches_up_with_a_few_hundred_small_packages(make_site):
    n = 300
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    bodies = {f"Small {i:03d}.pkg": hashlib.sha512(str(i).encode()).digest() * (40 + i % 90) for i in range(n)}

    upload_many(a, bodies)
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    register(a, b)
    b_id = site_id(b)
    folder = b.data / "store" / "packages"

    def held() -> bool:
        with b.client() as c:
            state = c.get("/api/v1/state").json()
        return sum(1 for p in state["packages"] if b_id in p["available_at"]) == n

    wait_until(held, 240, what=f"B to hold all {n} packages", interval=0.5)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert len(files) == n
    for name, body in bodies.items():
        assert files[name.lower()] == body, f"{name} differs at B"
