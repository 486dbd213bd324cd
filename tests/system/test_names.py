"""Names as a Mac compares them, against a real ``odst serve``: any spelling of a package's name
(case, Unicode normalisation) finds it at the distribution point and in the Admin API; another
spelling of an existing name is refused, naming it; spellings that an older log holds as two
packages are reported (API, ``odst audit``), one kept, never merged silently."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import unicodedata
from urllib.parse import quote

import httpx
import pytest

from odst.datadir import key_path
from odst.events import catalogue as ev
from odst.events import codec
from odst.events.signing import SiteKey
from odst.naming import name_key
from odst.store.hashing import manifest_of
from harness.wait import wait_until
from tests.conftest import all_events, free_port, run_odst, site_nats, upload_bytes
from tests.system.test_deploy import nginx_in_front
from tests.system.test_audit import audit

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
NFC = unicodedata.normalize("NFC", "Café Désign.pkg")
NFD = unicodedata.normalize("NFD", NFC)


def path(name: str, prefix: str = "/CasperShare/Packages") -> str:
    return f"{prefix}/{quote(name)}"


def test_any_spelling_finds_the_package_at_the_distribution_point_and_in_the_api(make_site):
    site = make_site().start()
    offline, cafe = os.urandom(MiB + 17), os.urandom(3000)
    with site.client() as c:
        assert upload_bytes(c, "Offline.pkg", offline).status_code == 201
        assert upload_bytes(c, quote(NFC), cafe).status_code == 201

        for spelling in ("Offline.pkg", "OFFLINE.PKG", "offline.pkg"):
            for prefix in ("/CasperShare/Packages", "/Packages"):
                r = httpx.get(site.url + path(spelling, prefix))
                assert r.status_code == 200 and r.content == offline, (spelling, prefix, r.status_code)
            r = httpx.get(site.url + path(spelling), headers={"Range": "bytes=10-19"})
            assert r.status_code == 206 and r.content == offline[10:20]
            got = c.get(f"/api/v1/packages/{quote(spelling)}")
            assert got.status_code == 200 and got.json()["name"] == "Offline.pkg"  # the uploader's spelling
        for spelling in (NFC, NFD, NFD.upper()):
            assert httpx.get(site.url + path(spelling)).content == cafe, ascii(spelling)
            assert httpx.head(site.url + path(spelling)).headers["content-length"] == str(len(cafe))
            assert c.get(f"/api/v1/packages/{quote(spelling)}").json()["name"] == NFC
        assert httpx.get(site.url + path("Offline.pkgx")).status_code == 404  # lookups are not prefix matches
        assert httpx.get(site.url + path("Cafe Design.pkg")).status_code == 404  # accents count

        # another spelling of an existing name: 409 naming the spelling that exists, before the body
        # is stored and after it, whether the content differs or not
        for spelling, body in (("offline.pkg", os.urandom(100)), ("OFFLINE.PKG", offline), (NFD, cafe)):
            r = upload_bytes(c, quote(spelling), body)
            assert r.status_code == 409, (ascii(spelling), r.text)
            existing = "Offline.pkg" if name_key(spelling) == "offline.pkg" else NFC
            assert repr(existing) in r.json()["detail"], r.text
        r = c.put("/api/v1/packages/oFFline.pkg", content=iter([offline]))  # no Content-Length: decided after
        assert r.status_code == 409 and "'Offline.pkg'" in r.json()["detail"], r.text
        # the exact spelling again is still 'identical'
        assert upload_bytes(c, "Offline.pkg", offline).status_code == 200

        names = [p["name"] for p in c.get("/api/v1/packages").json()["packages"]]
        assert sorted(names) == sorted(["Offline.pkg", NFC])
        assert sorted(p.name for p in (site.data / "store" / "packages").iterdir()) == \
            sorted([name_key("Offline.pkg"), name_key(NFC)])  # one file per package, named by its key

        # re-stage and delete through another spelling; the events carry the spelling shown
        r = c.patch("/api/v1/packages/OFFLINE.PKG", json={"stage": "test"})
        assert r.status_code == 200 and r.json()["name"] == "Offline.pkg" and r.json()["stage"] == "test"
        r = c.delete(f"/api/v1/packages/{quote(NFD.lower())}")
        assert r.status_code == 200 and r.json()["deleted"] == NFC
        assert httpx.get(site.url + path(NFC)).status_code == 404
        assert not (site.data / "store" / "packages" / name_key(NFC)).exists()
        staged = [e["envelope"]["event"] for e in all_events(c) if e["type"] in ("PackageStaged", "PackageDeleted")]
        assert [(e["type"], e["name"]) for e in staged] == [("PackageStaged", "Offline.pkg"), ("PackageDeleted", NFC)]


async def _append_as_site(data, event: ev.Event, last: dict) -> None:
    """Append ``event`` to the site's own log as an older ODST would have (signed with the site's
    key, chained onto ``last``): how a log from before the name rule gets two spellings."""
    key = SiteKey.load_or_create(key_path(data))
    env = codec.Envelope(id=codec.new_event_id(), origin=key.site_id, seq=last["seq"] + 1,
                         prev=codec.chain_hash(base64.b64decode(last["signed"])),
                         ts=codec.now_ms(), actor="token:legacy", event=event)
    nc = await site_nats(data, max_reconnect_attempts=0)
    try:
        await nc.jetstream(timeout=10).publish(f"odst.{key.site_id}.ev.{type(event).__name__}",
                                               codec.seal(env, key), stream="EVENTS")
    finally:
        await nc.close()


def last_blake3(site) -> str:
    with site.client() as c:
        return c.get("/api/v1/packages/Offline.pkg").json()["blake3"]


def test_spellings_an_older_log_holds_as_two_packages_are_reported_after_a_rebuild(make_site):
    site = make_site().start()
    first, second = os.urandom(MiB), os.urandom(MiB // 2)
    with site.client() as c:
        assert upload_bytes(c, "Offline.pkg", first).status_code == 201
        last = all_events(c)[-1]
    m = manifest_of([second])
    asyncio.run(_append_as_site(site.data, ev.PackageUploaded(
        name="OFFLINE.PKG", size=m.size, sha1=m.sha1, sha512=m.sha512, blake3=m.blake3,
        chunk_size=m.chunk_size, chunks=list(m.chunks), stage="prod"), last))
    assert site.stop() == 0

    # the store as an older ODST left it: one file per spelling
    packages = site.data / "store" / "packages"
    (packages / "offline.pkg").rename(packages / "Offline.pkg")
    (packages / "OFFLINE.PKG").write_bytes(second)
    r = run_odst("rebuild", "--data", str(site.data))
    assert r.returncode == 0, r.stdout + r.stderr
    code, s, text = audit(site.data)
    assert code == 0 and s["violations"] == "0", text  # a collision is reported, not a violation
    assert "name collisions 1" in text and "'Offline.pkg'" in text and "'OFFLINE.PKG' (other content" in text, text

    site.start()
    with site.client() as c:
        listed = c.get("/api/v1/packages").json()
        assert [p["name"] for p in listed["packages"]] == ["Offline.pkg"]  # the earlier upload is kept
        (collision,) = listed["name_collisions"]
        assert collision["kept"] == "Offline.pkg" and collision["key"] == "offline.pkg"
        assert collision["others"] == [{"name": "OFFLINE.PKG", "blake3": m.blake3, "same_content": False}]
        state = c.get("/api/v1/state").json()
        assert state["name_collisions"] == listed["name_collisions"]
        assert [(x["name"], x["winner_name"]) for x in state["conflicts"]] == [("OFFLINE.PKG", "Offline.pkg")]
        # one file for the key, holding the kept content, whatever spelling a Mac asks for
        assert [p.name for p in packages.iterdir()] == ["offline.pkg"]
        for spelling in ("OFFLINE.PKG", "Offline.pkg"):
            assert httpx.get(site.url + path(spelling)).content == first
        # its latest report was of the other content: at start it said again that it holds the kept
        # one (its one file holds that), so that is what it serves ('serving')
        kept = c.get("/api/v1/packages/offline.pkg").json()
        assert kept["serving"] == {site.run_info()["site"]: kept["blake3"]} and kept["blake3"] != m.blake3
        assert any(e["type"] == "PackageAvailable" and e["envelope"]["event"]["name"] == "Offline.pkg"
                   and e["envelope"]["actor"] == "system" for e in all_events(c))
        last = all_events(c)[-1]
    # the kept one deleted as if at another site (its file stays here until the replicator acts):
    # the other content is the package now, and this site must not serve the kept one's bytes as it
    asyncio.run(_append_as_site(site.data, ev.PackageDeleted(name="Offline.pkg", blake3=last_blake3(site)), last))
    with site.client() as c:
        wait_until(lambda: [p["name"] for p in c.get("/api/v1/packages").json()["packages"]] == ["OFFLINE.PKG"],
                   30, what="OFFLINE.PKG to be the package")
        assert c.get("/api/v1/packages").json()["name_collisions"] == []
        for spelling in ("OFFLINE.PKG", "Offline.pkg"):
            assert httpx.get(site.url + path(spelling)).status_code == 404


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_behind_the_shipped_nginx_any_spelling_is_served_and_the_gateway_decides(make_site, tmp_path):
    """nginx sends the file, the gateway finds it (any spelling, the stage rule, download auth)."""
    site = make_site(env={"ODST_ACCEPT_STAGES": "prod"}).start()
    body = os.urandom(2 * MiB + 3)
    with site.client() as c:
        assert upload_bytes(c, quote(NFC), body).status_code == 201
    (tmp_path / "nginx").mkdir()
    with nginx_in_front(tmp_path / "nginx", site.data / "store" / "packages", site.url, free_port()) as base:
        for spelling in (NFC, NFD, NFC.upper()):
            r = httpx.get(base + path(spelling), timeout=30)
            assert r.status_code == 200 and r.content == body, ascii(spelling)
            assert re.fullmatch(r'"[0-9a-f]+-[0-9a-f]+"', r.headers["etag"])  # nginx's: nginx sent it
        r = httpx.get(base + path(NFD, "/Packages"), headers={"Range": "bytes=5-9"})
        assert r.status_code == 206 and r.content == body[5:10]
        with site.client() as c:  # demoted out of the stages this site serves: 404 through nginx too
            assert c.patch(f"/api/v1/packages/{quote(NFC)}", json={"stage": "test"}).status_code == 200
        assert httpx.get(base + path(NFC)).status_code == 404
        # the header that asks the gateway for a redirect does not reach past nginx's own value
        r = httpx.get(base + "/Packages/x.pkg", headers={"X-ODST-Accel-Redirect": "/etc/"})
        assert r.status_code == 404
