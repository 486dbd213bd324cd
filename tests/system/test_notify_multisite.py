"""Notifications where more than one process sees the same events: two linked sites, a site
run as roles with two replicators (and the dispatcher's first start); SMTP over STARTTLS with
a login, a recipient the server refuses; pruning the ledger.

Real processes on 127.0.0.1 (``odst serve`` / role processes, nats-server, an HTTP
receiver, aiosmtpd); every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import ssl
import subprocess
from collections import Counter
from pathlib import Path

import httpx
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from odst.bus.embedded import nats_server_binary
from odst.notify.ledger import RETAIN_MS, Ledger, ledger_path, now_ms
from odst.notify.service import Pruner
from harness.wait import until
from tests.conftest import ADMIN_TOKEN, free_port, run_odst, upload_bytes, wait_until
from tests.system.test_notifications import FAST_RETRY, Mailbox, deliveries, documented_verifier, subscribe
from tests.system.test_notifications import receiver, smtp  # noqa: F401, F811  (fixtures)
from tests.system.test_replication import register, site_id
from tests.system.test_roles import Procs, healthy, odst

MAILTO = "multisite@test.invalid"


def start_all(*sites, timeout: float = 60.0):
    """Start several ``odst serve`` processes at once and wait until all are healthy."""
    for s in sites:
        s.start_process()

    def all_healthy():
        for s in sites:
            if s.proc.poll() is not None:
                raise AssertionError(f"odst serve exited with {s.proc.returncode}:\n{s.log()}")
        return all(healthy(s.url) for s in sites)
    try:
        wait_until(all_healthy, timeout, what="the sites to become healthy")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n" + "\n".join(f"--- {s.data.name}\n{s.log()}" for s in sites)) from None
    return sites


def smtp_env(port: int, digest_s: int = 2) -> dict:
    return {"ODST_SMTP_HOST": "127.0.0.1", "ODST_SMTP_PORT": str(port), "ODST_SMTP_FROM": "odst@test.invalid",
            "ODST_NOTIFY_EMAIL_DIGEST_S": str(digest_s)}


def ledger_rows(data: Path, sql: str) -> list[dict]:
    """Read a site's notify.sqlite (read-only) the way an admin's sqlite3 would."""
    path = ledger_path(data)
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql)]
    finally:
        conn.close()


def bodies(requests: list[dict]) -> list[dict]:
    return [json.loads(r["body"]) for r in requests]


# ---------------------------------------------------------------- two linked sites


def test_two_sites_notify_once_from_the_subscribing_site(make_site, receiver, smtp):
    controller, box = smtp
    leaf = free_port()
    env = {**FAST_RETRY, **smtp_env(controller.port)}  # B could mail and post too: it must not
    a = make_site("a", env=env, extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"])
    b = make_site("b", env=env, extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"])
    start_all(a, b)
    register(a, b)
    a_id, b_id = site_id(a), site_id(b)
    types = ["PackageAvailable", "PackageUploaded"]
    with a.client() as ca:
        hook = subscribe(ca, receiver.url("/a"), types)
        r = ca.post("/api/v1/email-subscriptions", json={"recipient": MAILTO, "event_types": types})
        assert r.status_code == 201, r.text
        assert upload_bytes(ca, "Multi.pkg", b"m" * 3000).status_code == 201

        def both_seen(name: str):
            got = [b for b in bodies(receiver.got(ok=True)) if b["envelope"]["event"]["name"] == name]
            kinds = {(b["type"], b["origin"]) for b in got}
            return got if {("PackageUploaded", a_id), ("PackageAvailable", b_id)} <= kinds else None
        multi = wait_until(lambda: both_seen("Multi.pkg"), 60, what="PackageUploaded at A and PackageAvailable at B")

        # a barrier for "nothing more comes": a second package's two deliveries went through
        # the same path after the first's; any duplicate of the first would be there by now
        assert upload_bytes(ca, "Marker.pkg", b"k" * 1000).status_code == 201
        wait_until(lambda: both_seen("Marker.pkg"), 60, what="the marker package's deliveries")
        log = wait_until(lambda: (d := deliveries(ca, hook["webhook_id"])) and len(d) == 4
                         and all(x["status"] == "delivered" for x in d) and d, 15, what="A's delivery log")

    verify = documented_verifier()
    got = receiver.got()
    assert all(r["path"] == "/a" and r["ok"] for r in got)
    per_delivery = Counter(r["headers"]["X-ODST-Delivery"] for r in got)
    assert len(got) == 4 and set(per_delivery.values()) == {1}, per_delivery  # once each, 2 packages × 2 events
    assert set(per_delivery) == {d["delivery_id"] for d in log}
    assert all(d["attempts"] == 1 and d["last_status"] == 204 for d in log)
    for r in got:
        assert verify(hook["secret"], r["headers"]["X-ODST-Signature"], r["body"])
        body = json.loads(r["body"])
        assert body["site"] == a_id and body["webhook_id"] == hook["webhook_id"]  # sent by A, never by B
        assert body["delivery_id"] == r["headers"]["X-ODST-Delivery"]
        assert body["type"] == r["headers"]["X-ODST-Event"] == body["envelope"]["event"]["type"]
    assert sorted((b["type"], b["origin"]) for b in multi) == [("PackageAvailable", b_id), ("PackageUploaded", a_id)]

    # B saw the same events and has no subscriptions of its own: it queued nothing
    assert ledger_rows(b.data, "SELECT * FROM deliveries") == []
    assert ledger_rows(b.data, "SELECT * FROM email_outbox") == []
    with b.client() as cb:
        assert cb.get("/api/v1/webhooks").json()["webhooks"] == []
        assert cb.get("/api/v1/email-subscriptions").json()["subscriptions"] == []

    # the digest (one or more mails, as events fall into windows) names each event once, and site B
    def mailed():
        text = "".join(m.get_content() for m in box.to(MAILTO))
        lines = [ln for ln in text.splitlines() if ".pkg" in ln]
        return lines if len(lines) == 4 else None
    lines = wait_until(mailed, 30, what="the digest mail(s) to list all four events")
    multi_lines = [ln for ln in lines if "Multi.pkg" in ln]
    assert len(multi_lines) == 2
    assert any("PackageAvailable" in ln and f"at {b_id}" in ln for ln in multi_lines), lines
    assert any("PackageUploaded" in ln and f"at {a_id}" in ln for ln in multi_lines), lines
    assert all(m["Subject"].startswith("[ODST A]") for m in box.to(MAILTO))
    assert {r for rcpts, _ in box.messages for r in rcpts} == {MAILTO}


# ---------------------------------------------------------------- one site, several replicators


N_UPLOADS = 10


def test_each_webhook_is_delivered_once_by_two_replicators(tmp_path, receiver):
    data = tmp_path / "site"
    out = run_odst("site-id", "--data", str(data))
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    port = free_port()
    (tmp_path / "nats.conf").write_text(
        f'listen: "127.0.0.1:{port}"\nmax_payload: 8MB\nserver_name: "{sid}"\n'
        f'jetstream {{ store_dir: "{tmp_path / "js"}", domain: "{sid}" }}\n')
    procs, broker = Procs(tmp_path), Procs(tmp_path)
    try:
        broker.start("nats", [nats_server_binary(), "-c", str(tmp_path / "nats.conf")])
        common = ["--data", str(data), "--nats", f"nats://127.0.0.1:{port}"]
        procs.start("projector", odst("projector", *common), env=FAST_RETRY)
        reps = [procs.start(f"replicator-{i}", odst("replicator", *common), env=FAST_RETRY) for i in range(2)]
        gw = free_port()
        procs.start("gateway", odst("gateway", *common, "--http", f"127.0.0.1:{gw}"), env=FAST_RETRY)
        url = f"http://127.0.0.1:{gw}"
        wait_until(lambda: healthy(url), 90, what="the gateway to become healthy")

        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
            hook = subscribe(c, receiver.url(), ["PackageUploaded"])
            for i in range(N_UPLOADS):
                assert upload_bytes(c, f"Roles-{i:02d}.pkg", bytes([i]) * 2000).status_code == 201
            wait_until(lambda: len(receiver.got(ok=True)) >= N_UPLOADS, 60, what=f"{N_UPLOADS} deliveries")
            # a barrier for "nothing more comes": a later job went through; a duplicate would have had its time
            assert upload_bytes(c, "Roles-marker.pkg", b"z" * 10).status_code == 201
            wait_until(lambda: any(b["envelope"]["event"]["name"] == "Roles-marker.pkg"
                                   for b in bodies(receiver.got(ok=True))), 30, what="the marker delivery")
            log = wait_until(lambda: (d := deliveries(c, hook["webhook_id"])) and len(d) == N_UPLOADS + 1
                             and all(x["status"] == "delivered" for x in d) and d, 15, what="the delivery log")
        assert all(p.poll() is None for p in reps), "a replicator died"
    finally:
        procs.stop_all()  # the site's processes first, while their broker is still there
        broker.stop_all()

    got = receiver.got()
    per_delivery = Counter(r["headers"]["X-ODST-Delivery"] for r in got)
    assert len(got) == N_UPLOADS + 1 and set(per_delivery.values()) == {1}, per_delivery
    assert set(per_delivery) == {d["delivery_id"] for d in log}
    names = sorted(b["envelope"]["event"]["name"] for b in bodies(got))
    assert names == sorted([f"Roles-{i:02d}.pkg" for i in range(N_UPLOADS)] + ["Roles-marker.pkg"])
    verify = documented_verifier()  # any replicator signs with the site's derived secret
    assert all(verify(hook["secret"], r["headers"]["X-ODST-Signature"], r["body"]) for r in got)
    assert all(d["attempts"] == 1 for d in log)
    by = {i: (tmp_path / f"replicator-{i}.log").read_text().count("webhook delivered") for i in range(2)}
    assert sum(by.values()) == N_UPLOADS + 1, by  # each job was done by exactly one replicator


# ---------------------------------------------------------------- SMTP: STARTTLS and a login


USER, PASSWORD = "odst-mailer", "s3cret-pa55"


class Authenticator:
    """aiosmtpd authenticator: records every (mechanism, login, password, over TLS) it is shown."""

    def __init__(self):
        self.seen: list[tuple[str, str, str, bool]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        assert isinstance(auth_data, LoginPassword)
        login, password = auth_data.login.decode(), auth_data.password.decode()
        self.seen.append((mechanism, login, password, session.ssl is not None))
        ok = (login, password) == (USER, PASSWORD)
        return AuthResult(success=ok, handled=False)  # handled=False: the server answers 535 itself


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for IP 127.0.0.1 made with the openssl CLI (no extra Python dependency)."""
    cert, key = tmp_path / "smtp-cert.pem", tmp_path / "smtp-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


class TlsMailbox(Mailbox):
    async def handle_DATA(self, server, session, envelope):
        assert session.ssl is not None and session.authenticated  # refused by the server otherwise
        return await super().handle_DATA(server, session, envelope)


def test_smtp_starttls_and_login(make_site, tmp_path):
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    box, auth = TlsMailbox(), Authenticator()
    controller = Controller(box, hostname="127.0.0.1", port=free_port(), tls_context=tls, require_starttls=True,
                            auth_required=True, auth_require_tls=True, authenticator=auth)
    controller.start()
    try:
        # The mailer verifies the server against smtp_ca_file (else the system CAs).
        base = {**smtp_env(controller.port, digest_s=1), "ODST_SMTP_STARTTLS": "true"}
        trusting = {**base, "ODST_SMTP_CA_FILE": str(cert)}
        good = make_site("good", env={**trusting, "ODST_SMTP_USER": USER, "ODST_SMTP_PASSWORD": PASSWORD,
                                      "ODST_SITE_NAME": "Good"})
        bad = make_site("bad", env={**trusting, "ODST_SMTP_USER": USER, "ODST_SMTP_PASSWORD": "wrong",
                                    "ODST_SITE_NAME": "Bad"})
        untrusted = make_site("untrusted", env={**base, "ODST_SMTP_USER": "untrusting",
                                                "ODST_SMTP_PASSWORD": PASSWORD, "ODST_SITE_NAME": "Untrusted"})
        sites = start_all(good, bad, untrusted)
        for s in sites:
            with s.client() as c:
                r = c.post("/api/v1/email-subscriptions", json={"recipient": f"{s.data.name}@test.invalid",
                                                                "event_types": ["PackageUploaded"]})
                assert r.status_code == 201, r.text
                assert upload_bytes(c, f"{s.data.name}.pkg", b"t" * 500).status_code == 201

        mail = wait_until(lambda: box.to("good@test.invalid"), 30, what="the mail over STARTTLS")
        assert len(mail) == 1 and "good.pkg" in mail[0].get_content()
        assert mail[0]["Subject"].startswith("[ODST Good]")
        good_logins = [s for s in auth.seen if s[1:3] == (USER, PASSWORD)]
        assert good_logins and all(over_tls for *_, over_tls in auth.seen)  # never a login in clear
        assert {m for m, *_ in good_logins} <= {"LOGIN", "PLAIN"}

        # a wrong password: the server refuses, the site logs it, keeps the mail queued, stays up
        wait_until(lambda: any(s[2] == "wrong" for s in auth.seen), 30, what="the wrong password to be tried")
        wait_until(lambda: "SMTPAuthenticationError" in bad.log_path.read_text(), 30, what="the failure logged")
        # an untrusted certificate: refused before any credentials are sent
        wait_until(lambda: "CERTIFICATE_VERIFY_FAILED" in untrusted.log_path.read_text(), 30,
                   what="the untrusted certificate to be refused")
        for s in (bad, untrusted):
            assert s.proc.poll() is None and healthy(s.url)
            queued = ledger_rows(s.data, "SELECT * FROM email_outbox")
            assert [q["recipient"] for q in queued] == [f"{s.data.name}@test.invalid"]
            assert ledger_rows(s.data, "SELECT * FROM email_sent") == []
            assert not box.to(f"{s.data.name}@test.invalid")
        assert not [s for s in auth.seen if s[1] == "untrusting"]  # no credentials to an unverified server
    finally:
        controller.stop()


class RefusingMailbox(Mailbox):
    """Refuses RCPT for addresses starting with "refused" (a mailbox that does not exist)."""

    def __init__(self):
        super().__init__()
        self.refusals = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refused"):
            self.refusals += 1
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_a_refused_recipient_does_not_hold_up_the_others(make_site):
    box = RefusingMailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        site = make_site(env=smtp_env(controller.port, digest_s=1)).start()
        with site.client() as c:
            subs = {}
            for rcpt in ("refused@test.invalid", "zz-ok@test.invalid"):  # the refused one sorts first
                r = c.post("/api/v1/email-subscriptions", json={"recipient": rcpt, "event_types": ["PackageUploaded"]})
                assert r.status_code == 201, r.text
                subs[rcpt] = r.json()["subscription_id"]
            assert upload_bytes(c, "First.pkg", b"1" * 100).status_code == 201
            wait_until(lambda: box.to("zz-ok@test.invalid"), 30, what="the good recipient's mail")
            wait_until(lambda: "SMTPRecipientsRefused" in site.log_path.read_text(), 10, what="the refusal logged")
            # the mailer records a mail as sent just after the server took it: wait for that
            wait_until(lambda: [q["recipient"] for q in ledger_rows(site.data, "SELECT * FROM email_outbox")]
                       == ["refused@test.invalid"], 10, what="only the refused recipient's mail to stay queued")

            # the refused address backs off on its own: a later event still reaches the good one promptly
            assert upload_bytes(c, "Second.pkg", b"2" * 100).status_code == 201
            wait_until(lambda: len(box.to("zz-ok@test.invalid")) == 2, 15, what="the good recipient's second mail")
            assert "Second.pkg" in box.to("zz-ok@test.invalid")[1].get_content()

            # unsubscribing the dead address drops what was queued for it: no retries for ever
            assert c.delete(f"/api/v1/email-subscriptions/{subs['refused@test.invalid']}").status_code == 200
            wait_until(lambda: not ledger_rows(site.data, "SELECT * FROM email_outbox"), 15,
                       what="the unsubscribed recipient's queue to be dropped")
        assert site.proc.poll() is None
    finally:
        controller.stop()


def test_first_start_does_not_skip_events_after_a_subscription(tmp_path):
    """The dispatcher's first cursor: "now", unless a live subscription is older (events after
    it may have been folded by the projector before the dispatcher started: the roles race)."""
    from odst.notify.dispatcher import first_cursor
    from odst.projections.db import connect, migrate
    db = connect(tmp_path / "read-model.sqlite")
    migrate(db)

    def event(type_: str) -> int:
        n = db.execute("SELECT count(*) FROM events").fetchone()[0] + 1
        return db.execute("INSERT INTO events(id, stream, stream_seq, subject, origin, seq, type, ts, actor, payload)"
                          " VALUES (?, 'EVENTS', ?, 'odst.s.ev', 's', ?, ?, 0, 'admin', x'')",
                          (f"e{n}", n, n, type_)).lastrowid

    event("SiteFounded")
    assert first_cursor(db) == 1  # no subscription: from now on
    sub = event("WebhookSubscribed")
    db.execute("INSERT INTO webhooks(webhook_id, url, event_types, event_id, created_at, created_by)"
               " VALUES ('wh_1', 'http://x/', '[\"PackageUploaded\"]', ?, 0, 'admin')", (f"e{sub}",))
    event("PackageUploaded")
    event("PackageUploaded")
    assert first_cursor(db) == sub  # both uploads are still to be fanned out
    mail = event("EmailSubscribed")
    db.execute("INSERT INTO email_subscriptions(subscription_id, recipient, event_types, event_id, created_at,"
               " created_by) VALUES ('em_1', 'a@x', '[\"PackageUploaded\"]', ?, 0, 'admin')", (f"e{mail}",))
    db.execute("UPDATE webhooks SET removed_at=1")
    event("PackageUploaded")
    assert first_cursor(db) == mail  # a removed webhook holds nothing back
    db.close()


# ---------------------------------------------------------------- pruning the ledger


DAY_MS = 86_400_000


def test_ledger_prunes_old_finished_rows_only(tmp_path):
    ledger = Ledger(tmp_path)
    now = now_ms()
    old, recent = now - RETAIN_MS - DAY_MS, now - DAY_MS
    rows = {  # delivery id: (status, when it last happened)
        "old-delivered": ("delivered", old), "old-failed": ("failed", old), "old-cancelled": ("cancelled", old),
        "old-pending": ("pending", old), "old-retrying": ("retrying", old),
        "new-delivered": ("delivered", recent), "new-failed": ("failed", recent), "new-pending": ("pending", now),
    }
    for did, (status, at) in rows.items():
        ledger.queued(did, "wh_1", f"ev-{did}", "PackageUploaded")
        if status != "pending":
            ledger.attempted(did, status=status, attempts=1, http_status=204 if status == "delivered" else 500,
                             error="" if status == "delivered" else "HTTP 500")
        ledger.conn.execute("UPDATE deliveries SET created_at=?, last_attempt_at=?,"
                            " delivered_at=CASE WHEN delivered_at IS NULL THEN NULL ELSE ? END"
                            " WHERE delivery_id=?", (at - 1000, at, at, did))
    # a delivery created long ago but delivered recently (after many retries) is recent
    ledger.queued("old-but-just-delivered", "wh_1", "ev-x", "PackageUploaded")
    ledger.attempted("old-but-just-delivered", status="delivered", attempts=9, http_status=204, error="")
    ledger.conn.execute("UPDATE deliveries SET created_at=? WHERE delivery_id='old-but-just-delivered'", (old,))
    ledger.enqueue_mail("a@test.invalid", "ev-old", "PackageUploaded", {"type": "PackageUploaded"})
    ledger.conn.execute("UPDATE email_outbox SET created_at=?", (old,))  # unsent mail is work still to do
    ledger.mail_sent("b@test.invalid", [], "old digest")
    ledger.mail_sent("b@test.invalid", [], "new digest")
    ledger.conn.execute("UPDATE email_sent SET sent_at=? WHERE subject='old digest'", (old,))
    ledger.close()

    ledger = Ledger(tmp_path)  # a real file, reopened: what the site process sees
    pruner = Pruner(ledger, every_s=0.05)

    async def run():
        await pruner.start()
        try:
            await until(lambda: len(ledger_rows(tmp_path, "SELECT * FROM deliveries")) == 6, 10, what="six deliveries in the ledger")
        finally:
            await pruner.stop()
    asyncio.run(run())

    left = {r["delivery_id"] for r in ledger_rows(tmp_path, "SELECT * FROM deliveries")}
    assert left == {"old-pending", "old-retrying", "new-delivered", "new-failed", "new-pending",
                    "old-but-just-delivered"}
    assert [r["event_key"] for r in ledger_rows(tmp_path, "SELECT * FROM email_outbox")] == ["ev-old"]
    assert [r["subject"] for r in ledger_rows(tmp_path, "SELECT * FROM email_sent")] == ["new digest"]
    assert ledger.prune(now_ms() - RETAIN_MS) == 0  # idempotent
    ledger.close()


def test_ledger_prunes_in_batches(tmp_path):
    ledger = Ledger(tmp_path)
    old = now_ms() - RETAIN_MS - DAY_MS
    ledger.conn.executemany(
        "INSERT INTO deliveries(delivery_id, webhook_id, event_key, type, status, attempts, created_at,"
        " delivered_at) VALUES (?, 'wh_1', ?, 'PackageUploaded', 'delivered', 1, ?, ?)",
        [(f"d{i}", f"e{i}", old, old) for i in range(12_345)])
    assert asyncio.run(Pruner(ledger).prune_once()) == 12_345
    assert ledger.conn.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 0
    ledger.close()
