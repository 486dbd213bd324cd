"""A request/reply service on one NATS subject (core NATS, through the leaf tree)."""

from __future__ import annotations


class NatsService:
    """Subclasses set ``subject`` (and ``queue``) and implement ``_on_request(msg)``."""

    subject: str = ""
    queue: str = ""

    def __init__(self, site):
        self.site = site
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.site.nc.subscribe(self.subject, queue=self.queue, cb=self._on_request)

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is already closing
                pass
            self._sub = None

    async def _on_request(self, msg) -> None:
        raise NotImplementedError
