"""Download caps for Macs: downloads at once (in total and per client address) and total egress.

A wrapper around the distribution point's ASGI app (``gateway/downloads.py`` is not
changed; a body the server sends from the file, the ASGI zero-copy extension, is paced in
1 MiB blocks): a GET beyond a cap is answered ``503`` with ``Retry-After``, so the Mac's
download (curl ``--retry``, the Jamf binary) tries again later instead of failing; a GET
within the caps is served, its body paced by one token bucket shared by every download
when an egress limit is set. The caps are the site's own ``DownloadCapsSet`` choice, read
through ``Bandwidth`` (a second old at most). HEAD and refused requests cost nothing.
Counts are per gateway process: with ``http_workers`` > 1 each worker applies the caps to
its own share of the connections.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable

import structlog

from odst.gateway.protocol import ZEROCOPY
from odst.replicator.bandwidth import DownloadCaps, RateMeter, TokenBucket, default_burst

log = structlog.get_logger("odst.egress")

RETRY_AFTER_S = 2  # what a refused Mac is told; curl --retry waits this long
PACE_BLOCK = 1 << 20  # a zero-copy body under an egress limit goes out in blocks this size


class DownloadGate:
    def __init__(self, caps: Callable[[], DownloadCaps], clock: Callable[[], float] = time.monotonic):
        self.caps, self.clock = caps, clock
        self.active = 0
        self.peak = 0  # most downloads at once since start
        self.refused = 0
        self.by_client: Counter[str] = Counter()
        self.bucket: TokenBucket | None = None
        self.meter = RateMeter()

    def _admit(self, client: str, caps: DownloadCaps) -> str:
        """'' when a download may start now, else why not."""
        if caps.max_concurrent and self.active >= caps.max_concurrent:
            return f"{self.active} downloads in progress, the most this distribution point serves at once"
        if caps.per_client and self.by_client[client] >= caps.per_client:
            return f"this client already has {self.by_client[client]} downloads in progress"
        return ""

    async def _pace(self, n: int, rate: int) -> None:
        now = self.clock()
        if self.bucket is None:
            self.bucket = TokenBucket(rate, default_burst(rate), now)
        elif self.bucket.rate != rate:
            self.bucket.configure(rate, default_burst(rate))
        delay = self.bucket.delay(n, now)
        self.bucket.take(n, now)  # reserve: the next body waits behind this one
        if delay > 0:
            await asyncio.sleep(delay)

    def wrap(self, app):
        async def capped(scope, receive, send) -> None:
            if scope.get("method") != "GET":
                await app(scope, receive, send)
                return
            caps = self.caps()
            client = (scope.get("client") or ("", 0))[0]
            why = self._admit(client, caps)
            if why:
                self.refused += 1
                body = f"busy: {why}; retry after {RETRY_AFTER_S} s\n".encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"retry-after", str(RETRY_AFTER_S).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.by_client[client] += 1

            async def paced(message) -> None:
                kind = message["type"]
                if kind == "http.response.body":
                    n = len(message.get("body", b""))
                    if n:
                        rate = self.caps().egress_bps
                        if rate:
                            await self._pace(n, rate)
                        self.meter.add(n, self.clock())
                elif kind == ZEROCOPY:  # a file's bytes sent by the server: paced a block at a time
                    await self._send_file(message, send)
                    return
                elif message.get(ZEROCOPY) and self.caps().egress_bps:
                    # the body may wait for the bucket: the head must not wait with it
                    message = {k: v for k, v in message.items() if k != ZEROCOPY}
                await send(message)
            try:
                await app(scope, receive, paced)
            finally:
                self.active -= 1
                self.by_client[client] -= 1
                if self.by_client[client] <= 0:
                    del self.by_client[client]
        return capped

    async def _send_file(self, message, send) -> None:
        offset, count = message.get("offset", 0), message["count"]
        end, more = offset + count, message.get("more_body", False)
        while True:
            rate = self.caps().egress_bps
            n = min(PACE_BLOCK, end - offset) if rate else end - offset
            if rate:
                await self._pace(n, rate)
            self.meter.add(n, self.clock())
            offset += n
            await send({**message, "offset": offset - n, "count": n, "more_body": more or offset < end})
            if offset >= end:
                return

    def status(self) -> dict:
        caps = self.caps()
        return {"egress_bps": caps.egress_bps, "max_concurrent": caps.max_concurrent,
                "per_client": caps.per_client, "active": self.active, "peak": self.peak,
                "refused": self.refused, "measured_bps": round(self.meter.rate(self.clock())),
                "retry_after_s": RETRY_AFTER_S}
