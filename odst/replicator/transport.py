"""Chunk transports: how one site fetches a 1 MiB chunk of a content from another.

Two implementations of one ``ChunkSource`` protocol (contract-tested together with the
tests' in-memory one, tests/system/test_contracts.py):
HTTP from the peer's gateway (fast path), and NATS request/reply on the peer's
``odst.<site>.chunk`` subject through the leaf tree (for sites that only dial
out). Both sign every request with the site key. The serving side of both is
``ChunkServer``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import Counter
from typing import Protocol

import aiohttp
import structlog

from odst.bus.service import NatsService
from odst.events.signing import SiteKey
from odst.naming import ascii_int
from odst.projections import views
from odst.projections.apply import trusted_key
from odst.store.files import PackageStore
from odst.replicator.bandwidth import Bandwidth, LinkThrottled
from odst.store.hashing import chunk_span
from odst.peering.requests import PeerRequestRefused, RequestVerifier, sign_request

log = structlog.get_logger("odst.transport")

CHUNK_METHOD = "CHUNK"


class ChunkUnavailable(Exception):
    """The source does not have this chunk (or refused to serve it)."""


class TransportFailed(Exception):
    """The source could not be reached or did not answer in time."""


class SourceThrottled(TransportFailed):
    """The source holds this chunk back for now (its link is paused or at its limit): ask
    again after ``retry_after`` seconds; the source is not at fault."""

    def __init__(self, detail: str, retry_after: float):
        super().__init__(detail)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.1), 30.0)
    except ValueError:
        return 1.0


def chunk_subject(site: str) -> str:
    return f"odst.{site}.chunk"


def chunk_target(blake3: str, index: int) -> str:
    return f"/peer/v1/chunks/{blake3}/{index}"


class ChunkSource(Protocol):
    site: str
    kind: str

    async def fetch(self, blake3: str, index: int) -> bytes: ...


class HttpChunkSource:
    """GET /peer/v1/chunks/<blake3>/<index> from the peer's gateway (aiohttp: twice httpx's
    throughput for 1 MiB bodies, measured)."""

    kind = "http"

    def __init__(self, site: str, base_url: str, key: SiteKey, session: aiohttp.ClientSession):
        self.site, self.base_url, self.key, self.session = site, base_url.rstrip("/"), key, session

    async def fetch(self, blake3: str, index: int) -> bytes:
        target = chunk_target(blake3, index)
        try:
            async with self.session.get(self.base_url + target,
                                        headers=sign_request(self.key, "GET", target)) as r:
                body = await r.read()
                status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise TransportFailed(f"{self.site} over HTTP: {type(exc).__name__}: {exc}") from None
        if status == 200:
            return body
        detail = body[:200].decode("utf-8", "replace")
        if status == 503 and "retry-after" in (k.lower() for k in r.headers):
            raise SourceThrottled(f"{self.site} over HTTP: {detail}", _retry_after(r.headers.get("Retry-After")))
        if status in (403, 404):
            raise ChunkUnavailable(f"{self.site} over HTTP: {status} {detail}")
        raise TransportFailed(f"{self.site} over HTTP: {status} {detail}")


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, limit_per_host=16),
        timeout=aiohttp.ClientTimeout(total=60, connect=5),
        auto_decompress=False)


class NatsChunkSource:
    kind = "nats"

    def __init__(self, site: str, nc, key: SiteKey, timeout: float = 15.0):
        self.site, self.nc, self.key, self.timeout = site, nc, key, timeout

    async def fetch(self, blake3: str, index: int) -> bytes:
        target = chunk_target(blake3, index)
        try:
            msg = await self.nc.request(chunk_subject(self.site), b"", timeout=self.timeout,
                                        headers=sign_request(self.key, CHUNK_METHOD, target) | {"target": target})
        except Exception as exc:  # nats timeout / no responders / connection closed
            raise TransportFailed(f"{self.site} over NATS: {type(exc).__name__}") from None
        status = (msg.headers or {}).get("odst-status", "")
        if status == "200":
            return msg.data
        detail = (msg.headers or {}).get("odst-error", "")
        if status == "503":
            raise SourceThrottled(f"{self.site} over NATS: {detail}", _retry_after(msg.headers.get("retry-after")))
        if status in ("403", "404"):
            raise ChunkUnavailable(f"{self.site} over NATS: {status} {detail}")
        raise TransportFailed(f"{self.site} over NATS: {status or 'no status'} {detail}")


class ChunkServer(NatsService):
    """Serves chunks of the contents this site holds, to trusted peers only (NATS here,
    HTTP through the gateway's /peer/v1/chunks route)."""

    queue = "chunk"

    def __init__(self, *, site_id: str, key: SiteKey, nc, reader: sqlite3.Connection, store: PackageStore,
                 bandwidth: Bandwidth | None = None):
        super().__init__(nc, key)
        self.site_id, self.reader, self.store = site_id, reader, store
        self.bandwidth = bandwidth  # send limits per peer (odst.replicator.bandwidth)
        self.subject = chunk_subject(site_id)
        self.verifier = RequestVerifier(self._key_of)
        self.served: Counter[str] = Counter()  # chunks served, per requesting peer

    def _key_of(self, site_id: str) -> bytes | None:
        if site_id == self.site_id:
            return None
        removed = self.reader.execute("SELECT 1 FROM removals WHERE site=?", (site_id,)).fetchone()
        if removed:
            return None
        return trusted_key(self.reader, {}, site_id)

    def locate(self, blake3: str, index: int) -> tuple[str, int, int]:
        """(path, offset, length) of a chunk of a content held here, or ChunkUnavailable."""
        row = views.local_content(self.reader, blake3, self.site_id)
        if row is None:
            raise ChunkUnavailable("content not held here")
        offset, length = chunk_span(index, row["size"], row["chunk_size"]) if index >= 0 else (0, 0)
        if not length:
            raise ChunkUnavailable("chunk index out of range")
        return str(self.store.path(row["name"])), offset, length

    async def read(self, blake3: str, index: int, peer: str = "") -> bytes:
        """The chunk's bytes; for a ``peer``, once its link's send limit lets them go
        (LinkThrottled: not now)."""
        path, offset, length = self.locate(blake3, index)
        if peer and self.bandwidth is not None:
            await self.bandwidth.send(peer, length, blake3=blake3)

        def pread() -> bytes:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        try:
            data = await asyncio.to_thread(pread)
        except FileNotFoundError:
            raise ChunkUnavailable("content file missing") from None
        if len(data) != length:
            raise ChunkUnavailable("content file shorter than its manifest")
        return data

    def authorise(self, method: str, target: str, headers: dict[str, str]) -> str:
        return self.verifier.verify(method, target, {k.lower(): v for k, v in headers.items()})

    async def _on_request(self, msg) -> None:
        headers = {k.lower(): v for k, v in (msg.headers or {}).items()}
        target = headers.get("target", "")
        try:
            peer = self.authorise(CHUNK_METHOD, target, headers)
            parts = target.split("/")
            index = ascii_int(parts[5]) if len(parts) == 6 and parts[:4] == ["", "peer", "v1", "chunks"] else None
            if index is None:
                raise ChunkUnavailable("malformed chunk target")
            data = await self.read(parts[4], index, peer)
            await self.nc.publish(msg.reply, data, headers={"odst-status": "200"})
            self.served[peer] += 1
            log.debug("chunk served over NATS", peer=peer, target=target)
        except PeerRequestRefused as exc:
            log.warning("peer chunk request refused", reason=str(exc), transport="nats")
            await self.nc.publish(msg.reply, b"", headers={"odst-status": "403", "odst-error": str(exc)})
        except ChunkUnavailable as exc:
            await self.nc.publish(msg.reply, b"", headers={"odst-status": "404", "odst-error": str(exc)})
        except LinkThrottled as exc:
            await self.nc.publish(msg.reply, b"", headers={"odst-status": "503", "odst-error": str(exc),
                                                           "retry-after": f"{exc.retry_after:.1f}"})
        except Exception as exc:  # never let one request kill the subscription
            log.exception("chunk request failed")
            await self.nc.publish(msg.reply, b"", headers={"odst-status": "500",
                                                               "odst-error": type(exc).__name__})
