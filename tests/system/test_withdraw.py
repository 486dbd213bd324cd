"""Demoting withdraws, with real sites: a package whose stage a site no longer accepts stops
being served there at once, its file goes after the grace period (withdraw_grace_s), and it
comes back when promoted again. The multi-site story, with a kept file re-used within the
grace period and a site changing its own accepted stages, is scenarios/demote_withdraw.py."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import free_port, wait_until
from tests.system.test_replication import available_at, register, site_id, upload

pytestmark = pytest.mark.timeout(120)


def served(site, name: str) -> int:
    return httpx.get(f"{site.url}/Packages/{name}", timeout=10).status_code


def availability(site, name: str, sid: str) -> str | None:
    with site.client() as c:
        return c.get(f"/api/v1/packages/{name}").json()["availability"].get(sid, {}).get("status")


def test_a_demoted_package_is_withdrawn_and_comes_back_when_promoted(make_site, tmp_path):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--accept-stage", "prod"],
                  env={"ODST_WITHDRAW_GRACE_S": "0"}).start()
    register(a, b)
    b_id = site_id(b)
    body = bytes(range(256)) * 8000
    (tmp_path / "r.pkg").write_bytes(body)
    upload(a, "Release.pkg", tmp_path / "r.pkg", stage="prod")
    wait_until(lambda: available_at(b, "Release.pkg", b_id), 60, what="the prod package at B")
    assert httpx.get(f"{b.url}/Packages/RELEASE.pkg").content == body
    stored = b.data / "store" / "packages" / "release.pkg"
    assert stored.exists()

    with a.client() as ca:
        assert ca.patch("/api/v1/packages/Release.pkg", json={"stage": "test"}).status_code == 200
    wait_until(lambda: served(b, "Release.pkg") == 404, 30, what="B to stop serving the demoted package")
    assert served(a, "Release.pkg") == 200  # A accepts every stage
    wait_until(lambda: not stored.exists() and availability(b, "Release.pkg", b_id) == "withdrawn", 30,
               what="B (grace 0) to remove the file and record it")
    with a.client() as ca:  # A learns it too: B is no source for it now
        wait_until(lambda: ca.get("/api/v1/packages/Release.pkg").json()["availability"][b_id]["status"]
                   == "withdrawn", 30, what="A to see B's withdrawal")

    with a.client() as ca:
        assert ca.patch("/api/v1/packages/release.PKG", json={"stage": "prod"}).status_code == 200
    wait_until(lambda: available_at(b, "Release.pkg", b_id), 60, what="B to pull the promoted package again")
    r = httpx.get(f"{b.url}/Packages/Release.pkg")
    assert r.status_code == 200 and r.content == body


def test_a_withdrawn_file_held_nowhere_else_is_kept_not_served(make_site, tmp_path):
    """Removing it would lose the content: the site keeps the file, does not serve it, says so."""
    site = make_site("solo", extra_args=["--accept-stage", "prod"],
                     env={"ODST_WITHDRAW_GRACE_S": "0"}).start()
    (tmp_path / "t.pkg").write_bytes(b"only copy" * 1000)
    upload(site, "candidate.pkg", tmp_path / "t.pkg", stage="test")
    assert served(site, "candidate.pkg") == 404  # not in a stage this site serves
    wait_until(lambda: "held nowhere else" in site.log(20000), 30, what="the site to keep the only copy")
    assert (site.data / "store" / "packages" / "candidate.pkg").read_bytes() == b"only copy" * 1000
    assert availability(site, "candidate.pkg", site_id(site)) == "available"
    with site.client() as c:
        assert c.patch("/api/v1/packages/candidate.pkg", json={"stage": "prod"}).status_code == 200
    assert served(site, "candidate.pkg") == 200
