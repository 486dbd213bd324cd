"""The replicator: make this site hold every current package its stage policy accepts.

Reacts to every change of the read model: links new peers (mirrors), removes
files of deleted packages, and pulls missing contents from every site that
holds them (see ``puller``), then records PackageAvailable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import structlog

from odst.events import catalogue as ev
from odst.events.log import AppendFailed
from odst.projections import views
from odst.replicator.puller import Progress, Puller, TransferFailed, Want
from odst.replicator.transport import HttpChunkSource, NatsChunkSource, http_session

log = structlog.get_logger("odst.replicator")

HTTP_BASE_COST = 0.0
NATS_BASE_COST = 50.0  # used when HTTP is absent or failing
BACKOFF_MIN_S, BACKOFF_MAX_S = 2.0, 300.0


class Replicator:
    def __init__(self, site):
        self.site = site
        self.progress: dict[tuple[str, str], Progress] = {}
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}
        self.backoff: dict[tuple[str, str], tuple[float, float]] = {}
        self.last_failure: dict[tuple[str, str], str] = {}
        self.bad_chunks: Counter[str] = Counter()
        self.http = None  # aiohttp session, made inside the running loop
        self.sem = asyncio.Semaphore(max(1, site.settings.replication_packages))
        self._loop_task: asyncio.Task | None = None
        self._kick = asyncio.Event()

    def start(self) -> None:
        self.http = http_session()
        self._loop_task = asyncio.create_task(self._loop(), name="replicator")

    async def stop(self) -> None:
        tasks = [t for t in [self._loop_task, *self.tasks.values()] if t]
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
            waiter = asyncio.ensure_future(self.site.projector.wait_changed(2.0))
            kicked = asyncio.ensure_future(self._kick.wait())
            await asyncio.wait([waiter, kicked], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            kicked.cancel()
            self._kick.clear()

    async def reconcile(self) -> None:
        await self.site.linker.sync()
        self.remove_deleted()
        now = time.monotonic()
        wanted = views.wanted(self.site.reader, self.site.id, self.site.settings.accepted_stages)
        wanted_keys = set()
        for row in wanted:
            key = (row["name"], row["blake3"])
            wanted_keys.add(key)
            if key in self.tasks:
                continue
            until = self.backoff.get(key, (0.0, 0.0))[0]
            if now < until:
                continue
            self.tasks[key] = asyncio.create_task(self._transfer(row), name=f"pull:{row['name']}")
        for key in list(self.progress):
            if key not in wanted_keys and key not in self.tasks:
                del self.progress[key]

    def remove_deleted(self) -> None:
        """Files whose name no longer has any live content were deleted somewhere: remove them."""
        live = views.live_names(self.site.reader)
        store = self.site.store
        for p in store.packages.iterdir():
            if p.name in live or p.name in self.site.publishing:
                continue
            if store.remove(p.name):
                log.info("removed a deleted package", package=p.name)
        for p in store.tmp.glob("*.repl"):
            if p.stem not in {k[1] for k in self.tasks} and not views.content_is_live(self.site.reader, p.stem):
                p.unlink(missing_ok=True)

    def _sources(self, sites: list[str]) -> list[tuple]:
        peers = {p["site"]: p for p in views.peer_sites(self.site.reader, self.site.id)}
        out = []
        for sid in sites:
            url = peers.get(sid, {}).get("http_url", "")
            if url:
                out.append((HttpChunkSource(sid, url, self.site.key, self.http), HTTP_BASE_COST))
            out.append((NatsChunkSource(sid, self.site.nc, self.site.key), NATS_BASE_COST))
        return out

    def _bad_source(self, site: str, reason: str) -> None:
        self.bad_chunks[site] += 1
        log.warning("peer served a corrupt chunk", peer=site, reason=reason, total=self.bad_chunks[site])

    async def _transfer(self, row) -> None:
        key = (row["name"], row["blake3"])
        want = Want(name=row["name"], blake3=row["blake3"], size=row["size"], sha1=row["sha1"],
                    sha512=row["sha512"], chunk_size=row["chunk_size"], chunks=tuple(json.loads(row["chunks"])),
                    stage=row["stage"], origin=row["origin"], uploaded_ts=row["uploaded_at"],
                    uploaded_by=row["uploaded_by"])
        progress = self.progress.setdefault(key, Progress(want.name, want.blake3, len(want.chunks)))
        try:
            sites = views.sources(self.site.reader, want.name, want.blake3, self.site.id)
            if not sites:
                progress.status, progress.detail = "pending", "waiting for a site that holds it"
                return
            progress.status, progress.detail = "pending", "waiting for a transfer slot"
            async with self.sem:
                progress.started = time.monotonic()
                progress.bytes = 0
                puller = Puller(want, self._sources(sites), self.site.store.tmp,
                                streams=self.site.settings.replication_streams, progress=progress,
                                on_bad_source=self._bad_source)
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
        current = views.package(self.site.reader, want.name)
        if current is None or current["blake3"] != want.blake3:
            path.unlink(missing_ok=True)
            log.info("content no longer current; discarded", package=want.name)
            return False
        self.site.publishing.add(want.name)
        try:
            self.site.store.replace(path, want.name)
            await self.site.append(ev.PackageAvailable(
                name=want.name, size=want.size, sha1=want.sha1, sha512=want.sha512, blake3=want.blake3,
                chunk_size=want.chunk_size, chunks=list(want.chunks), stage=want.stage, origin=want.origin,
                uploaded_ts=want.uploaded_ts, uploaded_by=want.uploaded_by), actor="replicator")
        finally:
            self.site.publishing.discard(want.name)
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
                await self.site.append(ev.PackageTransferFailed(name=want.name, blake3=want.blake3,
                                                                reason=reason[:500]), actor="replicator")
            except AppendFailed:
                pass
        asyncio.get_running_loop().call_later(delay, self.kick)

    def transfers(self) -> list[dict]:
        return [p.as_dict() for p in self.progress.values()]

