"""Web UI sessions and the sign-in failure counts, in ``<data>/sessions.sqlite``.

Local state, not events: a session is a bearer secret of one browser, and every
gateway process of the site shares this file (WAL). Only the SHA-256 of a
session id is stored, so a copy of the file signs no one in.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
import sqlite3
import time
import unicodedata
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
  user_agent   TEXT NOT NULL,
  credential   TEXT NOT NULL DEFAULT '', -- local: fingerprint of the password it signed in with
  checked_at   REAL NOT NULL DEFAULT 0   -- ldap: when the directory last confirmed the role
);
CREATE INDEX IF NOT EXISTS sessions_user ON sessions(username);
CREATE TABLE IF NOT EXISTS signin_failures (
  scope TEXT NOT NULL,                 -- pair (user and address) | user | address
  key   TEXT NOT NULL,
  ts    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS signin_failures_key ON signin_failures(scope, key, ts);
"""

TOUCH_EVERY_S = 30.0  # last_seen is written at most this often per session


USER_WIDE_FACTOR = 10  # a user name is locked for everyone only after this many times the per-address limit


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


def user_key(username: str) -> str:
    """One key for every spelling a directory would accept: "ALICE", "ａlice ", "alice"."""
    return unicodedata.normalize("NFKC", username).strip().casefold()[:256]


def address_key(address: str) -> str:
    """An IPv6 client gets a /64 as a household gets one address; IPv4 stays as it is."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:100]
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


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
    credential: str = ""
    checked_at: float = 0.0

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
               user_agent: str, credential: str = "", now: float | None = None) -> tuple[str, Session]:
        now = time.time() if now is None else now
        session_id = secrets.token_urlsafe(32)
        s = Session(username=username, role=role, source=source, display_name=display_name,
                    csrf=secrets.token_urlsafe(32), created_at=now, last_seen=now,
                    expires_at=now + self.max_s, credential=credential, checked_at=now)
        self.conn.execute(
            "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (_digest(session_id), s.username, s.role, s.source, s.display_name, s.csrf, s.created_at,
             s.last_seen, s.expires_at, address[:100], user_agent[:300], s.credential, s.checked_at))
        self._expire(now)
        return session_id, s

    def get(self, session_id: str, now: float | None = None, *, touch: bool = True) -> Session | None:
        """The live session for this id, or None (unknown, signed out, idle too long, too old).

        ``touch=False`` looks without counting as use (an open event stream re-checking).
        """
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
        if touch and now - s.last_seen >= TOUCH_EVERY_S:
            self.conn.execute("UPDATE sessions SET last_seen=? WHERE id_sha256=?", (now, _digest(session_id)))
            s = Session(**{**s.__dict__, "last_seen": now})
        return s

    def confirmed(self, session_id: str, role: str, now: float | None = None) -> None:
        """The directory confirmed this session's user (and role) just now."""
        self.conn.execute("UPDATE sessions SET role=?, checked_at=? WHERE id_sha256=?",
                          (role, time.time() if now is None else now, _digest(session_id)))

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

    def attempt(self, username: str, address: str, *, max_failures: int, max_address: int, window_s: int,
                now: float | None = None) -> tuple[int, list[int]]:
        """Reserve one sign-in attempt: (0, reservation) or (seconds to wait, []).

        The attempt is counted as a failure *before* the password is checked, in one
        write transaction, so concurrent guesses cannot all slip under the limit; a
        success hands the reservation back (``succeeded``). Limits: ``max_failures`` per
        user name and address, ``max_address`` per address (any names), and
        ``USER_WIDE_FACTOR`` × ``max_failures`` per user name from anywhere, so one
        address cannot lock a user out for everyone.
        """
        now = time.time() if now is None else now
        user, addr = user_key(username), address_key(address)
        keys = (("pair", f"{user}\0{addr}", max_failures), ("address", addr, max_address),
                ("user", user, max_failures * USER_WIDE_FACTOR))
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("DELETE FROM signin_failures WHERE ts<?", (now - window_s,))
            wait = 0.0
            for scope, key, limit in keys:
                rows = self.conn.execute(
                    "SELECT ts FROM signin_failures WHERE scope=? AND key=? ORDER BY ts DESC LIMIT ?",
                    (scope, key, limit)).fetchall()
                if len(rows) >= limit:  # the limit-th newest failure must leave the window first
                    wait = max(wait, rows[-1]["ts"] + window_s - now)
            if wait > 0:
                self.conn.execute("COMMIT")
                return int(wait) + 1, []
            ids = [self.conn.execute("INSERT INTO signin_failures(scope, key, ts) VALUES (?,?,?)",
                                     (scope, key, now)).lastrowid for scope, key, _ in keys]
            self.conn.execute("COMMIT")
            return 0, ids
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    def succeeded(self, username: str, address: str, reservation: list[int]) -> None:
        """A right password: forget this attempt and this address's earlier misses of the name."""
        self.forgive(reservation)
        self.conn.execute("DELETE FROM signin_failures WHERE scope='pair' AND key=?",
                          (f"{user_key(username)}\0{address_key(address)}",))

    def forgive(self, reservation: list[int]) -> None:
        """Not a guess after all (the directory was down): hand the reservation back."""
        if reservation:
            self.conn.execute(f"DELETE FROM signin_failures WHERE rowid IN ({','.join('?' * len(reservation))})",
                              reservation)
