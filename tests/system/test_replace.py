"""Replacing a package under the same name at one real site: PUT ?replace=true and
``odst upload --replace``. The site serves the old bytes until the new ones are swapped in,
a download that started before the swap ends with the old bytes, the ETag changes at the
swap, and a Range request naming the old ETag gets the whole new body (200), never a mix.
(The same story across three sites with clients downloading all along: scenarios/replace_cutover.py.)"""

from __future__ import annotations

import hashlib
import json
import random
import re

import httpx
import pytest

from odst.naming import name_key
from tests.conftest import run_odst
from tests.system.test_audit import audit

MiB = 1 << 20
NAME = "Browser 1.0.pkg"
URL = "/CasperShare/Packages/Browser%201.0.pkg"
PKG = "/api/v1/packages/Browser%201.0.pkg"

pytestmark = pytest.mark.timeout(120)


def b3_of(data: bytes) -> str:
    from odst.store.hashing import manifest_of
    return manifest_of([data]).blake3


def test_replace_at_one_site_swaps_the_bytes_and_the_etag_and_never_mixes_them(site, tmp_path):
    old, new = random.Random(1).randbytes(12 * MiB + 7), random.Random(2).randbytes(5 * MiB + 3)
    with site.client() as c, httpx.Client(base_url=site.url, timeout=30) as mac:
        assert c.put(PKG, content=old).status_code == 201
        r = mac.get(URL)
        assert r.status_code == 200 and r.content == old
        old_etag = r.headers["etag"]
        assert old_etag == f'"{b3_of(old)}"'

        # without ?replace the name is taken, as before
        r = c.put(PKG, content=new)
        assert r.status_code == 409 and "delete it first" in r.json()["detail"], r.text

        # a Mac starts a download of the old version and is slow to read it
        with mac.stream("GET", URL) as slow:
            assert slow.status_code == 200 and slow.headers["etag"] == old_etag
            pieces = slow.iter_bytes(256 << 10)
            got = next(pieces)
            r = c.put(PKG, content=new, params={"replace": "true"})
            assert r.status_code == 201, r.text
            pkg = r.json()
            assert (pkg["blake3"], pkg["size"], pkg["generation"]) == (b3_of(new), len(new), 1)
            assert pkg["serving"] == {site.run_info()["site"]: b3_of(new)}
            # a new request gets the new version at once ...
            r = mac.get(URL)
            assert r.status_code == 200 and r.content == new and r.headers["etag"] == f'"{b3_of(new)}"'
            # ... a resume that names the old version gets the whole new body, not a mixed 206
            r = mac.get(URL, headers={"Range": "bytes=1000-", "If-Range": old_etag})
            assert r.status_code == 200 and r.content == new, r.headers
            r = mac.get(URL, headers={"Range": "bytes=1000-", "If-Range": f'"{b3_of(new)}"'})
            assert r.status_code == 206 and r.content == new[1000:]
            # ... and the download that began before the swap ends with the old bytes, all of them
            got += b"".join(pieces)
        assert hashlib.sha256(got).digest() == hashlib.sha256(old).digest()

        # the log says what was replaced by what, and by whom
        events = c.get("/api/v1/events", params={"type": "PackageReplaced", "name": NAME}).json()["events"]
        assert len(events) == 1
        e = events[0]["envelope"]["event"]
        assert (e["replaces"], e["blake3"], e["generation"], e["stage"]) == (b3_of(old), b3_of(new), 1, "prod")
        assert events[0]["actor"]

        # the same content again is nothing to do; a stage given with the replacement is taken
        r = c.put(PKG, content=new, params={"replace": "true"})
        assert r.status_code == 200 and r.json()["blake3"] == b3_of(new)
        assert not list(site.data.glob("store/tmp/*"))  # no temp file or backup left behind

    # the CLI: odst upload --replace, here back to the first version
    f = tmp_path / "Browser 1.0.pkg"
    f.write_bytes(old)
    r = run_odst("upload", "--server", site.url, "--token", site.token, "--replace", "--quiet", str(f))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha1"] == hashlib.sha1(old).hexdigest()
    with httpx.Client(base_url=site.url, timeout=30) as mac:
        r = mac.get(URL)
        assert r.content == old and r.headers["etag"] == old_etag
    with site.client() as c:
        assert c.get(PKG).json()["generation"] == 2
        # a deleted package is gone at once, replacement or not
        assert c.delete(PKG).status_code == 200
    with httpx.Client(base_url=site.url, timeout=30) as mac:
        assert mac.get(URL).status_code == 404
    assert not (site.data / "store" / "packages" / name_key(NAME)).exists()  # the store names files by key

    code, summary, text = audit(site.data)
    assert code == 0 and summary["read model"] == "matches the rebuild", text


def test_replace_is_refused_to_an_auditor_and_for_an_unknown_stage(site):
    with site.client() as c:
        assert c.put(PKG, content=b"v1").status_code == 201
        tok = c.post("/api/v1/tokens", json={"name": "look", "role": "auditor"}).json()["token"]
        r = c.put(PKG, content=b"v2", params={"replace": "true", "stage": "nope"})
        assert r.status_code == 400 and "unknown stage" in r.json()["detail"]
    with site.client(tok) as a:
        r = a.put(PKG, content=b"v2", params={"replace": "true"})
        assert r.status_code == 403
    with httpx.Client(base_url=site.url, timeout=30) as mac:
        assert mac.get(URL).content == b"v1"


def test_replace_from_the_package_page_shows_the_new_version_served(make_site, page, tmp_path):
    from tests.browser import shot
    from tests.system.test_ui import ADMIN_PASSWORD, add_user, expect, sign_in

    site = make_site(env={"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD, "ODST_SITE_NAME": "HQ"}).start()
    add_user(site, "olivia", "operator")
    with site.client() as c:
        assert c.put("/api/v1/packages/Zoom.pkg", content=b"zoom 1" * 1000).status_code == 201
    new = tmp_path / "Zoom-2.pkg"
    new.write_bytes(b"zoom 2" * 3000)
    sign_in(page, site, "olivia")
    page.goto(site.url + "/#/packages/Zoom.pkg")
    expect(page.get_by_role("row", name=re.compile("HQ")).get_by_text("this version")).to_be_visible()
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Replace Zoom.pkg").click()
    chooser.value.set_files(str(new))
    dialog = page.get_by_role("dialog", name="Replace package?")
    expect(dialog).to_contain_text("Zoom-2.pkg")
    dialog.get_by_role("button", name="Replace").click()
    expect(page.locator("#toasts")).to_contain_text("Replaced Zoom.pkg")
    expect(page.locator("dl.facts")).to_contain_text("18,000 bytes")
    expect(page.get_by_role("row", name=re.compile("HQ")).get_by_text("this version")).to_be_visible()
    expect(page.get_by_role("cell", name=re.compile("Replaced Zoom.pkg with new content"))).to_be_visible()
    shot(page, "replaced")
    with site.client() as c:
        pkg = c.get("/api/v1/packages/Zoom.pkg").json()
    assert pkg["size"] == 18000 and pkg["generation"] == 1
    with httpx.Client(base_url=site.url, timeout=30) as mac:
        assert mac.get("/CasperShare/Packages/Zoom.pkg").content == new.read_bytes()
