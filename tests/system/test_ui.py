"""The web UI in a real browser (headless Debian Chromium) against a real ``odst serve``.

Each test starts its own site, signs in as a local user made through the Admin API, and
tells one story: sign in, upload with progress, cancel, re-stage and delete, live updates,
what an auditor may not do, sign-out, keyboard-only use. Screenshots of the key steps land
in test-artifacts/screenshots/.
"""

from __future__ import annotations

import hashlib
import re
import time

import httpx
import pytest

from odst import __version__
from tests.browser import allow_console_error, shot
from tests.conftest import upload_bytes, wait_until, write_random

expect = pytest.importorskip("playwright.sync_api").expect

ADMIN_PASSWORD = "admin-password-for-tests"
PASSWORD = "correct horse battery"


@pytest.fixture
def ui_site(make_site):
    """A site with a web UI admin user. Tests take it before ``page`` so the browser closes
    first: a site stopped under an open event stream makes Chromium log the broken stream."""
    return make_site(env={"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD, "ODST_SITE_NAME": "HQ"}).start()


def add_user(site, username: str, role: str, display_name: str = "") -> None:
    with site.client() as c:
        r = c.post("/api/v1/users", json={"username": username, "password": PASSWORD, "role": role,
                                          "display_name": display_name})
        assert r.status_code == 201, r.text


def sign_in(page, site, username: str, password: str = PASSWORD) -> None:
    page.goto(site.url + "/")
    page.get_by_label("User name").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1, name="Packages")).to_be_visible()


def session_cookie(page) -> str:
    return next(c["value"] for c in page.context.cookies() if c["name"] == "odst_session")


def throttle_uploads(page, bytes_per_s: float) -> None:
    """Slow this page's uploads (Chromium's own network emulation) so a test can act mid-upload."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                  "downloadThroughput": -1, "uploadThroughput": bytes_per_s})


def record_progress(page) -> None:
    """Record every value the UI gives the <progress> bar (its value attribute) in window.__progress."""
    page.evaluate("""() => {
      window.__progress = [];
      new MutationObserver((changes) => {
        for (const m of changes) if (m.target.tagName === 'PROGRESS') window.__progress.push(m.target.value);
      }).observe(document.getElementById('main'), { subtree: true, attributes: true, attributeFilter: ['value'] });
    }""")


def accessibility_problems(page) -> list[str]:
    """Form controls without a label, column headers without a scope, unnamed buttons."""
    return page.evaluate("""() => {
      const out = [];
      for (const el of document.querySelectorAll('input, select, textarea')) {
        if (el.hidden || el.type === 'hidden') continue;
        if (!el.labels.length && !el.getAttribute('aria-label')) out.push('unlabelled ' + el.outerHTML);
      }
      for (const th of document.querySelectorAll('th')) if (!th.getAttribute('scope')) out.push('th without scope: ' + th.textContent);
      for (const b of document.querySelectorAll('button')) if (!(b.getAttribute('aria-label') || b.textContent.trim())) out.push('unnamed button');
      if (document.querySelectorAll('main').length !== 1 || !document.querySelector('main h1')) out.push('no main with an h1');
      return out;
    }""")


def test_shell_is_served_with_a_strict_policy(ui_site):
    r = httpx.get(ui_site.url + "/", follow_redirects=False)
    assert r.status_code == 302 and r.headers["location"] == "/ui/"
    r = httpx.get(ui_site.url + "/ui/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
                      "base-uri 'none'", "form-action 'self'", "connect-src 'self'", "img-src 'self' data:"):
        assert directive in csp
    assert "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "same-origin"
    assert r.headers["cache-control"] == "no-store"
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', r.text)
    assert assets and all(a.startswith(f"/ui/static/{__version__}-") for a in assets), assets
    assert "<script>" not in r.text and not re.search(r"\s(on[a-z]+|style)=", r.text)  # nothing inline
    for url in assets:
        a = httpx.get(ui_site.url + url)
        assert a.status_code == 200, url
        assert "immutable" in a.headers["cache-control"]
        assert a.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(ui_site.url + "/ui/static/x/../../etc/passwd").status_code == 404


def test_sign_in_shows_the_server_error_then_lands_on_packages(ui_site, page):
    add_user(ui_site, "olivia", "operator", "Olivia Operator")
    page.goto(ui_site.url + "/")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "1-sign-in")
    page.get_by_label("User name").fill("olivia")
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("user name or password is wrong")  # the server's words
    expect(page.get_by_label("Password")).to_have_value("")
    shot(page, "2-wrong-password")
    for _ in range(5):  # someone guesses at eve's account until the server stops answering
        r = httpx.post(ui_site.url + "/api/v1/session", json={"username": "eve", "password": "guess"})
        assert r.status_code == 401, r.text
    page.get_by_label("User name").fill("eve")
    page.get_by_label("Password").fill("one more guess")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("too many failed sign-ins")
    expect(page.get_by_role("alert")).to_contain_text(re.compile(r"opens again at \d\d:\d\d \(in about 15 min\)"))
    expect(page.get_by_role("button", name="Sign in (wait)")).to_be_disabled()
    shot(page, "3-too-many-attempts")
    page.get_by_label("User name").fill("olivia")  # the lockout is eve's, not olivia's
    expect(page.get_by_role("button", name="Sign in")).to_be_enabled()
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1, name="Packages")).to_be_visible()
    expect(page.locator("#user-label")).to_contain_text("Olivia Operator")
    expect(page.locator("#user-label")).to_contain_text("operator")
    expect(page.locator("#site-label")).to_contain_text("HQ")
    expect(page.locator("#live")).to_have_text("Live")
    expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Upload")).to_be_visible()
    shot(page, "4-signed-in")


def test_upload_shows_progress_and_the_package_appears_with_its_sha1(ui_site, page, tmp_path):
    add_user(ui_site, "olivia", "operator")
    path = write_random(tmp_path / "Firefox 150.pkg", 200 * 1000 * 1000, seed=7)
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            sha1.update(block)
    sign_in(page, ui_site, "olivia")
    page.get_by_role("link", name="Upload a package").click()
    expect(page.get_by_role("heading", level=1, name="Upload a package")).to_be_visible()
    page.locator("input[type=file]").set_input_files(str(path))
    expect(page.get_by_label("Name on the server")).to_have_value("Firefox 150.pkg")
    page.get_by_label("Stage").select_option("test")
    shot(page, "1-chosen")
    record_progress(page)
    started = time.monotonic()
    page.get_by_role("button", name="Upload", exact=True).click()
    bar = page.get_by_label("Firefox 150.pkg → stage test")
    expect(bar).to_be_visible()
    observed: list[float] = []
    done = page.locator(".upload-panel .message.success")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not done.is_visible():
        value = page.evaluate("() => { const p = document.querySelector('progress'); return p ? p.value : null; }")
        if value is not None and (not observed or value != observed[-1]):
            observed.append(value)
            if len(observed) == 3:
                shot(page, "2-progress")
    expect(done).to_contain_text("Uploaded Firefox 150.pkg")
    elapsed = time.monotonic() - started
    recorded = page.evaluate("window.__progress")
    moving = [v for v in recorded if 0 < v < 200_000_000]
    assert len(set(moving)) >= 3, f"the bar moved through too few values: {recorded}"
    assert moving == sorted(moving), f"the bar went backwards: {recorded}"
    assert len([v for v in observed if 0 < v < 200_000_000]) >= 2, f"polling saw {observed} in {elapsed:.1f}s"
    expect(done).to_contain_text(sha1.hexdigest())
    expect(page.get_by_role("button", name="Upload", exact=True)).to_be_disabled()  # a second click would upload again
    shot(page, "3-uploaded")
    with ui_site.client() as c:
        pkg = c.get("/api/v1/packages/Firefox 150.pkg").json()
    assert pkg["sha1"] == sha1.hexdigest() and pkg["stage"] == "test" and pkg["uploaded_by"] == "user:olivia"
    page.get_by_role("link", name="View Firefox 150.pkg").click()
    expect(page.get_by_role("heading", level=1, name="Firefox 150.pkg")).to_be_visible()
    expect(page.get_by_role("row", name=re.compile("^SHA1"))).to_contain_text(sha1.hexdigest())
    expect(page.get_by_role("row", name=re.compile("^SHA-512"))).to_contain_text(pkg["sha512"])
    expect(page.get_by_text("191 chunks of 1 MiB")).to_be_visible()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=ui_site.url)
    page.get_by_role("button", name="Copy SHA-512").click()  # what Jamf Pro wants pasted
    expect(page.get_by_role("button", name="Copy SHA-512")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == pkg["sha512"]
    shot(page, "4-detail")
    page.get_by_role("link", name="Packages").first.click()
    row = page.get_by_role("row", name=re.compile("Firefox 150.pkg"))
    expect(row).to_contain_text(f"SHA1 {sha1.hexdigest()}")
    expect(row).to_contain_text("1/1 site")
    shot(page, "5-list")


def test_a_cancelled_upload_publishes_nothing(ui_site, page, tmp_path):
    add_user(ui_site, "olivia", "operator")
    path = write_random(tmp_path / "Huge.dmg", 64 * 1000 * 1000, seed=8)
    sign_in(page, ui_site, "olivia")
    throttle_uploads(page, 16e6)  # 4 s for the whole file: time enough to cancel
    page.goto(ui_site.url + "/ui/#/upload")
    page.locator("input[type=file]").set_input_files(str(path))
    page.get_by_role("button", name="Upload", exact=True).click()
    bar = page.locator("progress")
    wait_until(lambda: (bar.evaluate("p => p.value") or 0) > 5_000_000, 20, what="the upload to get going")
    shot(page, "1-uploading")
    page.get_by_role("button", name="Cancel upload").click()
    message = page.locator(".upload-panel .message")
    expect(message).to_contain_text("Upload of Huge.dmg cancelled")
    expect(message).to_contain_text("nothing was published")
    shot(page, "2-cancelled")
    with ui_site.client() as c:
        assert c.get("/api/v1/packages/Huge.dmg").status_code == 404
        assert c.get("/api/v1/packages").json()["count"] == 0
    tmp = ui_site.data / "store" / "tmp"
    wait_until(lambda: not any(tmp.iterdir()) if tmp.exists() else True, 15,
               what="the server to drop the partial upload")
    assert not (ui_site.data / "store" / "packages" / "huge.dmg").exists()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Packages").click()
    expect(page.get_by_text("No packages yet.")).to_be_visible()


def test_a_refused_upload_says_why(ui_site, page, tmp_path):
    add_user(ui_site, "olivia", "operator")
    with ui_site.client() as c:
        assert upload_bytes(c, "Office.pkg", b"a" * 6000).status_code == 201
    sign_in(page, ui_site, "olivia")
    page.goto(ui_site.url + "/ui/#/upload")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a package")
    page.locator("input[type=file]").set_input_files(str(notes))
    expect(page.get_by_label("Name on the server")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("button", name="Upload", exact=True)).to_be_disabled()  # nothing to send
    expect(page.locator(".field-error")).to_contain_text("The name must end with .pkg, .dmg, .zip, .mpkg.")
    expect(page.locator("progress")).to_have_count(0)  # nothing was sent

    page.evaluate("""() => {  // a file dropped anywhere on the page lands in the form
      const data = new DataTransfer();
      data.items.add(new File(['dropped'], 'Dropped.dmg'));
      window.dispatchEvent(new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
    }""")
    expect(page.get_by_label("Name on the server")).to_have_value("Dropped.dmg")
    expect(page.locator(".dropzone")).to_contain_text("Dropped.dmg · 7 bytes")
    other = tmp_path / "Office.pkg"
    other.write_bytes(b"b" * 6000)  # same name and size, other content: only the server can tell
    page.locator("input[type=file]").set_input_files(str(other))
    page.get_by_role("button", name="Upload", exact=True).click()
    failed = page.locator(".upload-panel .message.error")
    expect(failed).to_contain_text("Upload of Office.pkg failed (HTTP 409)")
    expect(failed).to_contain_text("a different package named 'Office.pkg' exists")  # the server's detail
    shot(page, "1-conflict")

    page.get_by_role("button", name="Upload another").click()
    allow_console_error(page, r"^Failed to load resource: net::ERR_CONNECTION_RESET$")  # we cut it below
    page.route("**/api/v1/packages/*", lambda route: route.abort("connectionreset")
               if route.request.method == "PUT" else route.continue_())
    page.locator("input[type=file]").set_input_files(str(other))
    page.get_by_label("Name on the server").fill("Office 2.pkg")
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(failed).to_contain_text("The connection to the server was lost during the upload")
    shot(page, "2-connection-lost")
    with ui_site.client() as c:
        assert c.get("/api/v1/packages").json()["count"] == 1


def test_stage_change_and_delete(ui_site, page):
    add_user(ui_site, "olivia", "operator")
    with ui_site.client() as c:
        assert upload_bytes(c, "Office.pkg", b"office" * 1000, params={"stage": "test"}).status_code == 201
        assert upload_bytes(c, "Zoom.pkg", b"zoom" * 1000).status_code == 201
    sign_in(page, ui_site, "olivia")
    row = page.get_by_role("row", name=re.compile("Office.pkg"))
    stage = row.get_by_label("Stage of Office.pkg")
    expect(stage).to_have_value("test")
    stage.select_option("prod")  # asks first, as Delete does; Cancel leaves it as it was
    confirm = page.get_by_role("dialog", name="Change the stage?")
    expect(confirm).to_contain_text("Move Office.pkg from test to prod?")
    confirm.get_by_role("button", name="Cancel").click()
    expect(stage).to_have_value("test")
    with ui_site.client() as c:
        assert c.get("/api/v1/packages/Office.pkg").json()["stage"] == "test"
    stage.select_option("prod")
    confirm.get_by_role("button", name="Move to prod").click()
    expect(page.locator("#toasts")).to_contain_text("Office.pkg is now in stage prod.")
    shot(page, "1-restaged")
    with ui_site.client() as c:
        assert c.get("/api/v1/packages/Office.pkg").json()["stage"] == "prod"
    page.get_by_role("button", name="Size").click()  # biggest first
    expect(page.locator("table.packages tbody tr").first).to_contain_text("Office.pkg")
    expect(page.get_by_role("columnheader", name="Size")).to_have_attribute("aria-sort", "descending")
    page.get_by_role("button", name="Size").click()
    expect(page.locator("table.packages tbody tr").first).to_contain_text("Zoom.pkg")
    page.get_by_label("Stage", exact=True).select_option("test")  # the list's stage filter
    expect(page.get_by_text("No package matches")).to_be_visible()
    page.get_by_label("Stage", exact=True).select_option("")
    row.get_by_role("button", name="Delete Office.pkg").click()
    dialog = page.get_by_role("dialog", name="Delete package?")
    expect(dialog).to_contain_text("Office.pkg")
    shot(page, "2-confirm-delete")
    dialog.get_by_role("button", name="Cancel").click()
    expect(dialog).to_be_hidden()
    with ui_site.client() as c:
        assert c.get("/api/v1/packages/Office.pkg").status_code == 200
    row.get_by_role("button", name="Delete Office.pkg").click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(page.locator("#toasts")).to_contain_text("Deleted Office.pkg.")
    expect(page.get_by_role("row", name=re.compile("Office.pkg"))).to_have_count(0)
    expect(page.get_by_role("row", name=re.compile("Zoom.pkg"))).to_be_visible()
    shot(page, "3-deleted")
    with ui_site.client() as c:
        assert c.get("/api/v1/packages/Office.pkg").status_code == 404


def test_pages_update_live_without_a_reload(ui_site, page):
    add_user(ui_site, "aaron", "auditor")
    sign_in(page, ui_site, "aaron")
    page.evaluate("window.__sameDocument = true")
    expect(page.get_by_text("No packages yet.")).to_be_visible()
    hostile = '<img src=x onerror="window.__pwned=1">.pkg'
    with ui_site.client() as c:
        assert upload_bytes(c, "Chrome.pkg", b"chrome" * 5000).status_code == 201
        assert upload_bytes(c, hostile, b"hostile").status_code == 201
    expect(page.get_by_role("row", name=re.compile("Chrome.pkg"))).to_be_visible()
    expect(page.get_by_role("link", name=hostile)).to_be_visible()  # shown as text, never as markup
    assert page.locator("main img").count() == 0
    shot(page, "1-packages-live")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Event log").click()
    expect(page.get_by_role("heading", level=1, name="Event log")).to_be_visible()
    first = page.locator("table.events tbody tr").first
    expect(first).to_contain_text("PackageUploaded")
    with ui_site.client() as c:
        assert c.patch("/api/v1/packages/Chrome.pkg", json={"stage": "dev"}).status_code == 200
    expect(first).to_contain_text("Chrome.pkg: stage prod → dev")
    expect(first).to_contain_text("PackageStaged")
    expect(first.locator("td.sig")).to_contain_text("valid")  # re-checked with Web Crypto Ed25519 here
    expect(page.locator("table.events td.sig").filter(has_text="invalid")).to_have_count(0)
    first.get_by_role("button", name=re.compile("Details of event")).click()
    expect(page.locator("pre.envelope")).to_contain_text('"type": "PackageStaged"')
    shot(page, "2-event-log-live")
    page.get_by_label("Type").select_option("PackageUploaded")
    expect(page.locator("table.events tbody tr[data-type]")).to_have_count(2)
    expect(page.locator("table.events tbody tr[data-type=PackageStaged]")).to_have_count(0)
    assert page.evaluate("window.__sameDocument") is True
    assert page.evaluate("window.__pwned") is None


def test_an_auditor_sees_no_write_controls_and_the_server_refuses_anyway(ui_site, page):
    add_user(ui_site, "aaron", "auditor", "Aaron Auditor")
    with ui_site.client() as c:
        assert upload_bytes(c, "Slack.pkg", b"slack" * 1000).status_code == 201
    sign_in(page, ui_site, "aaron")
    row = page.get_by_role("row", name=re.compile("Slack.pkg"))
    expect(row).to_be_visible()
    expect(row.get_by_role("combobox")).to_have_count(0)
    expect(row.get_by_role("button")).to_have_count(0)
    expect(page.get_by_role("link", name="Upload a package")).to_have_count(0)
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="Upload")).to_have_count(0)
    expect(nav.get_by_role("link", name="Event log")).to_be_visible()
    shot(page, "1-auditor-packages")
    page.goto(ui_site.url + "/ui/#/upload")
    expect(page.get_by_role("heading", level=1, name="Not available to your role")).to_be_visible()
    page.goto(ui_site.url + "/ui/#/packages/Slack.pkg")
    expect(page.get_by_role("heading", level=1, name="Slack.pkg")).to_be_visible()
    expect(page.get_by_role("button", name="Delete…")).to_have_count(0)
    page.goto(ui_site.url + "/ui/#/settings")
    expect(page.get_by_role("heading", name="Users")).to_have_count(0)
    expect(page.get_by_role("heading", name="Site settings")).to_be_visible()
    shot(page, "2-auditor-settings")
    refused = page.evaluate("""async () => {
      const s = await (await fetch('/api/v1/session')).json();
      const headers = { 'X-CSRF-Token': s.csrf_token, 'Content-Type': 'application/json' };
      const patch = await fetch('/api/v1/packages/Slack.pkg', { method: 'PATCH', headers, body: '{"stage":"dev"}' });
      const del = await fetch('/api/v1/packages/Slack.pkg', { method: 'DELETE', headers });
      const put = await fetch('/api/v1/packages/Evil.pkg', { method: 'PUT', headers, body: 'x' });
      return [patch.status, del.status, put.status, (await patch.json()).error];
    }""")
    assert refused == [403, 403, 403, "forbidden"]
    with ui_site.client() as c:
        assert c.get("/api/v1/packages/Slack.pkg").json()["stage"] == "prod"
        assert c.patch("/api/v1/users/aaron", json={"role": "operator"}).status_code == 200
    # A role change reaches the open page through the event stream, without a reload.
    expect(page.locator("#user-label")).to_contain_text("operator")
    expect(nav.get_by_role("link", name="Upload")).to_be_visible()
    shot(page, "3-promoted-live")


def test_sign_out_returns_to_sign_in_and_the_old_cookie_is_dead(ui_site, page):
    add_user(ui_site, "olivia", "operator")
    sign_in(page, ui_site, "olivia")
    cookie = session_cookie(page)
    assert httpx.get(ui_site.url + "/api/v1/packages", cookies={"odst_session": cookie}).status_code == 200
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_text("You have signed out.")).to_be_visible()
    expect(page.locator("#topbar")).to_be_hidden()
    shot(page, "1-signed-out")
    r = httpx.get(ui_site.url + "/api/v1/packages", cookies={"odst_session": cookie})
    assert r.status_code == 401, r.text
    page.reload()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()


def test_an_ended_session_returns_to_sign_in_and_says_so(ui_site, page):
    add_user(ui_site, "olivia", "operator")
    sign_in(page, ui_site, "olivia")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Network").click()
    expect(page.get_by_role("heading", level=1, name="Network")).to_be_visible()
    with ui_site.client() as c:  # an admin resets olivia's password: her sessions end
        assert c.patch("/api/v1/users/olivia", json={"password": "a brand new secret"}).status_code == 200
    # The event says so: the page asks the server at once rather than at her next click.
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(page.get_by_text("You were signed out: the server says")).to_be_visible()
    shot(page, "1-session-ended")
    page.get_by_label("User name").fill("olivia")
    page.get_by_label("Password").fill("a brand new secret")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1, name="Network")).to_be_visible()  # back where she was
    page.goto(ui_site.url + "/ui/#/settings")
    page.get_by_role("tab", name="My account").click()  # Settings shows one section at a time
    account = page.locator("section[aria-labelledby=sec-account]")
    account.get_by_label("Current password").fill("a brand new secret")
    account.get_by_label("New password", exact=True).fill("my own new secret")
    account.get_by_label("New password again").fill("my own new secret")
    account.get_by_role("button", name="Change password").click()
    expect(account.get_by_text("Your password was changed.")).to_be_visible()
    page.goto(ui_site.url + "/ui/#/upload")  # still signed in, and writes still pass the CSRF check
    page.locator("input[type=file]").set_input_files(
        files=[{"name": "Tiny.pkg", "mimeType": "application/octet-stream", "buffer": b"tiny"}])
    page.get_by_role("button", name="Upload", exact=True).click()
    expect(page.locator(".upload-panel .message.success")).to_contain_text("Uploaded Tiny.pkg")


def test_keyboard_only_sign_in_and_navigation(ui_site, page):
    add_user(ui_site, "olivia", "operator")
    page.goto(ui_site.url + "/")
    expect(page.get_by_label("User name")).to_be_focused()
    page.keyboard.press("Shift+Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.keyboard.press("Tab")
    page.keyboard.type("olivia")
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.type(PASSWORD)
    shot(page, "1-typed")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1, name="Packages")).to_be_focused()
    visited = []
    for _ in range(8):  # the header comes before the page: go back through it
        page.keyboard.press("Shift+Tab")
        visited.append(page.evaluate("document.activeElement.textContent"))
        if visited[-1] == "Event log":
            break
    assert visited[-1] == "Event log", visited
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline == "solid", "the focused link shows no focus ring"
    shot(page, "2-focus-ring")
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1, name="Event log")).to_be_focused()


def test_an_admin_manages_tokens_users_and_webhooks_in_settings(ui_site, page):
    add_user(ui_site, "bob", "operator", "Bob")
    sign_in(page, ui_site, "admin", ADMIN_PASSWORD)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Settings").click()
    expect(page.get_by_role("heading", name="Site settings")).to_be_visible()
    expect(page.locator("dl.facts").first).to_contain_text(".pkg, .dmg, .zip, .mpkg")

    page.get_by_role("tab", name="API tokens").click()  # Settings shows one section at a time
    tokens = page.locator("section[aria-labelledby=sec-tokens]")
    tokens.get_by_label("Name").fill("Jamf Pro sync")
    tokens.get_by_label("Role").select_option("auditor")
    tokens.get_by_role("button", name="Create token").click()
    secret = tokens.locator(".secret code")
    expect(secret).to_have_text(re.compile(r"^odst_"))
    token = secret.inner_text()
    expect(tokens.get_by_role("row", name=re.compile("Jamf Pro sync"))).to_contain_text("active")
    with ui_site.client(token) as c:  # the token shown once works, with the role chosen
        assert c.get("/api/v1/packages").status_code == 200
        assert c.delete("/api/v1/packages/x.pkg").status_code == 403
    shot(page, "1-token-created")

    page.get_by_role("tab", name="Users").click()  # Settings shows one section at a time
    users = page.locator("section[aria-labelledby=sec-users]")
    users.get_by_label("Role of bob").select_option("auditor")
    expect(page.locator("#toasts")).to_contain_text("bob is now auditor.")
    users.get_by_role("button", name="Reset the password of bob").click()
    dialog = page.get_by_role("dialog", name="New password for bob")
    dialog.get_by_label("New password", exact=True).fill("bobs new password")
    dialog.get_by_label("New password again").fill("bobs new passwordX")
    dialog.get_by_role("button", name="Set password").click()
    expect(dialog.get_by_role("alert")).to_have_text("The two new passwords differ.")
    dialog.get_by_label("New password again").fill("bobs new password")
    dialog.get_by_role("button", name="Set password").click()
    expect(page.locator("#toasts")).to_contain_text("The password of bob was reset.")
    r = httpx.post(ui_site.url + "/api/v1/session", json={"username": "bob", "password": "bobs new password"})
    assert r.status_code == 200 and r.json()["role"] == "auditor"
    users.get_by_label("User name", exact=True).fill("carol")
    users.get_by_label("Password", exact=True).fill("short")
    users.get_by_role("button", name="Add user").click()
    expect(users.get_by_role("alert")).to_contain_text("password must be at least")  # the server's rule
    users.get_by_label("Password", exact=True).fill("carols long password")
    users.get_by_role("button", name="Add user").click()
    expect(users.get_by_role("row", name=re.compile("^carol"))).to_be_visible()
    expect(users.get_by_label("Role", exact=True)).to_have_value("operator")  # the form reset to its default
    shot(page, "2-users")

    page.get_by_role("tab", name="Webhooks").click()  # Settings shows one section at a time
    hooks = page.locator("section[aria-labelledby=sec-webhooks]")
    hooks.get_by_label("URL").fill("https://hooks.example.com/odst")
    hooks.get_by_label("PackageUploaded").check()
    hooks.get_by_role("button", name="Add webhook").click()
    expect(hooks.locator(".secret code")).to_be_visible()
    row = hooks.get_by_role("row", name=re.compile("hooks.example.com"))
    expect(row).to_contain_text("PackageUploaded")
    row.get_by_role("button", name=re.compile("^Deliveries")).click()
    expect(hooks.get_by_text("No deliveries yet.")).to_be_visible()
    shot(page, "3-webhook")
    row.get_by_role("button", name=re.compile("^Delete webhook")).click()
    page.get_by_role("dialog").get_by_role("button", name="Delete").click()
    expect(hooks.get_by_text("No webhooks.")).to_be_visible()
    with ui_site.client() as c:
        assert c.get("/api/v1/webhooks").json()["webhooks"] == []
        assert upload_bytes(c, "A.pkg", b"a").status_code == 201
    for route in ("settings", "packages", "packages/A.pkg", "upload", "network", "events"):
        page.goto(f"{ui_site.url}/ui/#/{route}")
        expect(page.locator("main h1")).to_be_visible()
        expect(page.locator("main .loading")).to_have_count(0)
        assert accessibility_problems(page) == [], route


def test_two_sites_are_linked_and_unlinked_from_the_network_page(make_site, page):
    env = {"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD}
    hq = make_site("hq", env={**env, "ODST_SITE_NAME": "HQ"}).start()
    branch = make_site("branch", env={**env, "ODST_SITE_NAME": "Branch"}).start()
    sign_in(page, hq, "admin", ADMIN_PASSWORD)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Network").click()
    expect(page.get_by_text("No other sites yet.")).to_be_visible()
    page.get_by_label("Valid for").select_option("3600")
    page.get_by_role("button", name="Create invitation").click()
    token = page.locator(".secret code").inner_text()
    expect(page.get_by_text("it is shown only once", exact=False)).to_be_visible()
    shot(page, "1-invitation")

    sign_in(page, branch, "admin", ADMIN_PASSWORD)  # the same browser, now at the other site
    page.goto(branch.url + "/ui/#/network")
    page.get_by_label("Invitation token").fill(token)
    page.get_by_role("button", name="Join").click()
    expect(page.get_by_text(re.compile(r"Registered with HQ \(\w+\) over (http|nats)\."))).to_be_visible()
    row = page.get_by_role("row", name=re.compile("^HQ"))
    expect(row).to_contain_text("here")
    expect(row.get_by_text(re.compile("^(up|down|unknown)$"))).to_be_visible()
    shot(page, "2-joined")
    with hq.client() as c:
        assert [p["name"] for p in c.get("/api/v1/peers").json()["peers"]] == ["Branch"]

    row.get_by_role("button", name="Remove site HQ").click()
    page.get_by_role("dialog", name="Remove site?").get_by_role("button", name="Remove").click()
    expect(page.get_by_text("No other sites yet.")).to_be_visible()
    expect(page.get_by_text("Removed (no longer trusted)")).to_be_visible()
    shot(page, "3-removed")
    with branch.client() as c:
        peers = c.get("/api/v1/peers").json()
    assert peers["peers"] == [] and len(peers["removed"]) == 1
