"""One site's own scrub, seen from outside: a flipped byte is found without anyone asking,
downloads answer 503 instead of the damaged bytes, `odst verify` agrees, and the Network page
shows the package out of service. (Repairs from peers and peers' reports: the scenarios
corrupt_chunk and scrub_heal.)"""

from __future__ import annotations

import httpx
import pytest

from tests.browser import shot
from tests.conftest import run_odst, upload_bytes, wait_until

expect = pytest.importorskip("playwright.sync_api").expect

MiB = 1 << 20
ADMIN_PASSWORD = "admin-password-for-tests"


@pytest.fixture
def scrubbing_site(make_site):
    return make_site(env={"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD, "ODST_SITE_NAME": "HQ", "ODST_SCRUB_PERIOD_S": "1",
                          "ODST_SCRUB_MIN_RATE": str(64 * MiB), "ODST_SCRUB_MAX_RATE": str(64 * MiB)}).start()


def test_the_scrub_takes_a_rotten_file_out_of_service(scrubbing_site, page):
    site = scrubbing_site
    body = bytes(range(251)) * 9000
    with site.client() as c:
        assert upload_bytes(c, "Rotten.pkg", body).status_code == 201
        assert upload_bytes(c, "Fine.pkg", body[::-1]).status_code == 201
    url = f"{site.url}/CasperShare/Packages/Rotten.pkg"
    assert httpx.get(url).content == body
    path = site.data / "store" / "packages" / "rotten.pkg"  # the store names files by key
    with open(path, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" if body[1000] else b"\x01")

    answer = wait_until(lambda: (r := httpx.get(url)).status_code == 503 and r, 30, what="a 503 for the rotten file")
    assert answer.headers["retry-after"] and answer.content != body
    with site.client() as c:
        integrity = c.get("/api/v1/integrity").json()
        assert [(d["name"], d["found_by"], d["sources"]) for d in integrity["damaged"]] == [("Rotten.pkg", "scrub", [])]
        metrics = c.get("/metrics").text
        assert "odst_packages_damaged 1.0" in metrics
        report = c.post("/api/v1/verify").json()  # the same check: the file left service, the good one is fine
        assert report["checked"] == report["ok"] == 1
    assert httpx.get(f"{site.url}/CasperShare/Packages/Fine.pkg").content == body[::-1]
    audit = run_odst("audit", "--data", str(site.data))  # PackageDamaged verifies and rebuilds to the same model
    assert audit.returncode == 0, audit.stdout + audit.stderr

    page.goto(site.url + "/")
    page.get_by_label("User name").fill("admin")
    page.get_by_label("Password").fill(ADMIN_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1, name="Packages")).to_be_visible()
    page.goto(site.url + "/#/network")
    panel = page.get_by_role("region", name="Storage integrity")
    expect(panel.get_by_role("row", name="Rotten.pkg")).to_contain_text("no other copy")
    expect(panel).to_contain_text("every 1 s; last full pass")
    expect(panel).not_to_contain_text("[object")
    shot(page, "network-integrity")
