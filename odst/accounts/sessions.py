"""Web UI sessions and the sign-in failure counts, in ``<data>/sessions.sqlite``.

Local state, not events: a session is a bearer secret of one browser, and every
gateway process of the site shares this file (WAL). Only the SHA-256 of a
session id is stored, so a copy of the file signs no one in.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
  id_sha256    TEXT PRIMARY KEY,
  username     TEXT NOT NULL,
  role         TEXT NOT NULL,
  source       TEXT NOT NULL,          -- local | ldap
  display_name TEXT NOT NULL,
  csrf         TEXT NOT NULL,
  created_at   REAL NOT NULL,
  last_seen    REAL NOT NULL,
  expires_at   REAL NOT NULL,          -- absolute end (session_max_s after sign-in)
  address      TEXT NOT NULL,
  user_agent   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(username);
CREATE TABLE IF NOT EXISTS signin_failures (
  scope TEXT NOT NULL,                 -- user | address
  key   TEXT NOT NULL,
  ts    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS signin_failures_key ON signin_failures(scope, key, ts);
"""

TOUCH_EVERY_S = 30.0  # last_seen is written at most this often per session


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Session:
    username: str
    role: str
    source: str
    display_name: str
    csrf: str
    created_at: float
    last_seen: float
    expires_at: float

    def ends_at(self, idle_s: int) -> float:
        return min(self.expires_at, self.last_seen + idle_s)


class SessionStore:
    def __init__(self, path: Path, *, idle_s: int, max_s: int):
        self.path = Path(path)
        self.idle_s = idle_s
        self.max_s = max_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        self.path.chmod(0o600)

    def close(self) -> None:
        self.conn.close()

    # sessions

    def create(self, *, username: str, role: str, source: str, display_name: str, address: str,
               user_agent: str, now: float | None = None) -> tuple[str, Session]:
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        s = Session(username=username, role=role, source=source, display_name=display_name,
                    csrf=secrets.token_urlsafe(32), created_at=now, last_seen=now,
                    expires_at=now + self.max_s)
        self.conn.execute(
            "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (_digest(session_id), s.username, s.role, s.source, s.display_name, s.csrf, s.created_at,
             s.last_seen, s.expires_at, address[:100], user_agent[:300]))
        self._expire(now)
        return session_id, s

    def get(self, session_id: str, now: float | None = None) -> Session | None:
        """The live session for this id, or None (unknown, signed out, idle too long, too old)."""
        if not session_id or len(session_id) > 200:
            return None
        now = time.time() if now is None else now
        row = self.conn.execute("SELECT * FROM sessions WHERE id_sha256=?", (_digest(session_id),)).fetchone()
        if row is None:
            return None
        s = Session(**{k: row[k] for k in Session.__dataclass_fields__})
        if now >= s.ends_at(self.idle_s):
            self.conn.execute("DELETE FROM sessions WHERE id_sha256=?", (_digest(session_id),))
            return None
        if now - s.last_seen >= TOUCH_EVERY_S:
            self.conn.execute("UPDATE sessions SET last_seen=? WHERE id_sha256=?", (now, _digest(session_id)))
            s = Session(**{**s.__dict__, "last_seen": now})
        return s

    def delete(self, session_id: str) -> None:
        self.conn.execute("DELETE FROM sessions WHERE id_sha256=?", (_digest(session_id),))

    def delete_user(self, username: str, *, before: float | None = None) -> int:
        """End a user's sessions (all, or those signed in before ``before``)."""
        if before is None:
            cur = self.conn.execute("DELETE FROM sessions WHERE username=? COLLATE NOCASE", (username,))
        else:
            cur = self.conn.execute("DELETE FROM sessions WHERE username=? COLLATE NOCASE AND created_at<?",
                                    (username, before))
        return cur.rowcount

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM sessions").fetchone()[0]

    def _expire(self, now: float) -> None:
        self.conn.execute("DELETE FROM sessions WHERE expires_at<=? OR last_seen<=?", (now, now - self.idle_s))

    # brute-force protection

    def record_failure(self, username: str, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.conn.executemany("INSERT INTO signin_failures(scope, key, ts) VALUES (?,?,?)",
                              [("user", username.lower()[:256], now), ("address", address[:100], now)])

    def retry_after(self, username: str, address: str, *, max_user: int, max_address: int,
                    window_s: int, now: float | None = None) -> int:
        """Seconds until another attempt is allowed for this user name and address (0: now)."""
        now = time.time() if now is None else now
        self.conn.execute("DELETE FROM signin_failures WHERE ts<?", (now - window_s,))
        wait = 0.0
        for scope, key, limit in (("user", username.lower()[:256], max_user), ("address", address[:100], max_address)):
            rows = self.conn.execute(
                "SELECT ts FROM signin_failures WHERE scope=? AND key=? AND ts>=? ORDER BY ts DESC LIMIT ?",
                (scope, key, now - window_s, limit)).fetchall()
            if len(rows) >= limit:  # the limit-th newest failure must leave the window first
                wait = max(wait, rows[-1]["ts"] + window_s - now)
        return int(wait) + 1 if wait > 0 else 0

    def clear_failures(self, username: str) -> None:
        self.conn.execute("DELETE FROM signin_failures WHERE scope='user' AND key=?", (username.lower()[:256],))
