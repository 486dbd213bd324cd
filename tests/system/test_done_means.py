"""Issue 4's "done means", as one story in a real browser:

Alice, a Mac admin in the directory (real slapd), signs in to site HQ's web UI
with her LDAP credentials, uploads a 2 GB package watching its progress bar,
sees it become available at the second site (Branch, linked by a leaf node and
registered), and HQ's webhook receiver and mailbox get the news that Branch has
it. Everything is real: two ``odst serve`` processes, slapd, an HTTP receiver,
aiosmtpd and headless Chromium. Screenshots of each step land in
test-artifacts/screenshots/test_done_means_*.png.
"""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from playwright.sync_api import expect

from tests.browser import shot
from tests.conftest import free_port, wait_until, write_random
from tests.system.test_notifications import documented_verifier, receiver, smtp, subscribe  # noqa: F401, F811  (fixtures)
from tests.system.test_replication import register, site_id
from tests.system.test_ui import record_progress, sign_in

SIZE = 2_000_000_000  # "a 2 GB package"
MAILTO = "mac-admins@odst.test"


@pytest.fixture
def two_sites(make_site, slapd, smtp):
    smtp, _ = smtp
    leaf = free_port()
    hq = make_site("hq", env={**slapd.settings_env(), "ODST_SMTP_HOST": "127.0.0.1",
                              "ODST_SMTP_PORT": str(smtp.port), "ODST_SMTP_FROM": "odst@odst.test",
                              "ODST_NOTIFY_EMAIL_DIGEST_S": "2"},
                   extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "HQ"])
    branch = make_site("branch", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}",
                                             "--site-name", "Branch"])
    hq.start()
    branch.start()
    register(hq, branch)
    return hq, branch


def test_ldap_admin_uploads_2gb_and_sees_it_reach_the_second_site_with_webhook_and_mail(
        two_sites, receiver, smtp, page, tmp_path):
    hq, branch = two_sites
    _, box = smtp
    hq_id, branch_id = site_id(hq), site_id(branch)
    with hq.client() as c:
        hook = subscribe(c, receiver.url("/odst"), ["PackageAvailable"])
        r = c.post("/api/v1/email-subscriptions", json={"recipient": MAILTO, "event_types": ["PackageAvailable"]})
        assert r.status_code == 201, r.text

    name = "Xcode 17.pkg"
    path = write_random(tmp_path / name, SIZE, seed=17)
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            sha1.update(block)
    sha1 = sha1.hexdigest()

    # 1. Sign in with directory credentials: alice is in odst-admins.
    sign_in(page, hq, "alice", "alice-pw")
    expect(page.get_by_text("Alice Admin")).to_be_visible()
    shot(page, "1-signed-in-with-ldap")

    # 2. Upload 2 GB, watching the progress bar move.
    page.get_by_role("link", name="Upload a package").click()
    page.locator("input[type=file]").set_input_files(str(path))
    expect(page.get_by_label("Name on the server")).to_have_value(name)
    record_progress(page)
    page.get_by_role("button", name="Upload", exact=True).click()
    done = page.locator(".upload-panel .message.success")
    shots, deadline = 0, time.monotonic() + 600
    while time.monotonic() < deadline and not done.is_visible():
        value = page.evaluate("() => { const p = document.querySelector('progress'); return p ? p.value : null; }")
        if value and shots == 0 and value > SIZE * 0.2:
            shot(page, "2-upload-in-progress")
            shots = 1
        page.wait_for_timeout(200)  # a polling interval for the screenshot, not synchronisation
    expect(done).to_contain_text(f"Uploaded {name}", timeout=5_000)
    expect(done).to_contain_text(sha1)
    moving = [v for v in page.evaluate("window.__progress") if 0 < v < SIZE]
    assert len(set(moving)) >= 10 and moving == sorted(moving), moving[:50]
    shot(page, "3-uploaded")

    # 3. See it reach the second site, live on the package page.
    page.get_by_role("link", name=f"View {name}").click()
    expect(page.get_by_role("heading", level=1, name=name)).to_be_visible()
    expect(page.get_by_role("heading", name="Availability: 2/2 sites")).to_be_visible(timeout=300_000)
    shot(page, "4-available-at-both-sites")
    with branch.client() as c:
        at_branch = c.get(f"/api/v1/packages/{name}").json()
    assert at_branch["sha1"] == sha1 and at_branch["uploaded_by"] == "ldap:alice"
    assert at_branch["availability"][branch_id]["status"] == "available"
    head = httpx.head(f"{branch.url}/CasperShare/Packages/{name}", timeout=30)
    assert head.status_code == 200 and int(head.headers["content-length"]) == SIZE

    # 4. The webhook: HQ tells its receiver that Branch holds a verified copy, signed.
    verify = documented_verifier()

    def branch_available():
        for r in receiver.got(path="/odst"):
            body = json.loads(r["body"])
            if body["type"] == "PackageAvailable" and body["origin"] == branch_id \
                    and body["envelope"]["event"]["name"] == name:
                return r
    delivery = wait_until(branch_available, 120, what="the webhook for the copy at Branch")
    assert verify(hook["secret"], delivery["headers"]["X-ODST-Signature"], delivery["body"])

    # 5. The email digest names the package and both sites' copies.
    def mail_about_branch():
        for msg in box.to(MAILTO):
            text = msg.get_content()
            if name in text and branch_id in text:
                return msg
    mail = wait_until(mail_about_branch, 120, what="the digest mail naming Branch's copy")
    assert "[ODST HQ]" in mail["Subject"] and hq_id in mail.get_content()

    # The delivery log in the UI shows it delivered.
    page.get_by_role("link", name="Settings").click()
    page.get_by_role("tab", name="Webhooks").click()  # Settings shows one section at a time
    expect(page.get_by_text(receiver.url("/odst"))).to_be_visible()
    shot(page, "5-settings-webhook")
