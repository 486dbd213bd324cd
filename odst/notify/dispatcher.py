"""Fan-out: each event folded into the read model → webhook jobs and email outbox rows.

Runs once per site (the projector role). It follows the read model's ``events``
table (this site's EVENTS and every PEER_* mirror, verified) and its
``quarantine`` table by a cursor kept in the ledger. For each subscribed
webhook it queues a job on the work-queue stream NOTIFY with ``Nats-Msg-Id`` =
the delivery id, so a job re-queued after a crash (cursor not yet saved) is
dropped by JetStream's duplicate window; beyond that window a receiver dedupes
on ``X-ODST-Delivery``: delivery is at least once.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3

import msgspec
import structlog
from nats.js import api

from odst import tasks
from odst.bus.streams import ensure_stream
from odst.events.watch import AlertBook
from odst.notify.ledger import Ledger
from odst.notify.signing import delivery_id
from odst.projections import views
from odst.projections.status import ProjectionStatus

log = structlog.get_logger("odst.notify")

QUARANTINED = "MessageQuarantined"
LOG_ALERT = "LogAlert"  # the site's own log was cut, deleted, replaced or reconfigured (odst.events.watch)
NOTIFIABLE = ("PackageUploaded", "PackageAvailable", "PackageTransferFailed", "PackageStaged",
              "PackageDeleted", "PackageDamaged", "PeerRegistered", "PeerRemoved", "PeerLogDiverged",
              "PeerLogRestored", QUARANTINED, LOG_ALERT, "JamfDriftDetected", "JamfDriftCleared", "JamfPackageSynced",
              "PackageReplaced")
# Several packages pulled together are reported in one PackagesAvailable: it goes to those
# who asked for PackageAvailable (delivered as it is, its items each a PackageAvailable).
SUBSCRIBED_AS = {"PackagesAvailable": "PackageAvailable"}
SUMMARY_NAMES = 5  # names a digest line lists of a PackagesAvailable
NOTIFY_STREAM = "NOTIFY"
BATCH = 500
PASS_EVERY_S = 0.2  # at most one fan-out pass this often: a notification waits this long at most


def job_subject(site: str, webhook_id: str) -> str:
    return f"odst.{site}.notify.webhook.{webhook_id}"


def notify_stream_config(site: str, replicas: int) -> api.StreamConfig:
    """The work queue of webhook jobs (made by whichever of dispatcher and sender starts first)."""
    return api.StreamConfig(
        name=NOTIFY_STREAM, subjects=[f"odst.{site}.notify.>"],
        retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE,
        duplicate_window=120.0, max_age=7 * 86400.0, num_replicas=replicas)


def event_item(row) -> dict:
    """A job's item for an event: the event as the API shows it."""
    return msgspec.to_builtins(views.event(row))


def quarantine_item(row) -> dict:
    """A job's item for a quarantined message: as the API's quarantine list shows it."""
    return msgspec.to_builtins(views.quarantined(row))


def summary(type_: str, item: dict) -> dict:
    """One digest line's facts."""
    if type_ == QUARANTINED:
        return {"type": type_, "origin": item["origin"], "name": item["kind"], "detail": item["reason"],
                "ts": None, "actor": ""}
    if type_ == LOG_ALERT:
        return {"type": type_, "origin": "", "name": item["stream"], "detail": item["reason"],
                "ts": item["ts"], "actor": ""}
    event = item["envelope"]["event"]
    detail = event.get("reason") or event.get("stage") or ""
    name = event.get("name") or event.get("site") or ""
    if "items" in event:  # PackagesAvailable
        names = [i["name"] for i in event["items"]]
        more = len(names) - SUMMARY_NAMES
        name = ", ".join(names[:SUMMARY_NAMES]) + (f" and {more} more" if more > 0 else "")
    return {"type": type_, "origin": item["origin"], "name": name, "detail": detail, "ts": item["ts"],
            "actor": item["actor"]}


def first_cursor(reader) -> int:
    """Where a first start begins: now, or at the oldest live subscription if that is earlier.

    The projector folds events before the dispatcher starts (and another process's
    gateway may take a subscription and an upload meanwhile); starting at "now"
    would skip those. Events before a subscription are skipped by ``since`` anyway.
    Read "now" first: a subscription made after it begins after it.
    """
    now = views.last_position(reader)
    sinces = [s.since for table in ("webhooks", "email_subscriptions")
              for s in views.active_subscriptions(reader, table)]
    return min([now, *sinces])


class Dispatcher:
    def __init__(self, *, site_id: str, js, reader: sqlite3.Connection, projection: ProjectionStatus,
                 replicas: int, ledger: Ledger, alerts: AlertBook):
        self.site_id, self.js, self.reader, self.projection = site_id, js, reader, projection
        self.replicas = replicas
        self.ledger = ledger
        self.alerts = alerts
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await ensure_stream(self.js, notify_stream_config(self.site_id, self.replicas))
        reader = self.reader
        if self.ledger.cursor("events") is None:
            self.ledger.set_cursor("events", first_cursor(reader))
        if self.ledger.cursor("quarantine") is None:
            self.ledger.set_cursor("quarantine",
                                   reader.execute("SELECT coalesce(max(rowid), 0) FROM quarantine").fetchone()[0])
        self._task = asyncio.create_task(self._loop(), name="notify-dispatcher")

    async def stop(self) -> None:
        await tasks.cancel(self._task)
        self.alerts.close()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            passed_at = loop.time()
            try:
                while await self.dispatch_once():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("notification fan-out failed; retrying", error=f"{type(exc).__name__}: {exc}")
            await self.projection.wait_changed(2.0)
            # a burst of folds (uploads side by side, a catch-up) is fanned out a batch at a
            # time, at most one pass per PASS_EVERY_S, not one pass (subscriptions read, cursor
            # written) per event
            await asyncio.sleep(max(0.0, passed_at + PASS_EVERY_S - loop.time()))

    async def dispatch_once(self) -> int:
        """Fan out one batch of new events and quarantined messages; return how many were seen."""
        reader = self.reader
        hooks = views.active_subscriptions(reader, "webhooks")
        subs = views.active_subscriptions(reader, "email_subscriptions")
        seen = 0
        cursor = self.ledger.cursor("events") or 0
        passed = None  # the last event position that queued nothing, its cursor not written yet
        try:
            for row in reader.execute("SELECT * FROM events WHERE position > ? ORDER BY position LIMIT ?",
                                      (cursor, BATCH)).fetchall():
                # The cursor is written at once after an event that queued a delivery or mail
                # (never queued twice), and after the others once per batch: a write (a
                # transaction of the shared ledger) per event was a fortieth of a site's CPU in
                # a catch-up, and an event that queued nothing is harmless to look at again.
                if SUBSCRIBED_AS.get(row["type"], row["type"]) in NOTIFIABLE and await self._fan_out(
                        row["type"], row["id"], row["position"], lambda r=row: event_item(r), hooks, subs):
                    self.ledger.set_cursor("events", row["position"])
                    passed = None
                else:
                    passed = row["position"]
                seen += 1
        finally:
            if passed is not None:
                self.ledger.set_cursor("events", passed)
        qcursor = self.ledger.cursor("quarantine") or 0
        for row in reader.execute("SELECT rowid AS rid, * FROM quarantine WHERE rowid > ? ORDER BY rowid"
                                  " LIMIT ?", (qcursor, BATCH)).fetchall():
            key = f"quarantine:{row['stream']}:{row['stream_seq']}"
            await self._fan_out(QUARANTINED, key, None, lambda r=row: quarantine_item(r), hooks, subs)
            self.ledger.set_cursor("quarantine", row["rid"])
            seen += 1
        for row in self.alerts.after(self.ledger.cursor("alerts") or 0, BATCH):
            await self._fan_out(LOG_ALERT, f"alert:{row['id']}", None, lambda r=row: dict(r), hooks, subs)
            self.ledger.set_cursor("alerts", row["id"])
            seen += 1
        return seen

    async def _fan_out(self, type_: str, key: str, position: int | None, item, hooks, subs) -> bool:
        """Queue a delivery per hook and a mail per subscription that wants it; did it queue any?"""
        made = None
        asked_as = SUBSCRIBED_AS.get(type_, type_)
        for hook in hooks:
            if asked_as not in hook.event_types or (position is not None and position <= hook.since):
                continue
            made = made or item()
            did = delivery_id(hook.id, key)
            self.ledger.queued(did, hook.id, key, type_)
            job = {"delivery_id": did, "webhook_id": hook.id, "event_key": key, "type": type_,
                   "item": made}
            await self.js.publish(job_subject(self.site_id, hook.id),
                                       json.dumps(job, separators=(",", ":")).encode(),
                                       stream=NOTIFY_STREAM, headers={"Nats-Msg-Id": did}, timeout=10)
        for sub in subs:
            if asked_as not in sub.event_types or (position is not None and position <= sub.since):
                continue
            made = made or item()
            self.ledger.enqueue_mail(sub.recipient, key, type_, summary(type_, made))
        return made is not None
