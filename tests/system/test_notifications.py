"""Notifications against real parts: `odst serve`, an HTTP receiver and an SMTP server on 127.0.0.1."""

from __future__ import annotations

import email
import email.policy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from tests.conftest import all_events, free_port, upload_bytes, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
FAST_RETRY = {"ODST_WEBHOOK_BACKOFF_S": "0.3", "ODST_WEBHOOK_MAX_ATTEMPTS": "20"}


def documented_verifier():
    """The verification snippet exactly as README's Webhooks section shows it."""
    text = README.read_text()
    section = text[text.index("### Webhooks"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md#webhooks", "exec"), namespace)
    return namespace["verify_odst_webhook"]


class Receiver:
    """A webhook receiver in a thread: answers 500 to the first ``fail_first`` requests
    (or to all while ``failing``), 204 after; records every request."""

    def __init__(self, fail_first: int = 0, failing: bool = False):
        self.fail_first = fail_first
        self.failing = failing
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with receiver.lock:
                    n = len(receiver.requests)
                    ok = not receiver.failing and n >= receiver.fail_first
                    receiver.requests.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                              "ok": ok})
                self.send_response(204 if ok else 500)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def got(self, path: str | None = None, ok: bool | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.requests if (path is None or r["path"] == path)
                    and (ok is None or r["ok"] == ok)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def subscribe(client, url: str, types: list[str]) -> dict:
    r = client.post("/api/v1/webhooks", json={"url": url, "event_types": types})
    assert r.status_code == 201, r.text
    return r.json()


def deliveries(client, webhook_id: str) -> list[dict]:
    r = client.get(f"/api/v1/webhooks/{webhook_id}/deliveries")
    assert r.status_code == 200, r.text
    return r.json()["deliveries"]


def test_webhooks_are_signed_typed_and_logged(make_site, receiver):
    site = make_site(env=FAST_RETRY).start()
    verify = documented_verifier()
    with site.client() as c:
        both = subscribe(c, receiver.url("/both"), ["PackageUploaded", "PackageDeleted"])
        deletes = subscribe(c, receiver.url("/deletes"), ["PackageDeleted"])
        assert both["secret"] and both["secret"] != deletes["secret"]
        listed = c.get("/api/v1/webhooks").json()["webhooks"]
        assert {w["webhook_id"] for w in listed} == {both["webhook_id"], deletes["webhook_id"]}
        assert all("secret" not in w for w in listed)  # shown once, on creation only
        subscribed = [e for e in all_events(c) if e["type"] == "WebhookSubscribed"]
        assert len(subscribed) == 2 and both["secret"] not in json.dumps(subscribed)

        assert upload_bytes(c, "Hooked.pkg", b"x" * 5000).status_code == 201
        assert c.delete("/api/v1/packages/Hooked.pkg").status_code in (200, 204)

        wait_until(lambda: len(receiver.got("/both", ok=True)) == 2 and receiver.got("/deletes", ok=True),
                   30, what="webhook deliveries")
        for r in receiver.got():
            secret = both["secret"] if r["path"] == "/both" else deletes["secret"]
            assert verify(secret, r["headers"]["X-ODST-Signature"], r["body"])
            assert not verify(secret, r["headers"]["X-ODST-Signature"], r["body"] + b" ")
            assert not verify(deletes["secret"] if secret == both["secret"] else both["secret"],
                              r["headers"]["X-ODST-Signature"], r["body"])
            body = json.loads(r["body"])
            assert body["delivery_id"] == r["headers"]["X-ODST-Delivery"]
            assert body["type"] == r["headers"]["X-ODST-Event"] == body["envelope"]["event"]["type"]
            assert body["site"] == body["origin"] and body["delivered_at"] > 0
            assert body["envelope"]["event"]["name"] == "Hooked.pkg"
        assert sorted(json.loads(r["body"])["type"] for r in receiver.got("/both")) == \
            ["PackageDeleted", "PackageUploaded"]
        assert [json.loads(r["body"])["type"] for r in receiver.got("/deletes")] == ["PackageDeleted"]

        # an old timestamp is refused by the documented check (replay)
        old = receiver.got("/deletes")[0]
        t = int(old["headers"]["X-ODST-Signature"].split(",")[0][2:]) - 3600
        import hashlib, hmac
        mac = hmac.new(deletes["secret"].encode(), f"{t}.".encode() + old["body"], hashlib.sha256).hexdigest()
        assert not verify(deletes["secret"], f"t={t},v1={mac}", old["body"])

        log = wait_until(lambda: [d for d in deliveries(c, both["webhook_id"]) if d["status"] == "delivered"]
                         if len(deliveries(c, both["webhook_id"])) == 2 else None, 10, what="delivery log")
        assert all(d["attempts"] == 1 and d["last_status"] == 204 and d["last_error"] == "" for d in log)

        assert c.delete(f"/api/v1/webhooks/{both['webhook_id']}").status_code == 200
        assert [w["webhook_id"] for w in c.get("/api/v1/webhooks").json()["webhooks"]] == [deletes["webhook_id"]]
        assert c.delete(f"/api/v1/webhooks/{both['webhook_id']}").status_code == 404


def test_webhook_api_refuses_bad_input(site):
    with site.client() as c:
        for body in ({"url": "ftp://x/y", "event_types": ["PackageUploaded"]},
                     {"url": "http://127.0.0.1:9/", "event_types": []},
                     {"url": "http://127.0.0.1:9/", "event_types": ["Nope"]},
                     {"url": "http://127.0.0.1:9/"}):
            r = c.post("/api/v1/webhooks", json=body)
            assert r.status_code == 400, (body, r.text)
        r = c.post("/api/v1/email-subscriptions", json={"recipient": "not-an-address",
                                                        "event_types": ["PackageUploaded"]})
        assert r.status_code == 400
        assert c.get("/api/v1/webhooks/wh_nope/deliveries").status_code == 404
        op = c.post("/api/v1/tokens", json={"name": "op", "role": "operator"}).json()["token"]
    with site.client(token=op) as c:
        assert c.get("/api/v1/webhooks").status_code == 403
        assert c.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/",
                                                "event_types": ["PackageUploaded"]}).status_code == 403


def test_failing_receiver_is_retried_until_it_answers(make_site):
    receiver = Receiver(fail_first=2)
    try:
        site = make_site(env=FAST_RETRY).start()
        with site.client() as c:
            hook = subscribe(c, receiver.url(), ["PackageUploaded"])
            assert upload_bytes(c, "Retry.pkg", b"r" * 100).status_code == 201
            done = wait_until(lambda: [d for d in deliveries(c, hook["webhook_id"]) if d["status"] == "delivered"],
                              30, what="delivery after two failures")
        assert done[0]["attempts"] == 3 and done[0]["last_status"] == 204
        got = receiver.got()
        assert [r["ok"] for r in got] == [False, False, True]
        assert len({r["headers"]["X-ODST-Delivery"] for r in got}) == 1  # one delivery, three attempts
        assert [json.loads(r["body"])["attempt"] for r in got] == [1, 2, 3]
    finally:
        receiver.close()


def test_pending_delivery_survives_a_restart(make_site):
    receiver = Receiver(failing=True)
    try:
        site = make_site(env={"ODST_WEBHOOK_BACKOFF_S": "1", "ODST_WEBHOOK_MAX_ATTEMPTS": "50"}).start()
        with site.client() as c:
            hook = subscribe(c, receiver.url(), ["PackageUploaded"])
            assert upload_bytes(c, "Durable.pkg", b"d" * 100).status_code == 201
            wait_until(lambda: [d for d in deliveries(c, hook["webhook_id"])
                                if d["status"] == "retrying" and d["attempts"] >= 1], 30, what="a failed attempt")
        assert site.stop() == 0
        receiver.failing = False
        site.start()
        with site.client() as c:
            done = wait_until(lambda: [d for d in deliveries(c, hook["webhook_id"]) if d["status"] == "delivered"],
                              90, what="delivery after the restart")
        assert done[0]["attempts"] >= 2
        ok = receiver.got(ok=True)
        assert len(ok) == 1 and json.loads(ok[0]["body"])["envelope"]["event"]["name"] == "Durable.pkg"
    finally:
        receiver.close()


class Mailbox:
    def __init__(self):
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), msg))
        return "250 OK"

    def to(self, rcpt: str) -> list:
        return [m for rcpts, m in self.messages if rcpt in rcpts]


@pytest.fixture
def smtp():
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, box
    controller.stop()


def test_email_digest_is_one_mail_for_twenty_uploads(make_site, smtp):
    controller, box = smtp
    site = make_site(env={"ODST_SMTP_HOST": "127.0.0.1", "ODST_SMTP_PORT": str(controller.port),
                          "ODST_SMTP_FROM": "odst@test.invalid", "ODST_NOTIFY_EMAIL_DIGEST_S": "8",
                          "ODST_SITE_NAME": "Mailroom"}).start()
    with site.client() as c:
        r = c.post("/api/v1/email-subscriptions", json={"recipient": "uploads@test.invalid",
                                                        "event_types": ["PackageUploaded"]})
        assert r.status_code == 201, r.text
        r = c.post("/api/v1/email-subscriptions", json={"recipient": "deletes@test.invalid",
                                                        "event_types": ["PackageDeleted"]})
        assert r.status_code == 201, r.text
        listed = c.get("/api/v1/email-subscriptions").json()
        assert listed["smtp_configured"] and len(listed["subscriptions"]) == 2
        for i in range(20):
            assert upload_bytes(c, f"Digest-{i:02d}.pkg", bytes([i]) * 1000).status_code == 201
        mails = wait_until(lambda: box.to("uploads@test.invalid"), 60, what="the digest mail")
        assert len(mails) == 1
        mail = mails[0]
        assert mail["From"] == "odst@test.invalid" and "20 events" in mail["Subject"]
        text = mail.get_content()
        assert all(f"Digest-{i:02d}.pkg" in text for i in range(20))
        assert not box.to("deletes@test.invalid")  # nothing it subscribed to happened yet

        assert c.delete("/api/v1/packages/Digest-00.pkg").status_code in (200, 204)
        deleted = wait_until(lambda: box.to("deletes@test.invalid"), 60, what="the delete digest")
        assert len(deleted) == 1 and "1 event:" in deleted[0]["Subject"] and "PackageDeleted" in deleted[0]["Subject"]
        assert len(box.to("uploads@test.invalid")) == 1  # not subscribed to deletes

        sub = listed["subscriptions"][0]["subscription_id"]
        assert c.delete(f"/api/v1/email-subscriptions/{sub}").status_code == 200
        assert len(c.get("/api/v1/email-subscriptions").json()["subscriptions"]) == 1


def test_quarantined_message_is_a_webhook(make_site, receiver):
    from tests.system.test_audit import publish
    site = make_site(env=FAST_RETRY).start()
    with site.client() as c:
        hook = subscribe(c, receiver.url(), ["MessageQuarantined"])
        site_id = c.get("/api/v1/site").json()["site"]
        seq = publish(site.data, f"odst.{site_id}.ev.PackageUploaded", b"not signed at all")
        got = wait_until(lambda: receiver.got(ok=True), 30, what="the quarantine webhook")
    body = json.loads(got[0]["body"])
    assert documented_verifier()(hook["secret"], got[0]["headers"]["X-ODST-Signature"], got[0]["body"])
    assert body["type"] == "MessageQuarantined" and body["quarantine"]["stream_seq"] == seq
    assert body["quarantine"]["kind"] == "quarantined" and "envelope" not in body
