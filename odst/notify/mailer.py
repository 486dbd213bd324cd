"""Email digests: every recipient's queued events go out as one mail per digest window.

The outbox (ledger) fills as events are fanned out; once a recipient's oldest
queued event is ``notify_email_digest_s`` old, everything queued for them is
sent in one mail — a 500-package sync is one mail, not 500. Runs once per site
(the projector role). smtplib (stdlib) on a worker thread: a few mails a
minute need no async SMTP client and no extra dependency. A failed send keeps
the outbox and is retried with a growing delay: for the whole mailer when the
server fails (connection, TLS, login), for that recipient alone when the server
refuses the address, so one dead address never holds up the others. What is
queued for a recipient no longer subscribed is dropped.
"""

from __future__ import annotations

import asyncio
import smtplib
import sqlite3
import ssl
import time
from collections import Counter
from datetime import datetime, timezone
from email.message import EmailMessage

import structlog

from odst import tasks
from odst.config import Settings
from odst.notify.ledger import Ledger, now_ms
from odst.projections import views

log = structlog.get_logger("odst.notify")

RETRY_MAX_S = 600.0


def compose(*, site: str, site_name: str, sender: str, recipient: str, items: list[dict]) -> EmailMessage:
    counts = Counter(i["type"] for i in items)
    what = ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = recipient
    msg["Subject"] = f"[ODST {site_name or site}] {len(items)} event{'s' if len(items) != 1 else ''}: {what}"
    lines = [f"ODST site {site_name + ' ' if site_name else ''}({site}): {len(items)} events.", ""]
    for i in items:
        s = i["summary"]
        when = (datetime.fromtimestamp(s["ts"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
                if s.get("ts") else "")
        parts = [when, s["type"], s.get("name", ""), f"at {s['origin']}" if s.get("origin") else "",
                 s.get("detail", ""), f"by {s['actor']}" if s.get("actor") else ""]
        lines.append("  ".join(p for p in parts if p))
    msg.set_content("\n".join(lines) + "\n")
    return msg


class Mailer:
    def __init__(self, *, site_id: str, reader: sqlite3.Connection, settings: Settings, ledger: Ledger):
        self.site_id, self.reader = site_id, reader
        self.ledger = ledger
        self.settings = settings
        self._task: asyncio.Task | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._warned = False
        self._held: dict[str, tuple[int, float]] = {}  # refused recipient -> (failures, retry at)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="notify-mailer")

    async def stop(self) -> None:
        await tasks.cancel(self._task)

    async def _loop(self) -> None:
        tick = min(5.0, max(0.5, self.settings.notify_email_digest_s / 4))
        while True:
            try:
                await self.send_due()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failures += 1
                delay = min(RETRY_MAX_S, 5.0 * 2 ** (self._failures - 1))
                self._retry_at = time.monotonic() + delay
                log.warning("digest mail failed; will retry", error=f"{type(exc).__name__}: {exc}",
                            retry_in_s=delay)
            await asyncio.sleep(tick)  # a timer: digests are due by the clock, not by an event

    async def send_due(self) -> int:
        if time.monotonic() < self._retry_at:
            return 0
        due = self.ledger.due_recipients(now_ms() - self.settings.notify_email_digest_s * 1000)
        if due and not self.settings.smtp_host:
            if not self._warned:
                log.warning("email subscriptions have events to send but smtp_host is not set")
                self._warned = True
            return 0
        live = {sub.recipient for sub in views.email_subscriptions(self.reader)} if due else set()
        sent = 0
        for recipient in due:
            if recipient not in live:
                dropped = self.ledger.drop_mail(recipient)
                self._held.pop(recipient, None)
                log.info("digest dropped: recipient no longer subscribed", recipient=recipient, events=dropped)
                continue
            failures, retry_at = self._held.get(recipient, (0, 0.0))
            if time.monotonic() < retry_at:
                continue
            items = self.ledger.pending_mail(recipient)
            if not items:
                continue
            msg = compose(site=self.site_id, site_name=views.site_name(self.reader, self.site_id, self.settings),
                          sender=self.settings.smtp_from, recipient=recipient, items=items)
            try:
                await asyncio.to_thread(self._send, msg)
            except smtplib.SMTPRecipientsRefused as exc:  # this address only: go on with the others
                delay = min(RETRY_MAX_S, 5.0 * 2 ** failures)
                self._held[recipient] = (failures + 1, time.monotonic() + delay)
                log.warning("digest mail refused for this recipient; will retry", recipient=recipient,
                            error=f"{type(exc).__name__}: {exc}", retry_in_s=delay)
                continue
            self.ledger.mail_sent(recipient, [i["event_key"] for i in items], msg["Subject"])
            log.info("digest mail sent", recipient=recipient, events=len(items))
            self._held.pop(recipient, None)
            self._failures = 0
            sent += 1
        return sent

    def _send(self, msg: EmailMessage) -> None:
        s = self.settings
        with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=30) as smtp:
            if s.smtp_starttls:
                smtp.starttls(context=ssl.create_default_context(cafile=self.settings.smtp_ca_file or None))
            if s.smtp_user:
                smtp.login(s.smtp_user, s.smtp_password)
            smtp.send_message(msg)
