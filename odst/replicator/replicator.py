"""The replicator: make this site hold every current package its stage policy accepts.

Reacts to what changed in the read model (``views.changed_keys``: the packages the
events folded since the last pass touched), not to the whole catalogue: keeps the
set of wanted packages in memory, removes files of deleted packages, and queues a
pull for each missing content that some site holds. A full rescan runs at start, when
a change may concern every package (accepted stages, peers), and every
``FULL_PASS_S`` as a safety net. Workers — in
this process and in any other ``odst replicator`` on the same site — take pulls
from one JetStream work-queue consumer; a lease in a KV bucket (renewed while
the pull runs, expiring when its worker dies) makes sure one worker at a time
fetches a content, and a dead worker's pull is redelivered to another, which
resumes from the verified chunks already in the shared store (see ``puller``).
Each finished pull records PackageAvailable; small packages pulled together are recorded
in one PackagesAvailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
import sqlite3

import nats.errors
import nats.js.errors
from nats.js import api

import structlog

from odst import tasks
from odst.config import Settings
from odst.bus.streams import ensure_key_value, ensure_stream, find_stream
from odst.events import catalogue as ev
from odst.events.log import AppendFailed
from odst.events.signing import SiteKey
from odst.projections.appender import Append
from odst.naming import name_key
from odst.projections import views
from odst.projections.status import ProjectionStatus
from odst.replicator.bandwidth import Bandwidth
from odst.replicator.puller import Progress, Puller, TransferFailed, Want, temp_path
from odst.replicator.transport import (BATCH_ITEM_MAX, BATCH_MAX, ChunkUnavailable, HttpChunkSource,
                                       NatsChunkSource, RunsUnsupported, TransportFailed, http_session)
from odst.store.hashing import WholeHash, chunk_ok, chunk_span, is_blake3
from odst.store.files import PackageStore
from odst.store.files import start_writeback, tag

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
MISSING_PAGE = 2000  # held files checked each time (the next ones the next time)
PASS_MIN_S = 0.1  # passes start at most this often: changes folded meanwhile are taken together
FULL_PASS_S = 300.0  # the safety net: the whole catalogue is rescanned at least this often
KEYS_PER_QUERY = 500  # changed keys looked up per SQL query
PUBLISH_WINDOW = 256  # work items published before their acks are awaited
WORK_BATCH = 32  # work items a worker takes at once: its small packages are pulled together
# Workers taking work items: small packages' batches run this many side by side (one round
# trip each is mostly waiting: leases, the peer, the fsync, the fold of PackageAvailable);
# big pulls still run at most ``replication_packages`` at once (``_big``).
SMALL_LANES = 4
FETCH_WAIT_S = 5.0  # a worker's wait for a work item (then it asks again)
FETCH_MORE_S = 0.05  # how long the rest of a batch is waited for once one item came
SMALL_BYTES = 1 << 20  # a package this size or smaller is "small": one chunk, one request
NO_BATCH_S = 600.0  # a peer that serves no batches is asked for one again after this long (upgraded?)


def _fsync_close(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    finally:
        os.close(fd)
    return None


class LeasedHere(Exception):
    """A pull of this process holds the content's lease now (under another name)."""


def _pulls_of(msg) -> list[tuple[str, str]]:
    """The (name, blake3) pulls of a work item: ``{"pulls": [[name, blake3], ...]}``, or one
    ``{"name", "blake3"}`` as earlier versions queue; a malformed one holds none."""
    try:
        item = json.loads(msg.data)
        if isinstance(item, dict) and "pulls" in item:
            return [(str(name), str(blake3)) for name, blake3 in item["pulls"]]
        return [(str(item["name"]), str(item["blake3"]))]
    except (ValueError, KeyError, TypeError):
        log.warning("malformed work item dropped")
        return []


async def _up_to_a_batch(msgs: list) -> list:
    """The first work items, up to WORK_BATCH pulls in all; the rest handed back (nak: at once
    to a free worker). The items taken after a first one of few pulls may be whole batches: a
    catch-up's pass queues its changes as batches and a remainder, and one worker took up to
    31 batches at once (~1,000 pulls, seen), leaving the other lanes idle while its files
    waited for one append at the end."""
    kept, pulls = [], 0
    for i, msg in enumerate(msgs):
        n = len(_pulls_of(msg))
        if kept and pulls + n > WORK_BATCH:
            await asyncio.gather(*(m.nak() for m in msgs[i:]), return_exceptions=True)
            break
        kept.append(msg)
        pulls += n
    return kept


async def _next_items(psub) -> list:
    """Wait for one work item, then take what else is queued right now (``_up_to_a_batch``).

    A fetch of the whole batch at once is a pull request the broker holds open until the batch
    is full or it expires: items queued a few at a time (a catch-up still being folded, its last
    items) waited there for the request's whole timeout. The second fetch is made only when the
    broker said, as it handed the first item over, that more wait behind it: that fetch waits
    FETCH_MORE_S for a batch that will not fill, and every lone upload's pull started that much
    later (50 of the 52 ms from an upload's 201 to its pull at a peer, bench/replication.py)."""
    msgs = await psub.fetch(1, timeout=FETCH_WAIT_S)
    more = min(WORK_BATCH - 1, _queued_behind(msgs[0]))
    if len(_pulls_of(msgs[0])) < WORK_BATCH and more:  # single items: take more
        with contextlib.suppress(nats.errors.TimeoutError, asyncio.TimeoutError):
            msgs = await _up_to_a_batch(msgs + await psub.fetch(more, timeout=FETCH_MORE_S))
    return msgs


def _queued_behind(msg) -> int:
    """How many items the broker counted queued behind ``msg`` when it delivered it. Asked for
    that many, a fetch returns once they come; asked for a whole batch, it waited until its
    expiry (FETCH_MORE_S) for one that would not fill. (Items queued after that are taken by
    the next fetch, this worker's or another's.)"""
    try:
        return msg.metadata.num_pending
    except Exception:  # noqa: BLE001 - no JetStream delivery data: ask for a batch, as before
        return WORK_BATCH - 1


def json_len(chunks: str) -> int:
    return len(json.loads(chunks))


def work_subject(site: str) -> str:
    return f"odst.{site}.work.pull"


def remove_unlisted(store: PackageStore, live_keys: Callable[[], set[str]]) -> list[str]:
    """Remove the files of ``store.packages`` that no live name has (``live_keys()``, read from
    the read model) and no publisher marks; the names removed. The markers are checked BEFORE
    the live names are read again: an upload in another process marks its name before its file
    is linked and unmarks it only after its event is folded, so a file unmarked at the check is
    either live in the read after it, or not an upload's. (Read once before the check, an upload
    folded and unmarked in between was removed though it had answered 201.)"""
    live = live_keys()
    unmarked = [p.name for p in store.packages.iterdir() if p.name not in live and not store.is_publishing(p.name)]
    if not unmarked:
        return []
    live = live_keys()
    return [name for name in unmarked if name not in live and store.remove(name)]


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
        self._recovering = asyncio.Lock()
        self._no_batch: dict[str, float] = {}  # peer -> until when its small packages go one by one (no batches)
        self.lease_s = float(max(3, settings.replication_lease_s))
        self._missing_checked = -1e9
        self._missing_after = ""  # the last key the missing-file check looked at
        self._started_ms = int(time.time() * 1000)
        self._kept_alone: set[tuple[str, str]] = set()  # withdrawn here, but no other site holds it
        self._reported: dict[tuple[str, str], float] = {}  # (source, blake3) -> when a ChunkRejected was last recorded
        self._reporting: set[asyncio.Task] = set()
        # what changed: the read model's event position read up to, the wanted packages
        # (key -> packages row), keys to look at again on the next pass, and when
        self._cursor = 0
        self._full_at = -1e9
        self._wanted: dict[str, sqlite3.Row] = {}
        self._dirty: set[str] = set()
        self._retry: dict[str, float] = {}  # key -> monotonic time to look again (backoff, lease held)
        self._leased_here: set[str] = set()  # contents a pull of this process holds the lease of
        self._withdraw_pending: set[str] = set()  # unaccepted here, within the grace period
        self._retries: dict[str, int] = {}  # key -> times looked at again on a timer (a new work item each)
        self._queued: set[str] = set()  # wanted keys a work item was queued for
        self.full_passes = 0  # each logged: tests check that a change is picked up without one

    async def start(self) -> None:
        self.http = http_session()
        await self._ensure_queue()
        self._loop_task = asyncio.create_task(self._loop(), name="replicator")
        self._big = asyncio.Semaphore(max(1, self.settings.replication_packages))
        self._workers = [asyncio.create_task(self._work(), name=f"replicator-worker-{i}")
                         for i in range(max(1, self.settings.replication_packages, SMALL_LANES))]

    async def _ensure_queue(self) -> None:
        """The work queue, the lease bucket and the workers' consumer, made where missing.

        Both are derived state, kept in memory (no fsync per work item, lease, ack): the full
        rescan re-queues every wanted package from the read model (at start, and when a
        worker finds the queue gone: a broker restarted), and a lease lost with the broker
        risks only a duplicate pull of content-addressed bytes. A site made by an earlier
        version has them in files; storage cannot change in place, so they are recreated."""
        js, site_id = self.js, self.site_id
        for stream in (WORK_STREAM, f"KV_{LEASE_BUCKET}"):
            info = await find_stream(js, stream)
            if info is not None and info.config.storage != api.StorageType.MEMORY:
                log.warning("replication: recreating derived state in memory (it was in files); "
                            "queued pulls are queued again from the read model", stream=stream)
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(stream)
        await ensure_stream(js, api.StreamConfig(
            name=WORK_STREAM, subjects=[f"odst.{site_id}.work.>"], retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.MEMORY, duplicate_window=60.0, max_age=24 * 3600.0,
            num_replicas=self.replicas))
        self._leases = await ensure_key_value(js, api.KeyValueConfig(
            bucket=LEASE_BUCKET, ttl=self.lease_s, history=1, storage=api.StorageType.MEMORY,
            replicas=self.replicas))
        old, self._psub = self._psub, await js.pull_subscribe(
            work_subject(site_id), durable=WORK_DURABLE, stream=WORK_STREAM,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, ack_wait=self.lease_s,
                                      max_deliver=-1, max_ack_pending=1000))
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()

    async def _queue_lost(self, psub) -> None:
        """A worker's fetch failed otherwise than by waiting: if the work queue is gone (a
        broker restarted: it was in memory), make it again and queue every wanted package
        again from the read model (a full rescan). Once per loss, whichever worker sees it."""
        async with self._recovering:
            if psub is not self._psub:
                return  # another worker recovered it meanwhile
            try:
                await self.js.stream_info(WORK_STREAM)
                await psub.consumer_info()
                return  # still there: the broker was only unreachable for a moment
            except nats.js.errors.NotFoundError:
                pass
            await self._ensure_queue()
            log.warning("replication: the work queue was lost (broker restarted); queuing every wanted "
                        "package again")
            self._queued.clear()
            self._full_at = -1e9
            self.kick()

    async def _check_queue(self) -> None:
        """Now and then (workers' fetches may only time out): is the work queue still there?"""
        psub = self._psub
        try:
            await psub.consumer_info()
        except nats.js.errors.NotFoundError:
            await self._queue_lost(psub)
        except Exception:
            pass  # the broker unreachable for now: looked at again next time

    async def stop(self) -> None:
        await tasks.cancel(self._loop_task, *self._workers, *self.tasks.values(), *self._reporting)
        if self.http is not None:
            await self.http.close()

    def kick(self) -> None:
        self._kick.set()

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
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
            # coalesce: while events fold back to back (a catch-up), one pass takes many of them
            await asyncio.sleep(max(0.0, started + PASS_MIN_S - time.monotonic()))
            self._kick.clear()

    async def reconcile(self) -> None:
        upto, keys, everything, types = views.changed_keys(self.reader, self._cursor)
        if "PackageUrgencySet" in types and self.bandwidth is not None:
            self.bandwidth.refresh()  # its choices are cached: the urgent lane must see this one now
        now = time.monotonic()
        if everything or upto < self._cursor or now - self._full_at >= FULL_PASS_S:
            await self._full_pass(upto)
        else:
            self._cursor = upto
            if keys:
                await self._changed(keys)
            elif self._withdraw_pending:
                await self.withdraw_unaccepted(set(self._withdraw_pending))
        if now - self._missing_checked >= MISSING_CHECK_S:
            self._missing_checked = now
            await self.repull_missing()
            await self._check_queue()
        for key, at in list(self._retry.items()):
            if at <= now:
                del self._retry[key]
                self._dirty.add(key)
                self._retries[key] = self._retries.get(key, 0) + 1
        await self._queue_dirty()

    async def _full_pass(self, upto: int) -> None:
        """Look at every package: at start, when a change may concern all, and as a safety net."""
        self._cursor, self._full_at = upto, time.monotonic()
        self.full_passes += 1
        stages = views.replicated_stages(self.reader, self.settings)
        wanted = {r["key"]: r for r in views.wanted(self.reader, self.site_id, stages)}
        log.info("replication: full rescan of the catalogue", wanted=len(wanted), passes=self.full_passes)
        for key, old in self._wanted.items():
            if key not in wanted or wanted[key]["blake3"] != old["blake3"]:
                self._forget(old)
                self._queued.discard(key)
        self._wanted = wanted
        if self._queued and await self._queue_busy():
            # pulls queued before are still on their way: only the others (a safety net that
            # re-queued a whole catch-up every few minutes would double it)
            self._dirty |= set(wanted) - self._queued
        else:
            self._dirty = set(wanted)
        self.remove_deleted()
        self._withdraw_pending.clear()
        await self.withdraw_unaccepted()

    async def _queue_busy(self) -> bool:
        """Are work items waiting or being pulled (by any worker of this site)?"""
        try:
            info = await self._psub.consumer_info()
        except Exception:
            return False  # unknown: queue again (duplicates are dropped when taken)
        return bool(info.num_pending or info.num_ack_pending)

    async def _changed(self, keys: set[str]) -> None:
        """Bring the wanted set up to date for the packages whose events were folded since the
        last pass; remove the files of those no longer live (deleted here or at a peer)."""
        stages = views.replicated_stages(self.reader, self.settings)
        ordered = sorted(keys)
        gone = []
        for i in range(0, len(ordered), KEYS_PER_QUERY):
            chunk = ordered[i:i + KEYS_PER_QUERY]
            rows = {r["key"]: r for r in views.wanted(self.reader, self.site_id, stages, keys=chunk)}
            live = views.live_keys(self.reader, chunk)
            for key in chunk:
                old, row = self._wanted.get(key), rows.get(key)
                if old is not None and (row is None or row["blake3"] != old["blake3"]):
                    self._forget(old)
                if row is None:
                    self._wanted.pop(key, None)
                    self._retries.pop(key, None)
                    self._queued.discard(key)
                else:
                    self._wanted[key] = row
                    self._dirty.add(key)
                if key not in live:
                    gone.append(key)
        for key in gone:
            if not self.store.is_publishing(key) and self.store.remove(key):
                log.info("removed a deleted package", package=key)
        if gone:
            self._remove_stale_partials()
        await self.withdraw_unaccepted(keys | self._withdraw_pending)

    def _forget(self, row) -> None:
        """A package no longer wanted (or wanted with another content): its progress goes
        (a pull still running keeps it until ``_finished``)."""
        pair = (row["name"], row["blake3"])
        if pair not in self.tasks:
            self.progress.pop(pair, None)

    def _finished(self, pair: tuple[str, str]) -> None:
        """A pull's task ends. If the package stopped being wanted while it ran (its own
        PackageAvailable folded before the task returned, say), its progress goes now."""
        self.tasks.pop(pair, None)
        row = self._wanted.get(name_key(pair[0]))
        if row is None or row["blake3"] != pair[1]:
            self.progress.pop(pair, None)

    async def _queue_dirty(self) -> None:
        """Queue a pull for each wanted package looked at again that some site holds."""
        now = time.monotonic()
        dirty, self._dirty = self._dirty, set()
        items = []
        rows = [self._wanted[key] for key in sorted(dirty & self._wanted.keys(), key=lambda k: (
            self._wanted[k]["uploaded_at"], self._wanted[k]["name"]))]
        holders = views.sources_of(self.reader, [(row["name"], row["blake3"]) for row in rows
                                                 if (row["name"], row["blake3"]) not in self.tasks], self.site_id)
        for row in rows:
            key, pair = row["key"], (row["name"], row["blake3"])
            if not is_blake3(row["blake3"]):  # named so by a peer's event: no content to pull or file to name
                log.warning("a package's content is named by no blake3 digest; not pulled", package=row["name"],
                            origin=row["origin"])
                continue
            if pair in self.tasks:
                # being pulled here: looked at again soon, in case that pull fails (its retry
                # timer may fire while its batch still records the failure, and be lost here)
                self._retry[key] = min(self._retry.get(key, now + BACKOFF_MIN_S), now + BACKOFF_MIN_S)
                continue
            sources = holders.get(pair, [])
            progress = self.progress.setdefault(pair, Progress(row["name"], row["blake3"],
                                                               json_len(row["chunks"])))
            if not sources:  # a site that gets it says so in an event: looked at again then
                progress.status, progress.detail = "pending", "waiting for a site that holds it"
                continue
            until = self.backoff.get(pair, (0.0, 0.0))[0]
            if now < until:
                self._retry[key] = until
                continue
            if progress.status != "failed":
                progress.status, progress.detail = "pending", "queued"
            if self.bandwidth is not None and self.bandwidth.urgent(name=row["name"]):
                # the urgent lane: not behind pulls that a paused link holds in every worker
                self.tasks[pair] = asyncio.create_task(self._pull_leased(row), name=f"urgent-{row['name']}")
                continue
            items.append((row["name"], row["blake3"], sources, row["size"] <= SMALL_BYTES))
        for i in range(0, len(items), PUBLISH_WINDOW):
            await self._enqueue_many(items[i:i + PUBLISH_WINDOW])

    async def _enqueue_many(self, items: list[tuple[str, str, list[str], bool]]) -> None:
        """Queue pulls (name, blake3, sources, small?): small ones WORK_BATCH to a work item,
        each big one alone (a worker pulls one big package at a time, and hands the others
        back); the items published together and then acknowledged together (one round trip
        for many). The same pulls (same sources) are queued at most once per dedupe bucket. A
        pull that could not be queued is looked at again after a while."""
        small = [item[:3] for item in items if item[3]]
        groups = [small[i:i + WORK_BATCH] for i in range(0, len(small), WORK_BATCH)]
        groups += [[item[:3]] for item in items if not item[3]]
        results = await asyncio.gather(*(self._enqueue(group) for group in groups), return_exceptions=True)
        self._queued.update(name_key(name) for group, r in zip(groups, results) if not isinstance(r, Exception)
                            for name, _, _ in group)
        failed = [group for group, r in zip(groups, results) if isinstance(r, Exception)]
        if failed:
            log.warning("could not queue pulls; retrying", count=sum(map(len, failed)), error=repr(next(
                r for r in results if isinstance(r, Exception))))
            again = time.monotonic() + BACKOFF_MIN_S
            for group in failed:
                for name, _, _ in group:
                    self._retry[name_key(name)] = again

    async def _enqueue(self, group: list[tuple[str, str, list[str]]]) -> None:
        """Queue one work item: ``{"pulls": [[name, blake3], ...]}``. The same pulls (same
        sources, looked at for the same read-model change or retry) are queued at most once per
        dedupe bucket, by any replicator of the site; a later change of a package (its copy
        here found damaged, say) queues it again."""
        bucket = int(time.time() // DEDUPE_BUCKET_S)
        marks = "\0\0".join(f"{name}\0{blake3}\0{','.join(sources)}\0{bucket}\0"
                            f"{self._cursor}:{self._retries.get(name_key(name), 0)}" for name, blake3, sources in group)
        digest = hashlib.sha256(marks.encode()).hexdigest()[:32]
        body = json.dumps({"pulls": [[name, blake3] for name, blake3, _ in group]}).encode()
        await self.js.publish(work_subject(self.site_id), body, stream=WORK_STREAM, headers={"Nats-Msg-Id": digest})

    async def _work(self) -> None:
        """One worker: take up to WORK_BATCH queued pulls; pull the small packages among them
        together (``_pull_small``), the big ones one at a time under their own lease; ack each
        work item when its pull is done or dropped (the broker redelivers what is not acked,
        and keeps in progress what is waiting here)."""
        while True:
            try:
                psub = self._psub
                msgs = await _next_items(psub)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):  # nothing queued (either kind, by client version)
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker reconnecting, or restarted without the queue
                log.warning("replication: fetch failed; retrying", error=f"{type(exc).__name__}: {exc}")
                try:
                    await self._queue_lost(psub)
                except Exception as again:
                    log.warning("replication: could not make the work queue again; retrying",
                                error=f"{type(again).__name__}: {again}")
                await asyncio.sleep(1.0)
                continue
            held = list(msgs)  # handed back ones (nak) leave it: another worker has them then
            keepalive = asyncio.create_task(self._keep_in_progress(held))
            try:
                await self._take(held)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replication: handling work items failed; looking at them again soon")
                # acked below like the rest: looked at again after a short wait, not left to
                # the next full pass (FULL_PASS_S) while a Mac waits for the package
                again = time.monotonic() + BACKOFF_MIN_S
                for msg in held:
                    for name, _ in _pulls_of(msg):
                        self._retry[name_key(name)] = again
            finally:
                keepalive.cancel()
                await asyncio.gather(keepalive, return_exceptions=True)
                # the broker redelivers what is not acked; the lease and the read model make that harmless
                await asyncio.gather(*(m.ack() for m in held), return_exceptions=True)

    async def _keep_in_progress(self, msgs) -> None:
        """Work items taken together stay this worker's while it pulls them."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            await asyncio.gather(*(m.in_progress() for m in msgs), return_exceptions=True)

    async def _take(self, msgs: list) -> None:
        """The work items still wanted here (and not being pulled here already): small ones
        pulled together, then the first big one; further big ones are handed back at once
        (nak, and taken out of ``msgs``) for another worker; big pulls run
        ``replication_packages`` at a time (``_big``), batches of small ones beside them."""
        items: dict[tuple[str, str], object] = {}
        for msg in msgs:
            for pair in _pulls_of(msg):
                items.setdefault(pair, msg)
        stages = views.replicated_stages(self.reader, self.settings)
        keys = sorted({name_key(name) for name, _ in items})
        rows = {(r["name"], r["blake3"]): r for i in range(0, len(keys), KEYS_PER_QUERY)
                for r in views.wanted(self.reader, self.site_id, stages, keys=keys[i:i + KEYS_PER_QUERY])}
        small, big = [], []
        for pair, msg in items.items():
            row = rows.get(pair)
            if row is None or pair in self.tasks:
                continue  # no longer wanted, or already being pulled here
            (small if row["size"] <= SMALL_BYTES else big).append((row, msg))
        for _, msg in big[1:]:
            if msg in msgs and len(_pulls_of(msg)) == 1:  # (big ones are queued alone)
                msgs.remove(msg)
                with contextlib.suppress(Exception):
                    await msg.nak()
        if small:
            await self._pull_small([row for row, _ in small])
        if big:
            row = big[0][0]
            async with self._big:  # big transfers: replication_packages at a time
                # while this waited, the same content may have been pulled (another item for it)
                still = {(r["name"], r["blake3"]) for r in views.wanted(
                    self.reader, self.site_id, views.replicated_stages(self.reader, self.settings),
                    keys=[name_key(row["name"])])}
                if (row["name"], row["blake3"]) in still and (row["name"], row["blake3"]) not in self.tasks:
                    await self._pull_leased(row)

    async def _pull_small(self, rows: list) -> None:
        """Pull several small packages at once: their leases taken together (one round trip),
        the pulls run side by side, and one PackagesAvailable appended for them all. A content
        asked for under several names is pulled for the first (``_take_lease`` marks it before
        any await); the others get LeasedHere and are looked at again soon, not left to the next
        full rescan."""
        results = await asyncio.gather(*(self._take_lease(r["blake3"]) for r in rows), return_exceptions=True)
        leased: dict[str, int] = {}
        mine = []
        for row, rev in zip(rows, results):
            pair = (row["name"], row["blake3"])
            if isinstance(rev, BaseException) or pair in self.tasks:
                if isinstance(rev, nats.js.errors.KeyWrongLastSequenceError):
                    # another worker holds the lease; if it dies, the pull is queued again then
                    self._retry[name_key(row["name"])] = time.monotonic() + self.lease_s
                elif isinstance(rev, LeasedHere):  # under another name: looked at once that is done
                    self._retry[name_key(row["name"])] = time.monotonic() + BACKOFF_MIN_S
                elif isinstance(rev, BaseException):
                    log.warning("could not take a pull's lease", package=row["name"], error=repr(rev))
                    self._retry[name_key(row["name"])] = time.monotonic() + BACKOFF_MIN_S
                else:  # taken, then not used: already being pulled here
                    self._leased_here.discard(row["blake3"])
                continue
            leased[row["blake3"]] = rev
            self.tasks[pair] = asyncio.current_task()
            mine.append(row)
        if not mine:
            return
        heartbeat = asyncio.create_task(self._renew_leases(leased))
        published: set[str] = set()
        try:
            peers = self._peers()  # once for the batch
            fetched, rest = await self._fetch_batches(mine, peers)
            tagged = {path for _, _, path in fetched}  # a batch's files are labelled as written
            fetched += [f for f in await asyncio.gather(*(self._fetch(row, peers) for row in rest)) if f is not None]
            if fetched:
                published = await self._publish_many(fetched, tagged)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            # A content published here keeps its lease until the lease expires (lease_s): it is
            # held and folded here, so no worker of this site wants it now, and a delete per
            # content was a third of a small pull's round trips to the broker. Those not
            # published are released at once, for their retry.
            await asyncio.gather(*(self._leases.delete(b) for b in leased if b not in published),
                                 return_exceptions=True)
            self._leased_here -= set(leased)
            for row in mine:
                self._finished((row["name"], row["blake3"]))
            self.kick()

    async def _fetch_batches(self, rows: list, peers: dict[str, str]) -> tuple[list, list]:
        """Small packages by batch requests (``HttpChunkSource.fetch_batch``: one signed request
        for up to BATCH_MAX contents of one peer) into verified, fsynced temp files. Returns
        what came whole and good, and the rows left to the puller one by one: those no peer
        with HTTP holds, a peer that serves no batches, a cut or refused batch, and a content
        whose bytes failed a check (the peer is reported, as for a bad chunk; the puller then
        asks every source again, as for any pull)."""
        groups: dict[str, list[list]] = {}
        rest = []
        now = time.monotonic()
        holders = views.sources_of(self.reader, [(row["name"], row["blake3"]) for row in rows], self.site_id)
        for row in rows:
            sites = [s for s in holders.get((row["name"], row["blake3"]), [])
                     if peers.get(s) and self._no_batch.get(s, 0.0) <= now]
            if not sites or not 0 < row["size"] <= BATCH_ITEM_MAX:
                rest.append(row)
                continue
            site = next((s for s in sites if s in groups), sites[0])  # as few requests as may be
            lists = groups.setdefault(site, [[]])
            if len(lists[-1]) == BATCH_MAX:
                lists.append([])
            lists[-1].append(row)
        fetched = []
        for got, left in await asyncio.gather(*(self._batch(site, peers[site], group)
                                               for site, lists in groups.items() for group in lists)):
            fetched += got
            rest += left
        return fetched, rest

    async def _batch(self, site: str, url: str, rows: list) -> tuple[list, list]:
        """One batch request to ``site``: (fetched, rows left), as ``_fetch_batches`` says."""
        wants = [Want.of(views.manifest(row), name=row["name"], stage=row["stage"], origin=row["origin"],
                         uploaded_ts=row["uploaded_at"], uploaded_by=row["uploaded_by"]) for row in rows]
        progress = [self.progress.setdefault((w.name, w.blake3), Progress(w.name, w.blake3, len(w.chunks)))
                    for w in wants]
        for want, p in zip(wants, progress):
            p.status, p.detail, p.started, p.bytes, p.sources = "downloading", "", time.monotonic(), 0, [site]
            throttle = self._throttle(want, p)
            if throttle is not None:
                await throttle(site, want.size)  # the link's receive limit, paid per content
        bufs: list[bytearray] = []
        source = HttpChunkSource(site, url, self.key, self.http)
        try:
            async for buf in source.fetch_batch([w.blake3 for w in wants], [w.size for w in wants]):
                bufs.append(buf)
        except RunsUnsupported as exc:
            self._no_batch[site] = time.monotonic() + NO_BATCH_S
            log.warning("peer serves no batches; pulling its small packages one by one", peer=site,
                        reason=str(exc), ask_again_in_s=NO_BATCH_S)
        except (TransportFailed, ChunkUnavailable) as exc:
            log.warning("batch request failed; pulling its packages one by one", peer=site,
                     delivered=len(bufs), of=len(wants), error=str(exc))
        checked = await asyncio.to_thread(self._write_batch, wants[:len(bufs)], bufs) if bufs else []
        fetched, rest = [], []
        for i, (row, want, p) in enumerate(zip(rows, wants, progress)):
            result = checked[i] if i < len(checked) else None
            if isinstance(result, Path):
                p.done, p.bytes = len(want.chunks), want.size
                fetched.append((want, p, result))
                continue
            if isinstance(result, tuple):  # (chunk index, reason): the peer's bytes are wrong
                self._bad_source(want, site, result[1], result[0])
            rest.append(row)
        return fetched, rest

    def _write_batch(self, wants: list[Want], bufs: list[bytearray]) -> list:
        """Off the event loop: each content's chunks checked against their SHA1s and the whole
        against its blake3, then written to its temp file and fsynced (as the puller does).
        Per content its temp path, (chunk index, reason) if its bytes are wrong, or None if
        it could not be stored (tried again one by one)."""
        out: list = []
        for want, buf in zip(wants, bufs):
            view = memoryview(buf)
            bad = None
            for i, expected in enumerate(want.chunks):
                offset, length = chunk_span(i, want.size, want.chunk_size)
                if not chunk_ok(view[offset:offset + length], length, expected):
                    bad = (i, f"chunk {i} of {want.name} failed verification in a batch "
                              f"({len(buf)} bytes, expected {want.size})")
                    break
            if bad is None:
                whole = WholeHash(sha1=False)
                whole.update(view)
                if whole.blake3 != want.blake3:
                    bad = (0, f"{want.name}: whole-file hash mismatch in a batch (blake3 {whole.blake3})")
            if bad is not None:
                out.append(bad)
                continue
            path = temp_path(self.store.tmp, want.blake3)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    while view:
                        view = view[os.write(fd, view):]
                    tag(fd, want.blake3)  # the label, by the open file: no path walked, fsynced with it
                except OSError:
                    os.close(fd)
                    raise
            except OSError as exc:
                self._not_stored(want, path, exc)
                out.append(None)
                continue
            if start_writeback is not None:
                start_writeback(fd, 0, want.size)
            out.append((path, fd))
        # Every file's disk write started above (its blocks allocated in the journal's running
        # transaction), so the first fsync commits them all and the others find their data
        # written and their transaction committed: one journal commit for the batch, in this
        # thread. (Without the early start, each fsync in a row waited for its own commit, a
        # second per batch on a busy disk; fsyncs side by side on 8 threads cost the batch 32
        # hand-offs and the GIL passed back and forth for each.)
        written = [(i, r) for i, r in enumerate(out) if isinstance(r, tuple) and isinstance(r[0], Path)]
        synced = [_fsync_close(fd) for _, (_, fd) in written]
        for (i, (path, _)), error in zip(written, synced):
            if error is None:
                out[i] = path
            else:
                self._not_stored(wants[i], path, error)
                out[i] = None
        return out

    @staticmethod
    def _not_stored(want: Want, path: Path, exc: OSError) -> None:
        log.warning("could not store a pulled package; pulling it again", package=want.name,
                    error=exc.strerror or str(exc))
        path.unlink(missing_ok=True)

    async def _take_lease(self, blake3: str) -> int:
        """Create the content's lease; its revision. One this process left on a content it
        published (``_pull_small`` lets those expire) is its own, taken again at once; one
        another worker holds raises KeyWrongLastSequenceError; one a pull of this process holds
        now (the same content under another name) raises LeasedHere. The caller that gets a
        revision removes ``blake3`` from ``_leased_here`` when its pull ends."""
        if blake3 in self._leased_here:  # checked and marked before any await: no second pull
            raise LeasedHere(blake3)     # of one content into its one temp file
        self._leased_here.add(blake3)
        try:
            try:
                try:
                    return await self._leases.create(blake3, self.owner.encode())
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                    # create found a lease there, looked it up and it had just expired (its
                    # holder killed, its TTL up): the content is free now
                    return await self._leases.create(blake3, self.owner.encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                try:
                    entry = await self._leases.get(blake3)
                except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):  # gone meanwhile
                    return await self._leases.create(blake3, self.owner.encode())
                if entry.value != self.owner.encode():
                    raise
                return await self._leases.update(blake3, self.owner.encode(), last=entry.revision)
        except BaseException:
            self._leased_here.discard(blake3)
            raise

    async def _renew_leases(self, leased: dict[str, int]) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            blake3s = list(leased)
            results = await asyncio.gather(*(self._leases.update(b, self.owner.encode(), last=leased[b])
                                             for b in blake3s), return_exceptions=True)
            for b, rev in zip(blake3s, results):
                if isinstance(rev, BaseException):
                    log.warning("could not renew the pull's lease", package=b, error=f"{type(rev).__name__}")
                else:
                    leased[b] = rev

    async def _pull_leased(self, row, msg=None) -> None:
        """Pull under the content's lease (``msg``: the work item to keep in progress, if any)."""
        key, blake3 = (row["name"], row["blake3"]), row["blake3"]
        try:
            revision = await self._take_lease(blake3)
        except (nats.js.errors.KeyWrongLastSequenceError, LeasedHere) as exc:
            if self.tasks.get(key) is asyncio.current_task():
                del self.tasks[key]
            # another worker holds the lease (if it dies, the pull is queued again then), or a
            # pull here has this content under another name (looked at again once it is done)
            wait = BACKOFF_MIN_S if isinstance(exc, LeasedHere) else self.lease_s
            self._retry[name_key(row["name"])] = time.monotonic() + wait
            return
        heartbeat = asyncio.create_task(self._heartbeat(msg, blake3, revision))
        self.tasks[key] = asyncio.current_task()
        try:
            await self._transfer(row)
        finally:
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
            self._leased_here.discard(blake3)
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
        for name in remove_unlisted(self.store, lambda: views.live_keys(self.reader)):
            log.info("removed a deleted package", package=name)
        self._remove_stale_partials()

    def _remove_stale_partials(self) -> None:
        """Partial pulls of contents deleted since, or held here again, are removed."""
        for p in self.store.tmp.glob("*.repl"):
            if p.stem not in {k[1] for k in self.tasks} and (
                    not views.content_is_live(self.reader, p.stem)
                    or views.local_content(self.reader, p.stem, self.site_id) is not None):  # held again
                p.unlink(missing_ok=True)

    async def withdraw_unaccepted(self, keys: set[str] | None = None) -> list[str]:
        """Held packages whose stage this site no longer accepts (a demotion, or a change of the
        accepted stages) are not served from the moment the read model says so (views.servable);
        their files are removed once ``withdraw_grace_s`` has passed since the later of that
        change and this process's start, and PackageWithdrawn records it, so that a promotion
        pulls the package again. Within the grace period a promotion serves the kept file at
        once. A file no other site holds is kept (not served): removing it would lose the
        content. Given ``keys``, only among those packages (what changed, and those still within
        their grace period). Returns the names withdrawn."""
        stages = views.replicated_stages(self.reader, self.settings)
        if keys is not None:
            self._withdraw_pending -= keys
            if not keys:
                return []
            ordered = sorted(keys)
            rows = [r for i in range(0, len(ordered), KEYS_PER_QUERY)
                    for r in views.unaccepted_held(self.reader, self.site_id, stages,
                                                   keys=ordered[i:i + KEYS_PER_QUERY])]
        else:
            rows = views.unaccepted_held(self.reader, self.site_id, stages)
        if not rows:
            return []
        grace_ms = self.settings.withdraw_grace_s * 1000
        chosen = views.site_setting(self.reader, "accepted_stages")
        changed_ms = max(self._started_ms, chosen.updated_at if chosen else 0)
        now_ms = int(time.time() * 1000)
        withdrawn = []
        for n, row in enumerate(rows):
            if now_ms - max(changed_ms, row["updated_at"]) < grace_ms or (row["name"], row["blake3"]) in self.tasks:
                self._withdraw_pending.add(row["key"])  # looked at again on every pass
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
                self._withdraw_pending.update(r["key"] for r in rows[n:])
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
        here again and pulled from the sites that hold it. Each call looks at one page of
        MISSING_PAGE held files, the next page on the next call (a bounded cost whatever the
        catalogue's size). Returns the names."""
        missing = []
        store, reader = self.store, self.reader
        page = views.file_holders(reader, self.site_id, after=self._missing_after, limit=MISSING_PAGE)
        self._missing_after, before = (max(page) if len(page) == MISSING_PAGE else ""), self._missing_after
        for key, blake3 in sorted(page.items()):
            if store.path(key).exists() or store.is_publishing(key):  # a stat first: is_publishing lists tmp/
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
                self._missing_checked, self._missing_after = -1e9, before  # this one again, soon
                break
            missing.append(name)
            before = key
        return missing

    def _peers(self) -> dict[str, str]:
        """Each peer's HTTP URL ("" if it has none)."""
        return {p.site: p.http_url for p in views.peer_sites(self.reader, self.site_id)}

    def _sources(self, sites: list[str], peers: dict[str, str] | None = None) -> list[tuple]:
        peers = self._peers() if peers is None else peers
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

    async def _fetch(self, row, peers: dict[str, dict] | None = None) -> tuple[Want, Progress, object] | None:
        """Pull a content into a verified, fsynced temp file; None if it failed (recorded) or
        no site holds it now. ``peers``: views.peer_sites by site, if the caller has them."""
        key = (row["name"], row["blake3"])
        want = Want.of(views.manifest(row), name=row["name"], stage=row["stage"], origin=row["origin"],
                       uploaded_ts=row["uploaded_at"], uploaded_by=row["uploaded_by"])
        progress = self.progress.setdefault(key, Progress(want.name, want.blake3, len(want.chunks)))
        try:
            sites = views.sources(self.reader, want.name, want.blake3, self.site_id)
            if not sites:
                progress.status, progress.detail = "pending", "waiting for a site that holds it"
                return None
            if (short := self._short_of_space(want)) is not None:
                await self._failed(key, want, progress, short)
                return None
            progress.status, progress.detail = "downloading", ""
            progress.started = time.monotonic()
            progress.bytes = 0
            puller = Puller(want, self._sources(sites, peers), self.store.tmp,
                            streams=self.settings.replication_streams, progress=progress,
                            on_bad_source=lambda site, reason, index: self._bad_source(want, site, reason, index),
                            throttle=self._throttle(want, progress))
            log.info("pulling package", package=want.name, size=want.size, sources=sites)
            return want, progress, await puller.run()
        except TransferFailed as exc:
            await self._failed(key, want, progress, str(exc))
        except OSError as exc:
            await self._failed(key, want, progress, f"store error: {exc.strerror or exc}")
        return None

    def _short_of_space(self, want: Want) -> str | None:
        """Why a pull is not started now: it would not fit in the store beside its reserve (as
        an upload would be refused). It would fill the disk and fail, and its partial file would
        hold space the packages that do fit need; so that file goes too. Tried again with the
        failure's backoff: space may be freed. None: it fits (what its temp file holds counts)."""
        path = temp_path(self.store.tmp, want.blake3)
        try:
            held = os.stat(path).st_blocks * 512
        except FileNotFoundError:
            held = 0
        free, reserve = self.store.free_bytes(), self.store.reserve_bytes()
        if max(0, want.size - held) + reserve <= free:
            return None
        if held:
            path.unlink(missing_ok=True)
        log.warning("not enough free space in the store for a pull", package=want.name, size=want.size,
                    free=free, reserve=reserve)
        return f"not enough free space in the store for {want.size} bytes"  # the same each time: one event

    def _done(self, want: Want, progress: Progress) -> None:
        key = (want.name, want.blake3)
        progress.status, progress.detail = "available", ""
        self.backoff.pop(key, None)
        self.last_failure.pop(key, None)
        self._retries.pop(name_key(want.name), None)

    async def _transfer(self, row) -> None:
        key = (row["name"], row["blake3"])
        try:
            fetched = await self._fetch(row)
            if fetched is None:
                return
            want, progress, path = fetched
            try:
                if not await self._publish(want, path):
                    return
            except AppendFailed as exc:
                await self._failed(key, want, progress, f"could not record availability: {exc}")
                return
            except OSError as exc:
                await self._failed(key, want, progress, f"store error: {exc.strerror or exc}")
                return
            self._done(want, progress)
        finally:
            self._finished(key)
            self.kick()

    def _still_current(self, want: Want, path, current: dict[str, str] | None = None) -> bool:
        """Is ``want`` still the package's content (``current``: views.current_contents, if
        the caller has it)? If not, its pulled file is dropped."""
        if current is None:
            current = views.current_contents(self.reader, [want.name])
        if current.get(name_key(want.name)) != want.blake3:
            path.unlink(missing_ok=True)
            log.info("content no longer current; discarded", package=want.name)
            return False
        return True

    def _available_event(self, want: Want) -> ev.PackageAvailable:
        return ev.PackageAvailable(name=want.name, **want.event_fields(), stage=want.stage, origin=want.origin,
                                   uploaded_ts=want.uploaded_ts, uploaded_by=want.uploaded_by)

    async def _publish(self, want: Want, path) -> bool:
        if not self._still_current(want, path):
            return False
        tag(path, want.blake3)  # downloads in flight keep the old inode; new ones see this label
        with self.store.publishing(want.name):
            self.store.replace(path, want.name)
            await self.append(self._available_event(want), actor="replicator")
        log.info("package available", package=want.name, size=want.size)
        return True

    async def _publish_many(self, fetched: list[tuple[Want, Progress, object]],
                            tagged: set | frozenset = frozenset()) -> set[str]:
        """Put several pulled files in place, then record that they are here in one event (a
        PackagesAvailable of them all; a PackageAvailable if one). Each file is in place (and
        fsynced) before the event is appended, as in ``_publish``. Returns the blake3s of the
        contents whose event was appended and folded. ``tagged``: the paths already labelled
        with their content (``_write_batch``)."""
        placed = []
        published: set[str] = set()
        current = views.current_contents(self.reader, [want.name for want, _, _ in fetched])
        ready = [(want, progress, path) for want, progress, path in fetched
                 if self._still_current(want, path, current)]
        publishing = contextlib.ExitStack()  # the files' "being published" markers, until their events are folded

        def place() -> list:
            """Off the event loop (a few syscalls per file): label, mark, rename each, then one
            fsync of packages/ for the batch. Per file its path or the OSError."""
            out: list = []
            for want, _, path in ready:
                try:
                    if path not in tagged:  # labelled when written (a batch); the puller's files here
                        tag(path, want.blake3)
                    publishing.enter_context(self.store.publishing(want.name, file=path))
                except OSError as exc:
                    out.append(exc)
                else:
                    out.append(None)
            renamed = iter(self.store.replace_many(
                [(path, want.name) for (want, _, path), r in zip(ready, out) if r is None]))
            return [r if r is not None else next(renamed) for r in out]

        try:
            try:
                results = await asyncio.to_thread(place)
            except OSError as exc:
                results = [exc] * len(ready)
            for (want, progress, _), result in zip(ready, results):
                if isinstance(result, OSError):
                    await self._failed((want.name, want.blake3), want, progress,
                                       f"store error: {result.strerror or result}")
                else:
                    placed.append((want, progress))
            if not placed:
                return published
            items = [self._available_event(want) for want, _ in placed]
            try:
                appended = await self.append(items[0] if len(items) == 1 else ev.PackagesAvailable(items=items),
                                             actor="replicator")
            except AppendFailed as exc:
                appended = exc
            results = [appended] * len(placed)
        finally:
            await asyncio.shield(asyncio.to_thread(publishing.close))
        for (want, progress), result in zip(placed, results):
            if isinstance(result, AppendFailed):
                await self._failed((want.name, want.blake3), want, progress,
                                   f"could not record availability: {result}")
            else:
                self._done(want, progress)
                published.add(want.blake3)
                log.info("package available", package=want.name, size=want.size)
        return published

    async def _failed(self, key, want: Want, progress: Progress, reason: str) -> None:
        progress.status, progress.detail = "failed", reason
        _, delay = self.backoff.get(key, (0.0, BACKOFF_MIN_S / 2))
        delay = min(delay * 2, BACKOFF_MAX_S)
        self.backoff[key] = (time.monotonic() + delay, delay)
        self._retry[name_key(want.name)] = time.monotonic() + delay
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

