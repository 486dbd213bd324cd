"""Webhook delivery workers: one durable JetStream pull consumer shared by every replicator.

Each job on NOTIFY is taken by one worker (the durable consumer is the queue);
success acks it, a failure naks it with an exponential delay
(``webhook_backoff_s`` · 2^(attempt-1), at most 300 s), and after
``webhook_max_attempts`` it is terminated and marked failed. A worker that dies
mid-delivery leaves the job unacked: JetStream redelivers it after ``ACK_WAIT_S``,
to this process after a restart or to another replicator. Every attempt is
written to the ledger (the delivery log of ``GET /api/v1/webhooks/{id}/deliveries``).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import aiohttp
import structlog
from nats.js import api

from odst import __version__, tasks
from odst.bus.service import consume
from odst.bus.streams import ensure_stream
from odst.config import Settings
from odst.events.signing import SiteKey
from odst.notify.dispatcher import NOTIFY_STREAM, notify_stream_config
from odst.notify.ledger import Ledger, now_ms
from odst.notify.signing import DELIVERY_HEADER, SIGNATURE_HEADER, backoff_s, sign
from odst.projections import views

log = structlog.get_logger("odst.notify")

DURABLE = "webhooks"
ACK_WAIT_S = 30.0
TIMEOUT_S = 10.0  # per attempt; below ACK_WAIT_S so a live worker never loses its job
WORKERS = 4


def webhook_secret(key: SiteKey, webhook_id: str) -> str:
    """HMAC-SHA256(site seed, "odst.webhook." + id), as hex (see notify.signing)."""
    return key.derive(b"odst.webhook." + webhook_id.encode("utf-8")).hex()


class WebhookSender:
    def __init__(self, *, site_id: str, key: SiteKey, js, reader: sqlite3.Connection, settings: Settings,
                 replicas: int, ledger: Ledger):
        self.site_id, self.key, self.js, self.reader = site_id, key, js, reader
        self.settings, self.replicas = settings, replicas
        self.ledger = ledger
        self.http: aiohttp.ClientSession | None = None
        self._psub = None
        self._workers: list[asyncio.Task] = []

    async def start(self) -> None:
        js, site_id = self.js, self.site_id
        await ensure_stream(js, notify_stream_config(site_id, self.replicas))
        self._psub = await js.pull_subscribe(
            f"odst.{site_id}.notify.webhook.>", durable=DURABLE, stream=NOTIFY_STREAM,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S,
                                      max_deliver=-1, max_ack_pending=1000))
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        self._workers = [asyncio.create_task(self._work(), name=f"webhook-worker-{i}") for i in range(WORKERS)]

    async def stop(self) -> None:
        await tasks.cancel(*self._workers)
        if self.http is not None:
            await self.http.close()

    async def _work(self) -> None:
        await consume(self._psub, self.deliver, "webhook delivery")  # a crash: JetStream redelivers

    async def deliver(self, msg) -> None:
        job = json.loads(msg.data)
        did, hook_id = job["delivery_id"], job["webhook_id"]
        attempt = msg.metadata.num_delivered
        hook = views.webhook(self.reader, hook_id)
        if hook is None or hook.removed_at is not None:
            self.ledger.attempted(did, status="cancelled", attempts=attempt - 1, http_status=None,
                                  error="webhook removed")
            await msg.term()
            return
        item = job["item"]
        body = {"delivery_id": did, "webhook_id": hook_id, "site": self.site_id, "type": job["type"],
                "delivered_at": now_ms(), "attempt": attempt}
        if job["type"] == "MessageQuarantined":
            body["quarantine"] = item
        elif job["type"] == "LogAlert":
            body["alert"] = item
        else:
            body |= {"origin": item["origin"], "envelope": item["envelope"], "signed": item["signed"]}
        raw = json.dumps(body, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"odst/{__version__}",
                   SIGNATURE_HEADER: sign(webhook_secret(self.key, hook_id), raw),
                   DELIVERY_HEADER: did, "X-ODST-Event": job["type"]}
        status, error = None, ""
        try:
            async with self.http.post(hook.url, data=raw, headers=headers, allow_redirects=False) as r:
                status = r.status
                if not 200 <= status < 300:
                    error = f"HTTP {status}: {(await r.text(errors='replace'))[:200]}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        max_attempts = self.settings.webhook_max_attempts
        if not error:
            self.ledger.attempted(did, status="delivered", attempts=attempt, http_status=status, error="")
            await msg.ack()
            log.info("webhook delivered", webhook=hook_id, delivery=did, type=job["type"], attempt=attempt)
        elif attempt >= max_attempts:
            self.ledger.attempted(did, status="failed", attempts=attempt, http_status=status, error=error)
            await msg.term()
            log.warning("webhook delivery given up", webhook=hook_id, delivery=did, attempts=attempt,
                        error=error)
        else:
            delay = backoff_s(attempt, self.settings.webhook_backoff_s)
            self.ledger.attempted(did, status="retrying", attempts=attempt, http_status=status, error=error)
            await msg.nak(delay=delay)
            log.info("webhook delivery failed; will retry", webhook=hook_id, delivery=did, attempt=attempt,
                     retry_in_s=delay, error=error)
