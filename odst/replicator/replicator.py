"""The replicator: make this site hold every current package its stage policy accepts.

Reacts to every change of the read model: removes files of deleted packages,
and queues a pull for each missing content that some site holds. Workers — in
this process and in any other ``odst replicator`` on the same site — take pulls
from one JetStream work-queue consumer; a lease in a KV bucket (renewed while
the pull runs, expiring when its worker dies) makes sure one worker at a time
fetches a content, and a dead worker's pull is redelivered to another, which
resumes from the verified chunks already in the shared store (see ``puller``).
Each finished pull records PackageAvailable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import socket
import time
from collections import Counter
import sqlite3

import nats.js.errors
from nats.js import api

import structlog

from odst.bus.service import consume
from odst.config import Settings
from odst.bus.streams import ensure_key_value, ensure_stream
from odst.events import catalogue as ev
from odst.events.log import AppendFailed
from odst.events.signing import SiteKey
from odst.projections.appender import Append
from odst.naming import name_key
from odst.projections import views
from odst.projections.status import ProjectionStatus
from odst.replicator.bandwidth import Bandwidth
from odst.replicator.puller import Progress, Puller, TransferFailed, Want
from odst.replicator.transport import HttpChunkSource, NatsChunkSource, http_session
from odst.store.files import PackageStore
from odst.store.files import tag

log = structlog.get_logger("odst.replicator")

HTTP_BASE_COST = 0.0
NATS_BASE_COST = 50.0  # used when HTTP is absent or failing
BACKOFF_MIN_S, BACKOFF_MAX_S = 2.0, 300.0
WORK_STREAM = "REPLICATION"
WORK_DURABLE = "replicators"
LEASE_BUCKET = "ODST_LEASES"
DEDUPE_BUCKET_S = 30
REPORT_EVERY_S = 60.0  # a source's bad chunks of one content are reported at most this often
MISSING_CHECK_S = 10.0  # how often held files are checked for presence (a stat each)


def work_subject(site: str) -> str:
    return f"odst.{site}.work.pull"


class Replicator:
    def __init__(self, *, site_id: str, key: SiteKey, nc, js, reader: sqlite3.Connection, store: PackageStore,
                 append: Append, projection: ProjectionStatus,
                 settings: Settings, replicas: int, bandwidth: Bandwidth | None = None):
        self.site_id, self.key, self.nc, self.js = site_id, key, nc, js
        self.bandwidth = bandwidth  # receive limits per link, timetables, urgency
        self.reader, self.store, self.append, self.projection = reader, store, append, projection
        self.settings, self.replicas = settings, replicas
        self.progress: dict[tuple[str, str], Progress] = {}
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}
        self.backoff: dict[tuple[str, str], tuple[float, float]] = {}
        self.last_failure: dict[tuple[str, str], str] = {}
        self.bad_chunks: Counter[str] = Counter()
        self.http = None  # aiohttp session, made inside the running loop
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._loop_task: asyncio.Task | None = None
        self._workers: list[asyncio.Task] = []
        self._kick = asyncio.Event()
        self._psub = None
        self._leases = None
        self.lease_s = float(max(3, settings.replication_lease_s))
        self._missing_checked = -1e9
        self._started_ms = int(time.time() * 1000)
        self._kept_alone: set[tuple[str, str]] = set()  # withdrawn here, but no other site holds it
        self._reported: dict[tuple[str, str], float] = {}  # (source, blake3) -> when a ChunkRejected was last recorded
        self._reporting: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.http = http_session()
        js, site_id = self.js, self.site_id
        await ensure_stream(js, api.StreamConfig(
            name=WORK_STREAM, subjects=[f"odst.{site_id}.work.>"], retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE, duplicate_window=60.0, max_age=24 * 3600.0,
            num_replicas=self.replicas))
        self._leases = await ensure_key_value(js, api.KeyValueConfig(
            bucket=LEASE_BUCKET, ttl=self.lease_s, history=1, storage=api.StorageType.FILE,
            replicas=self.replicas))
        self._psub = await js.pull_subscribe(
            work_subject(site_id), durable=WORK_DURABLE, stream=WORK_STREAM,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.lease_s,
                                      max_deliver=-1, max_ack_pending=1000))
        self._loop_task = asyncio.create_task(self._loop(), name="replicator")
        self._workers = [asyncio.create_task(self._work(), name=f"replicator-worker-{i}")
                         for i in range(max(1, self.settings.replication_packages))]

    async def stop(self) -> None:
        tasks = [t for t in [self._loop_task, *self._workers, *self.tasks.values(), *self._reporting] if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.http is not None:
            await self.http.close()

    def kick(self) -> None:
        self._kick.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replication pass failed; retrying")
            waiter = asyncio.ensure_future(self.projection.wait_changed(2.0))
            kicked = asyncio.ensure_future(self._kick.wait())
            await asyncio.wait([waiter, kicked], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            kicked.cancel()
            self._kick.clear()

    async def reconcile(self) -> None:
        self.remove_deleted()
        await self.withdraw_unaccepted()
        if time.monotonic() - self._missing_checked >= MISSING_CHECK_S:
            self._missing_checked = time.monotonic()
            await self.repull_missing()
        now = time.monotonic()
        wanted = views.wanted(self.reader, self.site_id, views.replicated_stages(self.reader, self.settings))
        wanted_keys = set()
        for row in wanted:
            key = (row["name"], row["blake3"])
            wanted_keys.add(key)
            if key in self.tasks:
                continue
            sources = views.sources(self.reader, row["name"], row["blake3"], self.site_id)
            progress = self.progress.setdefault(key, Progress(row["name"], row["blake3"],
                                                              len(json.loads(row["chunks"]))))
            if not sources:
                progress.status, progress.detail = "pending", "waiting for a site that holds it"
                continue
            if now < self.backoff.get(key, (0.0, 0.0))[0]:
                continue
            if progress.status != "failed":
                progress.status, progress.detail = "pending", "queued"
            if self.bandwidth is not None and self.bandwidth.urgent(name=row["name"]):
                # the urgent lane: not behind pulls that a paused link holds in every worker
                self.tasks[key] = asyncio.create_task(self._pull_leased(row), name=f"urgent-{row['name']}")
                continue
            await self._enqueue(row["name"], row["blake3"], sources)
        for key in list(self.progress):
            if key not in wanted_keys and key not in self.tasks:
                del self.progress[key]

    async def _enqueue(self, name: str, blake3: str, sources: list[str]) -> None:
        """Queue a pull; the same pull (same sources) is queued at most once per dedupe bucket."""
        bucket = int(time.time() // DEDUPE_BUCKET_S)
        digest = hashlib.sha256(f"{name}\0{blake3}\0{','.join(sources)}\0{bucket}".encode()).hexdigest()[:32]
        await self.js.publish(work_subject(self.site_id), json.dumps({"name": name, "blake3": blake3}).encode(),
                                   stream=WORK_STREAM, headers={"Nats-Msg-Id": digest})

    async def _work(self) -> None:
        """One worker: take a queued pull, hold its lease while it runs, ack it when done."""
        async def take_and_ack(msg) -> None:
            try:
                await self._take(msg)
            finally:
                try:
                    await msg.ack()
                except Exception:
                    pass  # the broker redelivers; the lease and the read model make that harmless
        await consume(self._psub, take_and_ack, "replication")

    async def _take(self, msg) -> None:
        try:
            item = json.loads(msg.data)
            name, blake3 = str(item["name"]), str(item["blake3"])
        except (ValueError, KeyError, TypeError):
            log.warning("malformed work item dropped")
            return
        key = (name, blake3)
        row = self.reader.execute("SELECT * FROM packages WHERE key=? AND blake3=?",
                                  (name_key(name), blake3)).fetchone()
        if row is None or key in self.tasks or (name, blake3) not in {
                (r["name"], r["blake3"]) for r in views.wanted(self.reader, self.site_id,
                                                               views.replicated_stages(self.reader, self.settings))}:
            return  # no longer wanted, or already being pulled here
        await self._pull_leased(row, msg)

    async def _pull_leased(self, row, msg=None) -> None:
        """Pull under the content's lease (``msg``: the work item to keep in progress, if any)."""
        key, blake3 = (row["name"], row["blake3"]), row["blake3"]
        try:
            revision = await self._leases.create(blake3, self.owner.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            if self.tasks.get(key) is asyncio.current_task():
                del self.tasks[key]
            return  # another worker holds the lease; if it dies, the pull is queued again
        heartbeat = asyncio.create_task(self._heartbeat(msg, blake3, revision))
        self.tasks[key] = asyncio.current_task()
        try:
            await self._transfer(row)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            try:
                await self._leases.delete(blake3)
            except Exception:
                pass  # expires on its own

    async def _heartbeat(self, msg, blake3: str, revision: int) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                if msg is not None:
                    await msg.in_progress()
                revision = await self._leases.update(blake3, self.owner.encode(), last=revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("could not renew the pull's lease", package=blake3, error=f"{type(exc).__name__}")

    def remove_deleted(self) -> None:
        """Files whose name no longer has any live content were deleted somewhere: remove them
        (files are named by key, naming.name_key)."""
        live = views.live_keys(self.reader)
        store = self.store
        for p in store.packages.iterdir():
            if p.name in live or store.is_publishing(p.name):
                continue
            if store.remove(p.name):
                log.info("removed a deleted package", package=p.name)
        for p in store.tmp.glob("*.repl"):
            if p.stem not in {k[1] for k in self.tasks} and (
                    not views.content_is_live(self.reader, p.stem)
                    or views.local_content(self.reader, p.stem, self.site_id) is not None):  # held again
                p.unlink(missing_ok=True)

    async def withdraw_unaccepted(self) -> list[str]:
        """Held packages whose stage this site no longer accepts (a demotion, or a change of the
        accepted stages) are not served from the moment the read model says so (views.servable);
        their files are removed once ``withdraw_grace_s`` has passed since the later of that
        change and this process's start, and PackageWithdrawn records it, so that a promotion
        pulls the package again. Within the grace period a promotion serves the kept file at
        once. A file no other site holds is kept (not served): removing it would lose the
        content. Returns the names withdrawn."""
        stages = views.replicated_stages(self.reader, self.settings)
        rows = views.unaccepted_held(self.reader, self.site_id, stages)
        if not rows:
            return []
        grace_ms = self.settings.withdraw_grace_s * 1000
        chosen = views.site_setting(self.reader, "accepted_stages")
        changed_ms = max(self._started_ms, chosen.updated_at if chosen else 0)
        now_ms = int(time.time() * 1000)
        withdrawn = []
        for row in rows:
            if now_ms - max(changed_ms, row["updated_at"]) < grace_ms or (row["name"], row["blake3"]) in self.tasks:
                continue
            if not views.sources(self.reader, row["key"], row["blake3"], self.site_id):
                if (row["key"], row["blake3"]) not in self._kept_alone:
                    self._kept_alone.add((row["key"], row["blake3"]))
                    log.warning("package not accepted here but held nowhere else: file kept, not served",
                                package=row["name"], stage=row["stage"])
                continue
            reason = f"stage {row['stage']} is not accepted here (accepts {', '.join(stages) or 'none'})"
            try:
                await self.append(ev.PackageWithdrawn(name=row["name"], blake3=row["blake3"], reason=reason),
                                  actor="replicator")
            except AppendFailed as exc:
                log.warning("could not record a withdrawal; retrying later", package=row["name"], error=str(exc))
                break
            self._kept_alone.discard((row["key"], row["blake3"]))
            if not self.store.is_publishing(row["key"]):
                self.store.remove(row["key"])
            log.info("withdrawn package removed", package=row["name"], stage=row["stage"])
            withdrawn.append(row["name"])
        return withdrawn

    async def repull_missing(self) -> list[str]:
        """Files the log says this site holds but the store lacks (a site restored by
        ``odst recover``, a file removed by hand): record PackageTransferFailed for each, as
        ``odst verify`` does, so peers stop counting on this copy and the package is wanted
        here again and pulled from the sites that hold it. Returns the names."""
        missing = []
        store, reader = self.store, self.reader
        for key, blake3 in sorted(views.file_holders(reader, self.site_id).items()):
            if store.is_publishing(key) or store.path(key).exists():
                continue
            pkg = views.package(reader, key)
            if pkg is None or pkg.blake3 != blake3:
                continue  # a conflict loser being replaced: the pull in progress owns it
            name = pkg.name
            if (name, blake3) in self.tasks:
                continue
            log.warning("stored package missing; pulling it again from peers", package=name)
            try:
                await self.append(ev.PackageTransferFailed(
                    name=name, blake3=blake3, reason="stored file is missing; pulling it again from peers"),
                    actor="replicator")
            except AppendFailed as exc:
                log.warning("could not record a missing package; retrying later", package=name, error=str(exc))
                self._missing_checked = -1e9
                break
            missing.append(name)
        return missing

    def _sources(self, sites: list[str]) -> list[tuple]:
        peers = {p.site: p.http_url for p in views.peer_sites(self.reader, self.site_id)}
        out = []
        for sid in sites:
            url = peers.get(sid, "")
            if url:
                out.append((HttpChunkSource(sid, url, self.key, self.http), HTTP_BASE_COST))
            out.append((NatsChunkSource(sid, self.nc, self.key), NATS_BASE_COST))
        return out

    def _throttle(self, want: Want, progress: Progress):
        """The puller's wait before each chunk: the link's receive limit, unless the package is urgent."""
        bw = self.bandwidth
        if bw is None:
            return None

        def waiting(why: str) -> None:
            progress.detail = why
        return lambda peer, n: bw.receive(peer, n, urgent=lambda: bw.urgent(name=want.name), waiting=waiting)

    def _bad_source(self, want: Want, site: str, reason: str, index: int) -> None:
        self.bad_chunks[site] += 1
        log.warning("peer served a corrupt chunk", peer=site, reason=reason, total=self.bad_chunks[site])
        # tell the source (through this site's log, which it mirrors) so it re-checks its copy
        key, now = (site, want.blake3), time.monotonic()
        if now - self._reported.get(key, -1e9) < REPORT_EVERY_S:
            return
        self._reported[key] = now
        task = asyncio.ensure_future(self._report(ev.ChunkRejected(
            source=site, name=want.name, blake3=want.blake3, chunk=index, reason=reason[:300])))
        self._reporting.add(task)
        task.add_done_callback(self._reporting.discard)

    async def _report(self, event: ev.ChunkRejected) -> None:
        try:
            await self.append(event, actor="replicator")
        except AppendFailed as exc:
            self._reported.pop((event.source, event.blake3), None)
            log.warning("could not record a rejected chunk", peer=event.source, error=str(exc))

    async def _transfer(self, row) -> None:
        key = (row["name"], row["blake3"])
        want = Want.of(views.manifest(row), name=row["name"], stage=row["stage"], origin=row["origin"],
                       uploaded_ts=row["uploaded_at"], uploaded_by=row["uploaded_by"])
        progress = self.progress.setdefault(key, Progress(want.name, want.blake3, len(want.chunks)))
        try:
            sites = views.sources(self.reader, want.name, want.blake3, self.site_id)
            if not sites:
                progress.status, progress.detail = "pending", "waiting for a site that holds it"
                return
            progress.status, progress.detail = "downloading", ""
            progress.started = time.monotonic()
            progress.bytes = 0
            puller = Puller(want, self._sources(sites), self.store.tmp,
                            streams=self.settings.replication_streams, progress=progress,
                            on_bad_source=lambda site, reason, index: self._bad_source(want, site, reason, index),
                            throttle=self._throttle(want, progress))
            log.info("pulling package", package=want.name, size=want.size, sources=sites)
            path = await puller.run()
            if not await self._publish(want, path):
                return
            progress.status, progress.detail = "available", ""
            self.backoff.pop(key, None)
            self.last_failure.pop(key, None)
        except TransferFailed as exc:
            await self._failed(key, want, progress, str(exc))
        except AppendFailed as exc:
            await self._failed(key, want, progress, f"could not record availability: {exc}")
        except OSError as exc:
            await self._failed(key, want, progress, f"store error: {exc.strerror or exc}")
        finally:
            self.tasks.pop(key, None)
            self.kick()

    async def _publish(self, want: Want, path) -> bool:
        current = views.package(self.reader, want.name)
        if current is None or current.blake3 != want.blake3:
            path.unlink(missing_ok=True)
            log.info("content no longer current; discarded", package=want.name)
            return False
        tag(path, want.blake3)  # downloads in flight keep the old inode; new ones see this label
        with self.store.publishing(want.name):
            self.store.replace(path, want.name)
            await self.append(ev.PackageAvailable(
                name=want.name, **want.event_fields(), stage=want.stage, origin=want.origin,
                uploaded_ts=want.uploaded_ts, uploaded_by=want.uploaded_by), actor="replicator")
        log.info("package available", package=want.name, size=want.size)
        return True

    async def _failed(self, key, want: Want, progress: Progress, reason: str) -> None:
        progress.status, progress.detail = "failed", reason
        _, delay = self.backoff.get(key, (0.0, BACKOFF_MIN_S / 2))
        delay = min(delay * 2, BACKOFF_MAX_S)
        self.backoff[key] = (time.monotonic() + delay, delay)
        log.warning("transfer failed; will retry", package=want.name, reason=reason, retry_in_s=delay)
        if self.last_failure.get(key) != reason:
            self.last_failure[key] = reason
            try:
                await self.append(ev.PackageTransferFailed(name=want.name, blake3=want.blake3,
                                                                reason=reason[:500]), actor="replicator")
            except AppendFailed:
                pass
        asyncio.get_running_loop().call_later(delay, self.kick)

    def transfers(self) -> list[dict]:
        return [p.as_dict() for p in self.progress.values()]

