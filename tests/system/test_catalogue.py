"""A catalogue of thousands: package lists without chunk hashes, paged and sorted on the
server, exact-name lookups for live updates, a brief live event feed, and the site's name
chosen at run time (SiteRenamed)."""

from __future__ import annotations

import json

import httpx

from tests.conftest import ADMIN_TOKEN, run_odst, wait_until
from tests.system.test_api import _sse_events
from tests.system.test_replication import pair, site_id  # noqa: F401  (pair is a fixture)

MiB = 1 << 20


def _put(c: httpx.Client, name: str, body: bytes, stage: str = "prod") -> dict:
    r = c.put(f"/api/v1/packages/{name}", content=body, params={"stage": stage})
    assert r.status_code == 201, r.text
    return r.json()


def test_lists_carry_no_chunk_hashes_and_page_on_the_server(site):
    with site.client() as c:
        big = _put(c, "Big.pkg", b"x" * (3 * MiB + 5))
        assert len(big["chunks"]) == 4  # the upload's answer and the package route keep them
        for i, stage in enumerate(["test", "prod", "dev", "prod"]):
            _put(c, f"app-{i}.pkg", bytes([i]) * (1000 * (i + 1)), stage=stage)

        page = c.get("/api/v1/packages", params={"limit": 2}).json()
        assert [p["name"] for p in page["packages"]] == ["Big.pkg", "app-0.pkg"]  # binary order, as before
        assert page["total"] == 5 and page["count"] == 2
        assert all("chunks" not in p and p["chunk_count"] >= 1 for p in page["packages"])
        nxt = c.get("/api/v1/packages", params={"limit": 2, "offset": 4}).json()
        assert [p["name"] for p in nxt["packages"]] == ["app-3.pkg"] and nxt["total"] == 5

        by_size = c.get("/api/v1/packages", params={"sort": "size", "order": "desc", "limit": 3}).json()
        assert [p["name"] for p in by_size["packages"]] == ["Big.pkg", "app-3.pkg", "app-2.pkg"]
        assert by_size["packages"][0]["chunk_count"] == 4 and "chunks" not in by_size["packages"][0]

        prod = c.get("/api/v1/packages", params={"stage": "prod"}).json()
        assert prod["total"] == 3 and {p["stage"] for p in prod["packages"]} == {"prod"}

        wanted = c.get("/api/v1/packages", params=[("name", "app-2.pkg"), ("name", "Big.pkg"),
                                                   ("name", "none.pkg")]).json()
        assert sorted(p["name"] for p in wanted["packages"]) == ["Big.pkg", "app-2.pkg"]
        assert wanted["packages"][0]["availability"]  # rows are whole, less the chunk list

        full = c.get("/api/v1/packages", params={"include": "chunks", "name": "Big.pkg"}).json()
        assert full["packages"][0]["chunks"] == big["chunks"]

        for bad in ({"sort": "sha1"}, {"order": "up"}, {"include": "everything"},
                    [("name", f"n{i}.pkg") for i in range(101)]):
            r = c.get("/api/v1/packages", params=bad)
            assert r.status_code == 400 and r.json()["detail"], r.text


def test_the_brief_live_feed_leaves_out_signatures_and_chunk_hashes(site):
    with site.client() as c:
        last = c.get("/api/v1/events", params={"limit": 1}).json()["last_position"]
        _put(c, "Feed.pkg", b"y" * (2 * MiB))
        got = {}
        with httpx.Client(base_url=site.url, timeout=httpx.Timeout(10, read=20),
                          headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as sc:
            for brief in ("true", "false"):
                with sc.stream("GET", "/api/v1/events/stream", params={"after": last, "brief": brief}) as r:
                    for event, _, data in _sse_events(r.iter_lines()):
                        if event == "PackageUploaded":
                            got[brief] = data
                            break
    short, whole = json.loads(got["true"]), json.loads(got["false"])
    assert short["brief"] is True and "signed" not in short
    assert "chunks" not in short["envelope"]["event"] and short["envelope"]["event"]["chunk_count"] == 2
    assert short["envelope"]["event"]["name"] == "Feed.pkg" and short["position"] == whole["position"]
    assert len(whole["envelope"]["event"]["chunks"]) == 2 and whole["signed"]
    assert len(got["true"]) < len(got["false"]) / 2


def test_an_admin_renames_the_site_and_its_peer_learns_the_name(pair):
    a, b = pair
    a_id = site_id(a)
    with a.client() as ca:
        s = ca.get("/api/v1/settings").json()
        assert s["site_name"] == "A" and s["site_name_source"] == {"from": "setting"}
        for body in ({"name": ""}, {"name": "   "}, {"name": "x" * 101}, {"name": "bad\nname"}, {}, {"name": 3}):
            r = ca.put("/api/v1/settings/site-name", json=body)
            assert r.status_code == 400 and r.json()["detail"], r.text
        auditor = ca.post("/api/v1/tokens", json={"name": "aud", "role": "auditor"}).json()["token"]
        with a.client(token=auditor) as aud:
            assert aud.put("/api/v1/settings/site-name", json={"name": "Nope"}).status_code == 403
        r = ca.put("/api/v1/settings/site-name", json={"name": "  Berlin office  "})
        assert r.status_code == 200, r.text
        assert r.json()["site_name"] == "Berlin office" and r.json()["site_name_source"]["from"] == "event"
        assert ca.get("/api/v1/site").json()["name"] == "Berlin office"
        renamed = ca.get("/api/v1/events", params={"type": "SiteRenamed"}).json()["events"]
        assert [e["envelope"]["event"]["name"] for e in renamed] == ["Berlin office"]
    with b.client() as cb:
        wait_until(lambda: {p["site"]: p["name"] for p in cb.get("/api/v1/peers").json()["peers"]}.get(a_id)
                   == "Berlin office", 30, what="A's new name at B")
    # The name is in the log: a restart keeps it over --site-name, and the audit replays it.
    a.stop()
    r = run_odst("audit", "--data", str(a.data))
    assert r.returncode == 0, r.stdout + r.stderr
    a.start()
    with a.client() as ca:
        assert ca.get("/api/v1/settings").json()["site_name"] == "Berlin office"

