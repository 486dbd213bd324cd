"""NATS building blocks: a request/reply service on one subject (core NATS, through the
leaf tree), and a worker loop over a JetStream pull consumer."""

from __future__ import annotations

import asyncio

import nats.errors
import structlog

from odst.events.signing import SiteKey

log = structlog.get_logger("odst.bus")


async def consume(psub, handle, what: str) -> None:
    """Take messages one at a time from a pull subscription and ``await handle(msg)``,
    forever: an empty fetch waits again, a broker hiccup is logged and retried, a
    failing handler is logged (the message is redelivered unless ``handle`` acked it)."""
    while True:
        try:
            msgs = await psub.fetch(1, timeout=5)
        except nats.errors.TimeoutError:
            continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # broker reconnecting
            log.warning(f"{what}: fetch failed; retrying", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(1.0)
            continue
        for msg in msgs:
            try:
                await handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(f"{what}: handling a message failed")


class NatsService:
    """Subclasses set ``subject`` (and ``queue``) and implement ``_on_request(msg)``."""

    subject: str = ""
    queue: str = ""

    def __init__(self, nc, key: SiteKey):
        self.nc, self.key = nc, key
        self._sub = None

    async def start(self) -> None:
        # The queue group's name is a secret of the site's: a consumer on the event log whose
        # deliver_group names it would hand the log to this service as requests (NATS
        # permissions see subjects, not consumer configurations); a name no one else can
        # know leaves such a consumer with no one to deliver to.
        queue = self.key.derive(f"queue:{self.queue}".encode()).hex()[:24] if self.queue else ""
        self._sub = await self.nc.subscribe(self.subject, queue=queue, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is already closing
                pass
            self._sub = None

    async def _on_request(self, msg) -> None:
        raise NotImplementedError
