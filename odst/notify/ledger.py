"""The notification ledger: ``<data>/notify.sqlite`` — delivery log, email outbox, cursors.

Not in the read model on purpose: attempts, errors and what is still to send
are facts about this site's network, not functions of the event log, and the
read model must equal a rebuild from the log (``odst audit``). Every process of
the site (gateway, projector, replicators) shares the data directory, so they
share this file (WAL, busy timeout). Finished deliveries and sent-mail records
older than ``RETAIN_MS`` are pruned (``prune``, run by the site's notifier).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from odst.projections.db import connect

RETAIN_MS = 30 * 86_400_000  # finished deliveries and sent-mail records are kept this long
FINISHED = ("delivered", "failed", "cancelled")  # no attempt will follow: prunable once old
PRUNE_BATCH = 5000  # rows per DELETE, so a big prune never holds the write lock for long

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors (
  name     TEXT PRIMARY KEY,      -- 'events' (read-model position) | 'quarantine' (rowid)
  position INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
  delivery_id     TEXT PRIMARY KEY,
  webhook_id      TEXT NOT NULL,
  event_key       TEXT NOT NULL,  -- event id, or 'quarantine:<stream>:<seq>'
  type            TEXT NOT NULL,
  status          TEXT NOT NULL,  -- pending | retrying | delivered | failed | cancelled
  attempts        INTEGER NOT NULL DEFAULT 0,
  last_status     INTEGER,        -- the receiver's HTTP status
  last_error      TEXT NOT NULL DEFAULT '',
  last_attempt_at INTEGER,        -- unix ms
  created_at      INTEGER NOT NULL,
  delivered_at    INTEGER
);
CREATE INDEX IF NOT EXISTS deliveries_webhook ON deliveries(webhook_id, created_at);
CREATE TABLE IF NOT EXISTS email_outbox (
  recipient  TEXT NOT NULL,
  event_key  TEXT NOT NULL,
  type       TEXT NOT NULL,
  summary    TEXT NOT NULL,       -- JSON: what the digest line says
  created_at INTEGER NOT NULL,    -- unix ms, when queued
  PRIMARY KEY (recipient, event_key)
);
CREATE TABLE IF NOT EXISTS email_sent (
  recipient TEXT NOT NULL,
  sent_at   INTEGER NOT NULL,
  events    INTEGER NOT NULL,
  subject   TEXT NOT NULL
);
"""


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def ledger_path(data: Path) -> Path:
    return Path(data) / "notify.sqlite"


class Ledger:
    def __init__(self, data: Path):
        self.conn: sqlite3.Connection = connect(ledger_path(data))
        self.conn.executescript(SCHEMA)

    def close(self) -> None:
        self.conn.close()

    # ---- cursors
    def cursor(self, name: str) -> int | None:
        row = self.conn.execute("SELECT position FROM cursors WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def set_cursor(self, name: str, position: int) -> None:
        self.conn.execute("INSERT INTO cursors(name, position) VALUES (?,?) ON CONFLICT(name)"
                          " DO UPDATE SET position=excluded.position", (name, position))

    # ---- webhook deliveries
    def queued(self, delivery_id: str, webhook_id: str, event_key: str, type_: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO deliveries(delivery_id, webhook_id, event_key, type, status,"
                          " created_at) VALUES (?,?,?,?,'pending',?)",
                          (delivery_id, webhook_id, event_key, type_, now_ms()))

    def attempted(self, delivery_id: str, *, status: str, attempts: int, http_status: int | None,
                  error: str) -> None:
        at = now_ms()
        self.conn.execute(
            "UPDATE deliveries SET status=?, attempts=max(attempts, ?), last_status=?, last_error=?,"
            " last_attempt_at=?, delivered_at=CASE WHEN ?='delivered' THEN ? ELSE delivered_at END"
            " WHERE delivery_id=?",
            (status, attempts, http_status, error[:1000], at, status, at, delivery_id))

    def deliveries(self, webhook_id: str, limit: int = 100, status: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM deliveries WHERE webhook_id=?", [webhook_id]
        if status:
            sql += " AND status=?"
            args.append(status)
        sql += " ORDER BY created_at DESC, delivery_id LIMIT ?"
        args.append(limit)
        return [dict(r) for r in self.conn.execute(sql, args)]

    def prune(self, older_than_ms: int, limit: int = PRUNE_BATCH) -> int:
        """Delete up to ``limit`` finished deliveries whose last activity is before ``older_than_ms``,
        and sent-mail records as old; return how many rows went. Pending and retrying
        deliveries and the email outbox are never pruned: they are work still to do."""
        marks = ",".join("?" * len(FINISHED))
        gone = self.conn.execute(
            "DELETE FROM deliveries WHERE rowid IN (SELECT rowid FROM deliveries WHERE status IN"
            f" ({marks}) AND coalesce(delivered_at, last_attempt_at, created_at) < ? LIMIT ?)",
            (*FINISHED, older_than_ms, limit)).rowcount
        return gone + self.conn.execute(
            "DELETE FROM email_sent WHERE rowid IN (SELECT rowid FROM email_sent WHERE sent_at < ? LIMIT ?)",
            (older_than_ms, limit)).rowcount

    # ---- email outbox
    def enqueue_mail(self, recipient: str, event_key: str, type_: str, summary: dict) -> None:
        self.conn.execute("INSERT OR IGNORE INTO email_outbox(recipient, event_key, type, summary, created_at)"
                          " VALUES (?,?,?,?,?)", (recipient, event_key, type_, json.dumps(summary), now_ms()))

    def due_recipients(self, older_than_ms: int) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT recipient FROM email_outbox GROUP BY recipient HAVING min(created_at) <= ?"
            " ORDER BY recipient", (older_than_ms,))]

    def pending_mail(self, recipient: str) -> list[dict]:
        return [dict(r) | {"summary": json.loads(r["summary"])} for r in self.conn.execute(
            "SELECT * FROM email_outbox WHERE recipient=? ORDER BY created_at, event_key", (recipient,))]

    def drop_mail(self, recipient: str) -> int:
        """Forget what is queued for a recipient (no longer subscribed); return how many rows went."""
        return self.conn.execute("DELETE FROM email_outbox WHERE recipient=?", (recipient,)).rowcount

    def mail_sent(self, recipient: str, event_keys: list[str], subject: str) -> None:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany("DELETE FROM email_outbox WHERE recipient=? AND event_key=?",
                          [(recipient, k) for k in event_keys])
            c.execute("INSERT INTO email_sent(recipient, sent_at, events, subject) VALUES (?,?,?,?)",
                      (recipient, now_ms(), len(event_keys), subject))
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise
