"""The web UI at phone, tablet and desktop widths (375, 768, 1280 px) in headless Chromium,
and the rough edges a newcomer hit: nothing wider than the window, Delete always in view, a
package's history readable, the event-log filters whole, Settings in tabs, a site named at
run time, a download URL only where the package is served. Screenshots of every page at
every width land in test-artifacts/screenshots/ (look at them after a UI change)."""

from __future__ import annotations

import re

import pytest

from tests.browser import shot
from tests.conftest import free_port, upload_bytes, wait_until
from tests.system.test_replication import register, site_id
from tests.system.test_ui import ADMIN_PASSWORD, sign_in

expect = pytest.importorskip("playwright.sync_api").expect

WIDTHS = (375, 768, 1280)
LONG = "Microsoft Office 365 for Mac Business Pro Plus Volume License Installer 16.89.pkg"


def overflow(page) -> int:
    """How many CSS pixels the page is wider than the window (0: no horizontal scrolling)."""
    over = page.evaluate("() => document.documentElement.scrollWidth - document.documentElement.clientWidth")
    if over:
        print("wider than the window:", wide_elements(page))
    return over


def wide_elements(page) -> list[str]:
    """The outermost elements that reach past the window's right edge (to say what overflows)."""
    return page.evaluate("""() => {
      const w = document.documentElement.clientWidth;
      const out = [];
      for (const el of document.querySelectorAll('body *')) {
        const r = el.getBoundingClientRect();
        if (r.right > w + 0.5 && !(el.parentElement && el.parentElement.getBoundingClientRect().right > w + 0.5))
          out.push(`${el.tagName.toLowerCase()}.${el.className} right=${Math.round(r.right)}`);
      }
      return out.slice(0, 8);
    }""")


def in_view(page, locator) -> bool:
    box = locator.bounding_box()
    width = page.viewport_size["width"]
    return box is not None and box["width"] > 0 and box["x"] >= 0 and box["x"] + box["width"] <= width


def goto(page, site, route: str) -> None:
    page.goto(f"{site.url}/ui/#/{route}")
    expect(page.locator("main h1")).to_be_visible()
    expect(page.locator("main .loading")).to_have_count(0)


@pytest.fixture
def unnamed_site(make_site):
    """A site started without --site-name, as a newcomer starts one."""
    return make_site(env={"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD}).start()


def test_every_page_fits_phone_tablet_and_desktop_widths(unnamed_site, page):
    site = unnamed_site
    with site.client() as c:
        for name, stage in ((LONG, "test"), ("Zoom.pkg", "prod"), ("Firefox.dmg", "dev")):
            assert upload_bytes(c, name, name.encode() * 300, params={"stage": stage}).status_code == 201
        for stage in ("dev", "test", "prod", "dev", "prod"):  # a history with several rows
            assert c.patch("/api/v1/packages/Zoom.pkg", json={"stage": stage}).status_code == 200
        ident = c.get("/api/v1/site").json()["site"]
    sign_in(page, site, "admin", ADMIN_PASSWORD)

    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 800})
        goto(page, site, "packages")
        rows = page.locator("table.packages tbody tr")
        expect(rows).to_have_count(3)
        assert overflow(page) == 0, f"packages overflow at {width}px"
        for name in (LONG, "Zoom.pkg", "Firefox.dmg"):
            delete = page.get_by_role("button", name=f"Delete {name}", exact=True)
            delete.scroll_into_view_if_needed()
            assert in_view(page, delete), f"Delete {name} cut off at {width}px"
        label = page.locator("#site-label")
        expect(label).to_have_text("Name this site")  # not a random id on every page
        assert ident not in label.inner_text()
        shot(page, f"{width}-1-packages")

        goto(page, site, "packages/Zoom.pkg")
        history = page.locator("table.history tbody tr")
        expect(history).to_have_count(6)  # the upload and five stage changes
        for cell in page.locator("table.history td.what").all():
            box = cell.bounding_box()
            assert box["width"] >= 150, f"history squeezed to {box['width']}px at {width}px"
        expect(page.locator("dd.download-url")).to_contain_text("/CasperShare/Packages/Zoom.pkg")
        assert overflow(page) == 0, f"package page overflows at {width}px"
        shot(page, f"{width}-2-package")

        goto(page, site, "events")
        form = page.locator("form.filters").bounding_box()
        for control in page.locator("form.filters input, form.filters select").all():
            box = control.bounding_box()
            assert box["width"] >= 150, f"a filter field is {box['width']}px wide at {width}px"
            assert box["x"] >= form["x"] and box["x"] + box["width"] <= form["x"] + form["width"] + 0.5
        assert overflow(page) == 0, f"event log overflows at {width}px"
        shot(page, f"{width}-3-events")

        goto(page, site, "settings")
        tabs = page.get_by_role("tab")
        expect(tabs.first).to_have_attribute("aria-selected", "true")
        expect(page.get_by_role("tabpanel")).to_have_count(1)  # one section at a time
        assert overflow(page) == 0, f"settings overflow at {width}px"
        shot(page, f"{width}-4-settings")

        goto(page, site, "upload")
        assert overflow(page) == 0, f"upload page overflows at {width}px"
        shot(page, f"{width}-5-upload")

    # at desktop width, Settings is a page of tabs, not 3,200 px of everything
    goto(page, site, "settings")
    assert page.evaluate("document.documentElement.scrollHeight") < 1600
    page.get_by_role("tab", name="API tokens").click()
    expect(page.get_by_role("heading", name="API tokens")).to_be_visible()
    expect(page.get_by_role("heading", name="Site settings")).to_be_hidden()
    page.keyboard.press("ArrowRight")  # the arrow keys move between tabs
    expect(page.get_by_role("tab", name="Event subscribers")).to_be_focused()
    page.reload()  # the tab is in the address
    expect(page.get_by_role("tab", name="Event subscribers")).to_have_attribute("aria-selected", "true")

    # name the site at run time: a signed event, shown at once
    page.locator("#site-label").get_by_role("link", name="Name this site").click()
    expect(page.get_by_role("tab", name="Site settings")).to_have_attribute("aria-selected", "true")
    name = page.get_by_label("Name of this site")
    name.fill("   ")
    page.get_by_role("button", name="Save name").click()
    expect(page.locator("form").filter(has_text="Site name").locator(".message.error")).to_contain_text("Enter a name")
    name.fill("Berlin office")
    page.get_by_role("button", name="Save name").click()
    expect(page.locator("#site-label")).to_have_text("Berlin office")
    expect(page.locator("#toasts")).to_contain_text("This site is now called Berlin office.")
    shot(page, "6-renamed")
    with site.client() as c:
        assert c.get("/api/v1/site").json()["name"] == "Berlin office"
        assert [e["actor"] for e in c.get("/api/v1/events", params={"type": "SiteRenamed"}).json()["events"]] \
            == ["user:admin"]

    goto(page, site, "packages/Gone.pkg")  # the 404 message says it once, in words
    warning = page.locator(".message.warning")
    expect(warning).to_contain_text("There is no package named Gone.pkg now")
    assert warning.inner_text().count("Gone.pkg") == 1


def test_a_branch_shows_the_download_url_only_once_it_serves_the_package(make_site, page):
    env = {"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD}
    leaf = free_port()
    hq = make_site("hq", env={**env, "ODST_SITE_NAME": "HQ"}, extra_args=["--leaf-listen", f"127.0.0.1:{leaf}"]).start()
    branch = make_site("branch", env={**env, "ODST_SITE_NAME": "Branch"},
                       extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}"]).start()
    register(hq, branch)
    b_id = site_id(branch)
    with branch.client() as c:
        assert c.put("/api/v1/settings/accepted-stages", json={"stages": ["prod"]}).status_code == 200
    with hq.client() as c:
        assert upload_bytes(c, "Pilot.pkg", b"pilot" * 100_000, params={"stage": "dev"}).status_code == 201
    with branch.client() as c:
        wait_until(lambda: c.get("/api/v1/packages/Pilot.pkg").status_code == 200, 30, what="Pilot.pkg at the branch")
    sign_in(page, branch, "admin", ADMIN_PASSWORD)
    goto(page, branch, "packages/Pilot.pkg")
    url = page.locator("dd.download-url")
    expect(url).to_contain_text("Not served by this site: this site does not replicate stage dev")
    expect(url.get_by_role("button", name=re.compile("Copy"))).to_have_count(0)
    shot(page, "1-not-served")
    with hq.client() as c:
        assert c.patch("/api/v1/packages/Pilot.pkg", json={"stage": "prod"}).status_code == 200
    with branch.client() as c:
        wait_until(lambda: c.get("/api/v1/packages/Pilot.pkg").json()["availability"].get(b_id, {}).get("status")
                   == "available", 60, what="the branch's copy")
    expect(url).to_contain_text("/CasperShare/Packages/Pilot.pkg")  # live, without a reload
    shot(page, "2-served")


def test_the_package_list_pages_and_applies_live_events_row_by_row(unnamed_site, page):
    site = unnamed_site
    with site.client() as c:
        for i in range(105):
            assert upload_bytes(c, f"App {i:03d}.pkg", b"%d" % i).status_code == 201
    sign_in(page, site, "admin", ADMIN_PASSWORD)
    rows = page.locator("table.packages tbody tr")
    expect(rows).to_have_count(100)  # one page, not the whole catalogue
    expect(page.locator("p.count")).to_have_text("1–100 of 105 packages")
    page.get_by_role("button", name="Next ›").click()
    expect(rows).to_have_count(5)
    expect(rows.first).to_contain_text("App 100.pkg")
    page.get_by_role("button", name="‹ Previous").click()
    expect(rows.first).to_contain_text("App 000.pkg")

    lists: list[str] = []
    page.on("request", lambda r: lists.append(r.url) if "/api/v1/packages?" in r.url else None)
    with site.client() as c:
        assert c.patch("/api/v1/packages/App 002.pkg", json={"stage": "test"}).status_code == 200
        expect(page.get_by_label("Stage of App 002.pkg")).to_have_value("test")
        assert upload_bytes(c, "App 000a.pkg", b"new").status_code == 201  # sorts onto this page
        expect(rows.nth(1)).to_contain_text("App 000a.pkg")
        expect(rows).to_have_count(100)
        expect(page.locator("p.count")).to_have_text("1–100 of 106 packages")
        assert c.delete("/api/v1/packages/App 001.pkg").status_code == 200
        expect(page.get_by_role("row", name=re.compile("App 001.pkg"))).to_have_count(0)
        expect(page.locator("p.count")).to_have_text("1–99 of 105 packages")
    assert lists and all("name=" in u for u in lists), f"a live event refetched the list: {lists}"
    shot(page, "live-rows")
