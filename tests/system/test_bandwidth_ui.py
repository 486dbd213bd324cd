"""The Network page's bandwidth block in a real browser: an admin sets download caps and a
link's timetable, sees the limit in force; an auditor sees the state but no forms."""

from __future__ import annotations

import re

import pytest

from tests.browser import shot
from tests.system.test_ui import ADMIN_PASSWORD, add_user, sign_in

expect = pytest.importorskip("playwright.sync_api").expect


def test_an_admin_sets_caps_and_a_default_timetable_on_the_network_page(make_site, page):
    site = make_site(env={"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD, "ODST_SITE_NAME": "HQ"}).start()
    sign_in(page, site, "admin", ADMIN_PASSWORD)
    page.goto(site.url + "/ui/#/network")
    expect(page.get_by_role("heading", level=2, name="Bandwidth")).to_be_visible()
    expect(page.get_by_text("Nothing to limit: this site has no links.")).to_be_visible()

    caps = page.locator("form", has=page.get_by_role("heading", name="Mac download caps"))
    caps.get_by_label("Downloads at once").fill("50")
    caps.get_by_label("Total egress").fill("500MB")
    caps.get_by_role("button", name="Save caps").click()
    expect(page.get_by_text(re.compile(r"egress 500 MB/s, 50 at once"))).to_be_visible()

    link = page.locator("form", has=page.get_by_role("heading", name="Limit a link"))
    link.get_by_label("Weekly timetable").fill("mon-fri 08:00-18:00 2MB\nbogus")
    link.get_by_role("button", name="Save limits").click()
    expect(link.get_by_text(re.compile("Not saved: .*window 'bogus'"))).to_be_visible()
    link.get_by_label("Weekly timetable").fill("mon-fri 08:00-18:00 2MB")
    link.get_by_role("button", name="Save limits").click()
    expect(page.get_by_text("mon,tue,wed,thu,fri 08:00–18:00 2 MB/s")).to_be_visible()
    shot(page, "bandwidth")
    with site.client() as c:
        out = c.get("/api/v1/bandwidth").json()
        history = c.get("/api/v1/events", params={"type": "DownloadCapsSet"}).json()["events"]
    assert out["downloads"]["max_concurrent"] == 50 and out["default"]["windows"][0]["limit_bps"] == 2_000_000
    assert history and history[0]["actor"].endswith("admin")

    add_user(site, "alice", "auditor")
    page.context.clear_cookies()  # a new sign-in, as the auditor
    sign_in(page, site, "alice")
    page.goto(site.url + "/ui/#/network")
    expect(page.get_by_text(re.compile(r"egress 500 MB/s, 50 at once"))).to_be_visible()
    expect(page.get_by_role("button", name="Save caps")).to_have_count(0)
    expect(page.get_by_role("button", name="Mark urgent")).to_have_count(0)
