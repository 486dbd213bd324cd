"""Fold one stored message into the read model: verify, check the chain, apply, checkpoint.

Synchronous and deterministic, shared by the live projector and by ``odst audit``
/ ``odst rebuild``, so a rebuild equals the live read model by construction.
A message that fails any check is quarantined (recorded, never applied); the
checkpoint advances in the same transaction either way.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

import msgspec

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import StoredMessage, site_of_subject
from odst.events.signing import SignatureInvalid


@dataclass(frozen=True, slots=True)
class Outcome:
    applied: bool
    reason: str = ""
    envelope: codec.Envelope | None = None


def subject_name(event: ev.Event) -> str:
    return getattr(event, "name", "") if not isinstance(event, (ev.TokenCreated, ev.TokenRevoked)) \
        else event.token_id


class Folder:
    """Applies messages to one SQLite connection. ``trusted`` maps site id -> public key."""

    def __init__(self, conn: sqlite3.Connection, trusted: dict[str, bytes]):
        self.conn = conn
        self.trusted = dict(trusted)

    def checkpoint(self, stream: str) -> int:
        row = self.conn.execute("SELECT seq FROM checkpoints WHERE stream=?", (stream,)).fetchone()
        return row[0] if row else 0

    def fold(self, msg: StoredMessage) -> Outcome:
        c = self.conn
        c.execute("BEGIN IMMEDIATE")
        try:
            if msg.seq <= self.checkpoint(msg.stream):
                c.execute("ROLLBACK")
                return Outcome(False, "already applied")
            outcome = self._check(msg)
            if outcome.applied:
                self._apply(msg, outcome.envelope)
            else:
                c.execute(
                    "INSERT OR REPLACE INTO quarantine(stream, stream_seq, subject, origin, reason, payload)"
                    " VALUES (?,?,?,?,?,?)",
                    (msg.stream, msg.seq, msg.subject, site_of_subject(msg.subject) or "",
                     outcome.reason, msg.payload))
            c.execute("INSERT INTO checkpoints(stream, seq) VALUES (?,?)"
                      " ON CONFLICT(stream) DO UPDATE SET seq=excluded.seq", (msg.stream, msg.seq))
            c.execute("COMMIT")
            return outcome
        except BaseException:
            c.execute("ROLLBACK")
            raise

    def _check(self, msg: StoredMessage) -> Outcome:
        origin = site_of_subject(msg.subject)
        if origin is None:
            return Outcome(False, f"subject {msg.subject!r} is not an ODST event subject")
        key = self.trusted.get(origin)
        if key is None:
            return Outcome(False, f"unknown site {origin}: no registered key")
        try:
            env = codec.open_signed(msg.payload, key)
        except SignatureInvalid:
            return Outcome(False, f"signature does not verify against {origin}'s key")
        except codec.EnvelopeInvalid as exc:
            return Outcome(False, f"signed but malformed envelope: {exc}")
        if env.origin != origin:
            return Outcome(False, f"envelope origin {env.origin} differs from subject site {origin}")
        row = self.conn.execute("SELECT last_seq, last_hash FROM sites WHERE site=?",
                                (origin,)).fetchone()
        last_seq, last_hash = (row[0], row[1]) if row else (0, codec.GENESIS)
        if env.seq <= last_seq:
            return Outcome(False, f"replayed event: seq {env.seq} already seen from {origin}")
        if env.seq != last_seq + 1:
            return Outcome(False, f"gap in {origin}'s chain: expected seq {last_seq + 1}, got {env.seq}")
        if env.prev != last_hash:
            return Outcome(False, f"fork in {origin}'s chain at seq {env.seq}: prev hash differs")
        if env.seq == 1 and not isinstance(env.event, ev.SiteFounded):
            return Outcome(False, "a site's first event must be SiteFounded")
        if self.conn.execute("SELECT 1 FROM events WHERE id=?", (env.id,)).fetchone():
            return Outcome(False, f"duplicate event id {env.id}")
        return Outcome(True, envelope=env)

    def _apply(self, msg: StoredMessage, env: codec.Envelope) -> None:
        c = self.conn
        e = env.event
        c.execute(
            "INSERT INTO events(id, stream, stream_seq, subject, origin, seq, type, ts, actor,"
            " subject_name, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (env.id, msg.stream, msg.seq, msg.subject, env.origin, env.seq, type(e).__name__,
             env.ts, env.actor, subject_name(e), msg.payload))
        chain = (env.seq, codec.chain_hash(msg.payload), env.ts, env.origin)
        if isinstance(e, ev.SiteFounded):
            c.execute("INSERT INTO sites(site, public_key, name, last_seq, last_hash, last_ts)"
                      " VALUES (?,?,?,?,?,?) ON CONFLICT(site) DO UPDATE SET name=excluded.name,"
                      " last_seq=excluded.last_seq, last_hash=excluded.last_hash, last_ts=excluded.last_ts",
                      (e.site, e.public_key, e.name, *chain[:3]))
        else:
            c.execute("UPDATE sites SET last_seq=?, last_hash=?, last_ts=? WHERE site=?", chain)
        handler = _HANDLERS.get(type(e))
        if handler:
            handler(c, env, e)


def _package_uploaded(c: sqlite3.Connection, env: codec.Envelope, e: ev.PackageUploaded) -> None:
    existing = c.execute("SELECT blake3 FROM packages WHERE name=?", (e.name,)).fetchone()
    if existing and existing[0] == e.blake3:
        pass  # the same content again: nothing changes but availability below
    else:
        c.execute(
            "INSERT INTO packages(name, size, sha1, sha512, blake3, chunk_size, chunks, stage, origin,"
            " uploaded_at, uploaded_by, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(name) DO UPDATE SET size=excluded.size, sha1=excluded.sha1,"
            " sha512=excluded.sha512, blake3=excluded.blake3, chunk_size=excluded.chunk_size,"
            " chunks=excluded.chunks, stage=excluded.stage, origin=excluded.origin,"
            " uploaded_at=excluded.uploaded_at, uploaded_by=excluded.uploaded_by,"
            " updated_at=excluded.updated_at",
            (e.name, e.size, e.sha1, e.sha512, e.blake3, e.chunk_size, json.dumps(e.chunks),
             e.stage, env.origin, env.ts, env.actor, env.ts))
        c.execute("DELETE FROM availability WHERE name=? AND blake3<>?", (e.name, e.blake3))
    c.execute("DELETE FROM tombstones WHERE name=? AND blake3=?", (e.name, e.blake3))
    c.execute("INSERT INTO availability(name, site, blake3, status, detail, updated_at)"
              " VALUES (?,?,?,?,?,?) ON CONFLICT(name, site) DO UPDATE SET blake3=excluded.blake3,"
              " status=excluded.status, detail=excluded.detail, updated_at=excluded.updated_at",
              (e.name, env.origin, e.blake3, "available", "", env.ts))


def _package_staged(c: sqlite3.Connection, env: codec.Envelope, e: ev.PackageStaged) -> None:
    c.execute("UPDATE packages SET stage=?, updated_at=? WHERE name=?", (e.stage, env.ts, e.name))


def _package_deleted(c: sqlite3.Connection, env: codec.Envelope, e: ev.PackageDeleted) -> None:
    c.execute("DELETE FROM packages WHERE name=? AND blake3=?", (e.name, e.blake3))
    c.execute("DELETE FROM availability WHERE name=? AND blake3=?", (e.name, e.blake3))
    c.execute("INSERT OR REPLACE INTO tombstones(name, blake3, origin, deleted_at, deleted_by)"
              " VALUES (?,?,?,?,?)", (e.name, e.blake3, env.origin, env.ts, env.actor))


def _token_created(c: sqlite3.Connection, env: codec.Envelope, e: ev.TokenCreated) -> None:
    c.execute("INSERT OR IGNORE INTO tokens(token_id, name, role, token_sha256, site, created_at,"
              " created_by) VALUES (?,?,?,?,?,?,?)",
              (e.token_id, e.name, e.role, e.token_sha256, env.origin, env.ts, env.actor))


def _token_revoked(c: sqlite3.Connection, env: codec.Envelope, e: ev.TokenRevoked) -> None:
    c.execute("UPDATE tokens SET revoked_at=? WHERE token_id=? AND site=? AND revoked_at IS NULL",
              (env.ts, e.token_id, env.origin))


_HANDLERS = {
    ev.PackageUploaded: _package_uploaded,
    ev.PackageStaged: _package_staged,
    ev.PackageDeleted: _package_deleted,
    ev.TokenCreated: _token_created,
    ev.TokenRevoked: _token_revoked,
}


def dump(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    """Every table's rows in primary-key order: what a rebuild is compared on."""
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    out = {}
    for t in tables:
        out[t] = [tuple(r) for r in conn.execute(f'SELECT * FROM "{t}" ORDER BY 1, 2')]
    return out


def to_json(obj) -> str:
    return msgspec.json.encode(obj).decode()
