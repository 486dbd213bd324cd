"""Replay the log: verify every signature and each site's hash chain, rebuild the read model
from sequence 0 into a fresh file and compare it with the live one. Also ``rebuild``."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nats

from odst.bus import server_list, until_ready
from odst.bus.embedded import BrokerConfig, EmbeddedBroker
from odst.config import Settings
from odst.events.log import EVENTS_STREAM, last_seq, read_stream
from odst.events.signing import SiteKey
from odst.projections import apply, db
from odst.site import DataDirLock, key_path, read_model_path, run_dir, running_info


class AuditError(Exception):
    """The audit could not run (no data directory, no key, broker unreachable)."""


@dataclass
class AuditReport:
    site: str = ""
    events: int = 0
    sites: int = 0
    packages: int = 0
    quarantined: int = 0
    violations: list[str] = field(default_factory=list)
    compared: bool = False

    def summary(self) -> str:
        lines = [f"site        {self.site}",
                 f"events      {self.events}",
                 f"sites       {self.sites}",
                 f"packages    {self.packages}",
                 f"quarantined {self.quarantined}",
                 f"read model  {'matches the rebuild' if self.compared and not any(v.startswith('read model') for v in self.violations) else 'DIFFERS' if self.compared else 'not compared'}",
                 f"violations  {len(self.violations)}"]
        lines += [f"  - {v}" for v in self.violations]
        return "\n".join(lines)


class LogAccess:
    """The JetStream of a site's data dir: the running site's broker, or one we start."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.data = Path(settings.data)
        self.broker: EmbeddedBroker | None = None
        self.lock: DataDirLock | None = None
        self.nc = None

    async def __aenter__(self):
        if not key_path(self.data).exists():
            raise AuditError(f"{self.data} is not an ODST data directory (no site.key)")
        self.key = SiteKey.load_or_create(key_path(self.data))
        info = running_info(self.data)
        if self.settings.nats:
            url = self.settings.nats
        elif info is not None:
            url = info.get("nats") or ""
            if not url:
                raise AuditError("a site is running on this data dir but has not published its broker URL yet")
        else:
            self.lock = DataDirLock(self.data)
            self.lock.acquire()
            self.broker = EmbeddedBroker(
                BrokerConfig(site=self.key.site_id, store_dir=self.data / "nats",
                             sync_interval=self.settings.sync_interval),
                run_dir(self.data))
            url = self.broker.start()
        self.running = info is not None
        self.nc = await nats.connect(servers=server_list(url), connect_timeout=5, max_reconnect_attempts=3)
        self.js = self.nc.jetstream(timeout=10)
        return self

    async def __aexit__(self, *exc):
        if self.nc:
            await self.nc.close()
        if self.broker:
            self.broker.stop()
        if self.lock:
            self.lock.release()

    async def streams(self) -> list[str]:
        names = [EVENTS_STREAM]
        for s in await until_ready(self.js.streams_info, timeout=60):
            if s.config.name.startswith("PEER_"):
                names.append(s.config.name)
        return names


async def replay_into(access: LogAccess, target: Path, until: dict[str, int] | None = None) -> apply.Folder:
    """Fold every stream from sequence 1 into a fresh read model.

    The site's own stream goes first; a peer's mirror is replayed once the key
    that vouches for it is known, as it was live (a mirror is only created
    after its PeerRegistered was projected).
    """
    conn = db.open_read_model(target)
    folder = apply.Folder(conn, {access.key.site_id: access.key.public_key})
    pending = await access.streams()
    while pending:
        ready = [s for s in pending if s == EVENTS_STREAM or folder.key_for(s.removeprefix("PEER_"))]
        batch = ready or pending  # whatever is left has no known key: replay it to record that
        for stream in batch:
            pending.remove(stream)
            end = until.get(stream, 0) if until is not None else \
                await until_ready(lambda: last_seq(access.js, stream), timeout=60)
            if end <= 0:
                continue
            async for msg in read_stream(access.js, stream, 1, until_seq=end, idle_timeout=30):
                folder.fold(msg)
            if ready:
                break  # re-evaluate: this stream may vouch for others
    return folder


async def run_audit(settings: Settings) -> AuditReport:
    report = AuditReport()
    async with LogAccess(settings) as access:
        report.site = access.key.site_id
        live_path = read_model_path(access.data)
        live = db.connect(live_path, readonly=True) if live_path.exists() else None
        live_dump = None
        until = None
        if live is not None:
            live.execute("BEGIN")  # one snapshot: checkpoints and tables agree
            until = {r["stream"]: r["seq"] for r in live.execute("SELECT * FROM checkpoints")}
            live_dump = apply.dump(live)
            live.execute("COMMIT")
            live.close()
        with tempfile.TemporaryDirectory(prefix="odst-audit-") as tmp:
            folder = await replay_into(access, Path(tmp) / "rebuild.sqlite")
            conn = folder.conn
            report.events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            report.sites = conn.execute("SELECT count(*) FROM sites").fetchone()[0]
            report.packages = conn.execute("SELECT count(*) FROM packages").fetchone()[0]
            for q in conn.execute("SELECT stream, stream_seq, reason FROM quarantine ORDER BY 1, 2"):
                report.violations.append(f"{q[0]} seq {q[1]}: {q[2]}")
            report.quarantined = len(report.violations)
            if live_dump is not None:
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
    return report


async def run_rebuild(settings: Settings) -> int:
    data = Path(settings.data)
    if running_info(data) is not None:
        raise AuditError("odst serve is running on this data directory: stop it, then rebuild")
    async with LogAccess(settings) as access:
        target = read_model_path(data)
        fd, tmp = tempfile.mkstemp(prefix="read-model.", suffix=".rebuild", dir=data)
        os.close(fd)
        os.unlink(tmp)
        folder = await replay_into(access, Path(tmp))
        count = folder.conn.execute("SELECT count(*) FROM events").fetchone()[0]
        folder.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        folder.conn.close()
        for suffix in ("-wal", "-shm"):
            Path(str(target) + suffix).unlink(missing_ok=True)
        os.replace(tmp, target)
        for suffix in ("-wal", "-shm"):
            Path(tmp + suffix).unlink(missing_ok=True)
        return count
