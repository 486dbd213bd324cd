"""Runs the notification parts a site process was given (``odst.bootstrap`` picks them by role).

Fan-out and email digests run once per site (with the projector, the one
read-model writer); webhook delivery workers run with every replicator (they
share one durable consumer, so each delivery is done by one of them). The
ledger is pruned once per site too, with the projector.
"""

from __future__ import annotations

import asyncio

import structlog

from odst import tasks
from odst.notify.ledger import PRUNE_BATCH, RETAIN_MS, Ledger, now_ms

log = structlog.get_logger("odst.notify")

PRUNE_EVERY_S = 3600.0


class Pruner:
    """Deletes the ledger's finished rows older than ``retain_ms``: at start, then every ``every_s``."""

    def __init__(self, ledger: Ledger, every_s: float = PRUNE_EVERY_S, retain_ms: int = RETAIN_MS):
        self.ledger = ledger
        self.every_s = every_s
        self.retain_ms = retain_ms
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="notify-pruner")

    async def stop(self) -> None:
        await tasks.cancel(self._task)

    async def prune_once(self) -> int:
        cutoff, total = now_ms() - self.retain_ms, 0
        while True:
            gone = self.ledger.prune(cutoff)
            total += gone
            if gone < PRUNE_BATCH:
                return total
            await asyncio.sleep(0)  # batches: let deliveries write between them

    async def _loop(self) -> None:
        while True:
            try:
                if gone := await self.prune_once():
                    log.info("notification ledger pruned", rows=gone, retain_days=self.retain_ms / 86_400_000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("notification ledger prune failed; will retry", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.every_s)  # a timer: age is a matter of the clock


class Notifier:
    """Starts its parts in order and stops them in reverse; closes the ledger they share."""

    def __init__(self, ledger: Ledger, parts: list):
        self.ledger = ledger
        self.parts = parts

    async def start(self) -> "Notifier":
        for part in self.parts:
            await part.start()
        return self

    async def stop(self) -> None:
        for part in reversed(self.parts):
            await part.stop()
        self.ledger.close()
