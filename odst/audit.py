"""Replay the log: verify every signature and each site's hash chain, rebuild the read model
from sequence 0 into a fresh file and compare it with the live one. Also ``rebuild``.

Both tell the truth about the streams first (``odst.events.watch.assess``): a stream that is
missing, shorter than the read model's checkpoint, cut at its start, replaced, or a broker
that does not answer, is a violation of the audit, and a reason for ``rebuild`` to refuse
(``--force`` accepts the loss, and says what is lost). Junk in a stream — messages that are
not valid events, which anyone able to publish could have put there — is reported, never
counted as a violation: it cannot be removed from an append-only log, so counting it would
fail every later audit.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nats.errors
import nats.js.errors

from odst.bootstrap import site_broker
from odst.bus import connect, until_ready
from odst.bus.embedded import BrokerError, EmbeddedBroker
from odst.bus.identity import client_seed_path, load_or_create_client_seed, public_key_of_seed, read_seed
from odst.config import Settings
from odst.datadir import DataDirLock, SiteBusy, key_path, read_model_path, running_info
from odst.events.log import EVENTS_STREAM, expected_settings, read_stream
from odst.events.signing import SiteKey
from odst.events.watch import Recorded, assess
from odst.projections import apply, db, views

LISTED = 20  # junk lines shown in the summary; the rest are counted


class AuditError(Exception):
    """The audit could not run (no data directory, no key, broker unreachable)."""


class BrokerUnreachable(AuditError):
    """The site's broker did not answer: the streams cannot be read."""


class RebuildRefused(AuditError):
    """Rebuilding would lose what the read model holds (the log is shorter, or tokens/users vanish)."""


@dataclass
class AuditReport:
    site: str = ""
    events: int = 0
    sites: int = 0
    packages: int = 0
    quarantined: int = 0  # messages signed by their origin that break its chain (violations)
    junk: list[str] = field(default_factory=list)  # not valid events: reported, not violations
    junk_dropped: int = 0  # junk dropped from the bounded quarantine
    violations: list[str] = field(default_factory=list)
    collisions: list[str] = field(default_factory=list)  # names one on a Mac: reported, not violations
    compared: bool = False
    not_compared: str = "not compared"

    def summary(self) -> str:
        differs = any(v.startswith("read model") for v in self.violations)
        lines = [f"site        {self.site}",
                 f"events      {self.events}",
                 f"sites       {self.sites}",
                 f"packages    {self.packages}",
                 f"quarantined {self.quarantined}",
                 f"junk        {len(self.junk) + self.junk_dropped} (not events: reported, not violations)",
                 f"read model  {('DIFFERS' if differs else 'matches the rebuild') if self.compared else self.not_compared}",
                 f"violations  {len(self.violations)}"]
        lines += [f"  - {v}" for v in self.violations]
        if self.collisions:
            lines.append(f"name collisions {len(self.collisions)} (spellings that are one name on a Mac, "
                         "case and Unicode normalisation aside: reported, not merged; delete or rename the "
                         "others)")
            lines += [f"  ! {c}" for c in self.collisions]
        if self.junk or self.junk_dropped:
            lines.append("junk:")
            lines += [f"  ~ {j}" for j in self.junk[:LISTED]]
            more = len(self.junk) - LISTED
            if more > 0:
                lines.append(f"  ~ ... and {more} more (GET /api/v1/quarantine)")
            if self.junk_dropped:
                lines.append(f"  ~ {self.junk_dropped} older junk messages dropped from the bounded quarantine")
        return "\n".join(lines)


class LogAccess:
    """The JetStream of a site's data dir: the running site's broker, or one we start."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.data = Path(settings.data)
        self.broker: EmbeddedBroker | None = None
        self.lock: DataDirLock | None = None
        self.nc = None
        self.url = ""
        self.last_error = ""

    async def __aenter__(self):
        if not key_path(self.data).exists():
            raise AuditError(f"{self.data} is not an ODST data directory (no site.key)")
        self.key = SiteKey.load_or_create(key_path(self.data))
        seed_file = client_seed_path(self.data)
        seed = read_seed(seed_file) if seed_file.exists() else None
        info = running_info(self.data)
        if self.settings.nats:
            self.url = self.settings.nats
        elif info is not None:
            self.url = info.get("nats") or ""
            if not self.url:
                raise BrokerUnreachable("a site is running on this data dir but has not published its broker "
                                        "URL yet")
        else:
            self.lock = DataDirLock(self.data)
            try:
                self.lock.acquire()
            except SiteBusy as exc:  # a site starting or stopping on it right now
                self.lock = None
                raise BrokerUnreachable(str(exc)) from None
            # only the site's own client key may use the broker we start (made now if this data
            # directory lost it, as before `odst recover`)
            seed = load_or_create_client_seed(self.data)
            self.broker = site_broker(self.settings, self.key, private_for=public_key_of_seed(seed))
            try:
                self.url = self.broker.start()
            except BrokerError as exc:
                raise BrokerUnreachable(f"could not start the site's broker: {exc}") from None
        self.running = info is not None
        try:
            self.nc = await connect(self.url, seed=seed, site=self.key.site_id, name="odst-audit", max_reconnect_attempts=3,
                                    error_cb=self._broker_error)
        except (nats.errors.Error, OSError) as exc:
            raise BrokerUnreachable(f"the broker at {self.url} does not answer: {type(exc).__name__}: "
                                    f"{exc}") from None
        self.js = self.nc.jetstream(timeout=10)
        return self

    async def _broker_error(self, exc: Exception) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"  # reported by whoever fails next, not printed

    async def __aexit__(self, *exc):
        if self.nc:
            await self.nc.close()
        if self.broker:
            self.broker.stop()
        if self.lock:
            self.lock.release()

    async def streams(self) -> list[str]:
        """EVENTS (present or not: its absence is for ``assess`` to report) and every peer's mirror."""
        names = [EVENTS_STREAM]
        for s in await until_ready(self.js.streams_info, timeout=60):
            if s.config.name.startswith("PEER_"):
                names.append(s.config.name)
        return names

    def origin_of(self, stream: str) -> str:
        return self.key.site_id if stream == EVENTS_STREAM else stream.removeprefix("PEER_")


async def stream_problems(access: LogAccess, live: sqlite3.Connection | None) -> dict[str, list[str]]:
    """Every stream's problems against what the live read model recorded (or against nothing)."""
    names = set(await access.streams())
    if live is not None:
        names |= {r[0] for r in live.execute("SELECT stream FROM checkpoints")}
    out = {}
    for stream in sorted(names, key=lambda s: (s != EVENTS_STREAM, s)):
        recorded = views.recorded(live, stream, access.origin_of(stream)) if live is not None else Recorded()
        expected = expected_settings(access.key.site_id, 1) if stream == EVENTS_STREAM else None
        if expected is not None:
            try:  # a cluster's replica count is its own business here
                expected["num_replicas"] = (await access.js.stream_info(stream)).config.num_replicas
            except nats.js.errors.NotFoundError:
                pass
        out[stream] = await assess(access.js, stream, recorded, expected)
    return out


async def replay_into(access: LogAccess, target: Path, until: dict[str, int] | None = None) -> apply.ReadModelWriter:
    """Fold every stream from its first message into a fresh read model.

    The site's own stream goes first; a peer's mirror is replayed once the key
    that vouches for it is known, as it was live (a mirror is only created
    after its PeerRegistered was projected). Missing messages are not waited for.
    """
    conn = db.open_read_model(target)
    writer = apply.ReadModelWriter(conn, {access.key.site_id: access.key.public_key})
    pending = await access.streams()
    while pending:
        ready = [s for s in pending if s == EVENTS_STREAM or writer.key_for(s.removeprefix("PEER_"))]
        batch = ready or pending  # whatever is left has no known key: replay it to record that
        for stream in batch:
            pending.remove(stream)
            try:
                state = (await until_ready(lambda: access.js.stream_info(stream), timeout=60)).state
            except nats.js.errors.NotFoundError:
                continue
            end = state.last_seq if until is None else min(until.get(stream, 0), state.last_seq)
            if not state.messages or end < state.first_seq:
                continue
            async for msg in read_stream(access.js, stream, state.first_seq, until_seq=end, idle_timeout=30):
                writer.fold(msg)
            if ready:
                break  # re-evaluate: this stream may vouch for others
    return writer


def _quarantine_report(conn: sqlite3.Connection, report: AuditReport) -> None:
    for q in conn.execute("SELECT stream, stream_seq, reason, violation, kind FROM quarantine ORDER BY 1, 2"):
        line = f"{q['stream']} seq {q['stream_seq']}: {q['reason']}"
        if q["violation"]:
            report.violations.append(line)
            report.quarantined += 1
        else:
            report.junk.append(line)
    report.junk_dropped = conn.execute("SELECT coalesce(sum(messages), 0) FROM quarantine_dropped").fetchone()[0]


def collision_lines(conn: sqlite3.Connection) -> list[str]:
    """One line per name that more than one live spelling stands for (views.name_collisions)."""
    lines = []
    for c in views.name_collisions(conn):
        others = "; ".join(
            f"{o.name!r} ({'same content' if o.same_content else 'other content, blake3 ' + o.blake3[:16]})"
            for o in c.others)
        lines.append(f"{c.kept!r} (blake3 {c.blake3[:16]}) is served; also spelled {others}")
    return lines


async def run_audit(settings: Settings) -> AuditReport:
    """The audit, as a report: what cannot be read is a violation, never an exception
    (only 'this is not a data directory' or a busy data directory raise AuditError)."""
    report = AuditReport()
    data = Path(settings.data)
    if key_path(data).exists():
        report.site = SiteKey.load_or_create(key_path(data)).site_id
    try:
        await _audit(settings, report)
    except BrokerUnreachable as exc:
        report.violations.append(f"streams unreachable: {exc}")
    except (nats.errors.Error, asyncio.TimeoutError) as exc:
        report.violations.append(f"streams unreachable: the broker stopped answering during the audit "
                                 f"({type(exc).__name__}: {exc})")
    return report


async def _audit(settings: Settings, report: AuditReport) -> None:
    async with LogAccess(settings) as access:
        report.site = access.key.site_id
        live_path = read_model_path(access.data)
        live = db.connect(live_path, readonly=True) if live_path.exists() else None
        live_dump = until = None
        try:
            if live is not None:
                live.execute("BEGIN")  # one snapshot: checkpoints and tables agree
                until = {r["stream"]: r["seq"] for r in live.execute("SELECT * FROM checkpoints")}
                live_dump = apply.dump(live)
            problems = await stream_problems(access, live)
        finally:
            if live is not None:
                live.execute("COMMIT")
                live.close()
        damaged = False
        for stream, found in problems.items():
            report.violations += found
            damaged = damaged or bool(found)
        with tempfile.TemporaryDirectory(prefix="odst-audit-") as tmp:
            writer = await replay_into(access, Path(tmp) / "rebuild.sqlite")
            conn = writer.conn
            report.events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            report.sites = conn.execute("SELECT count(*) FROM sites").fetchone()[0]
            report.packages = conn.execute("SELECT count(*) FROM packages").fetchone()[0]
            _quarantine_report(conn, report)
            report.collisions = collision_lines(conn)
            if live_dump is not None and damaged:
                report.not_compared = "not compared (the log is damaged: see the violations)"
            elif live_dump is not None:
                # Compare at the live model's checkpoints: a running site may have moved on.
                full = {r[0]: r[1] for r in conn.execute("SELECT stream, seq FROM checkpoints")}
                rebuilt = apply.dump(conn) if until == full else apply.dump(
                    (await replay_into(access, Path(tmp) / "snapshot.sqlite", until)).conn)
                report.compared = True
                for table in sorted(set(live_dump) | set(rebuilt)):
                    a, b = live_dump.get(table, []), rebuilt.get(table, [])
                    if a != b:
                        report.violations.append(
                            f"read model table {table!r} differs from the rebuild "
                            f"({len(a)} live rows, {len(b)} rebuilt)")
            conn.close()


# --- rebuild -----------------------------------------------------------------------------------

def _principals(conn: sqlite3.Connection, site: str) -> dict[str, str]:
    """Tokens and users that can sign in, and the ones revoked or removed: name -> state."""
    out = {}
    for t in conn.execute("SELECT token_id, name, role, revoked_at FROM tokens WHERE site=?", (site,)):
        out[f"token {t['token_id']} ({t['name']}, {t['role']})"] = "revoked" if t["revoked_at"] else "active"
    for u in conn.execute("SELECT username, role, removed_at FROM users"):
        out[f"user {u['username']} ({u['role']})"] = "removed" if u["removed_at"] else "active"
    return out


def principal_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """What a rebuild would do to who can sign in: lost tokens/users, and revoked ones coming back."""
    changes = []
    for who, state in sorted(before.items()):
        now = after.get(who)
        if state == "active" and now != "active":
            changes.append(f"{who} would be lost")
        elif state != "active" and now == "active":
            changes.append(f"{who} was {state} and would be active again")
    return changes


async def run_rebuild(settings: Settings, *, force: bool = False, notes: list[str] | None = None) -> int:
    """Replace the read model with one rebuilt from the log; return the number of events.

    Refuses (RebuildRefused) when the log is shorter than what the read model folded, or
    has lost its start, or when the rebuild would drop or revive a token or user — unless
    ``force``; what is then accepted is appended to ``notes``.
    """
    notes = notes if notes is not None else []
    data = Path(settings.data)
    if running_info(data) is not None:
        raise AuditError("odst serve is running on this data directory: stop it, then rebuild")
    async with LogAccess(settings) as access:
        target = read_model_path(data)
        old = None
        if target.exists():
            try:
                old = db.connect(target, readonly=True)
                old.execute("SELECT 1 FROM checkpoints LIMIT 1")
            except sqlite3.DatabaseError:  # damaged beyond reading: nothing to protect
                old = None
        try:
            problems = await stream_problems(access, old)
            before = _principals(old, access.key.site_id) if old is not None else {}
        except sqlite3.DatabaseError:
            problems, before = await stream_problems(access, None), {}
        finally:
            if old is not None:
                old.close()
        losses = [p for found in problems.values() for p in found if "configuration changed" not in p]
        if losses and not force:
            raise RebuildRefused(
                "the log is shorter than what the read model holds; a rebuild would lose it:\n"
                + "\n".join(f"  - {p}" for p in losses)
                + "\nrecover the log from a peer (odst recover), or rebuild from what is left with --force")
        notes += [f"accepted: {p}" for p in losses]
        fd, tmp = tempfile.mkstemp(prefix="read-model.", suffix=".rebuild", dir=data)
        os.close(fd)
        os.unlink(tmp)
        writer = None
        try:
            writer = await replay_into(access, Path(tmp))
            count = writer.conn.execute("SELECT count(*) FROM events").fetchone()[0]
            changes = principal_changes(before, _principals(writer.conn, access.key.site_id))
            if changes and not force:
                raise RebuildRefused("the rebuilt read model would change who can sign in:\n"
                                     + "\n".join(f"  - {c}" for c in changes)
                                     + "\nrecover the log from a peer (odst recover), or pass --force")
            notes += [f"accepted: {c}" for c in changes]
            writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            writer.conn.close()
        except BaseException:
            if writer is not None:
                writer.conn.close()
            for suffix in ("", "-wal", "-shm"):
                Path(tmp + suffix).unlink(missing_ok=True)
            raise
        for suffix in ("-wal", "-shm"):
            Path(str(target) + suffix).unlink(missing_ok=True)
        os.replace(tmp, target)
        for suffix in ("-wal", "-shm"):
            Path(tmp + suffix).unlink(missing_ok=True)
        return count

