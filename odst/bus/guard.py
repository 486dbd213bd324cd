"""Consumers on the event streams that deliver somewhere they must not: found and deleted.

A peer may create consumers on this site's ``EVENTS`` (that is how its mirror reads the
log), and a subscriber may create consumers named after itself; NATS permissions govern the
subjects of those requests, not the configuration in their bodies. A push consumer's
``deliver_subject`` and ``deliver_group`` could therefore aim the log at this site's own
services (``odst.<site>.chunk`` with the queue group its chunk server uses, the
registration service), which would then receive the log as junk requests. The guard
watches JetStream's consumer-created advisories, and sweeps every stream now and then,
and deletes every consumer on ``EVENTS`` or a ``PEER_*`` mirror that delivers anywhere
but a mirror's own subject (``$JS.M.…``), this site's own inbox, or a subscriber's own
inbox. Deleting a consumer loses nothing: the log is untouched.
"""

from __future__ import annotations

import asyncio
import json

import structlog

from odst import tasks
from odst.bus.authorization import private_inbox, subscriber_inbox

log = structlog.get_logger("odst.guard")

ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.CREATED.>"
SWEEP_EVERY_S = 60.0


def policed(stream: str) -> bool:
    return stream == "EVENTS" or stream.startswith("PEER_")


def refusal(site: str, name: str, config: dict, subscribers: set[str]) -> str:
    """Why a consumer on an event stream must go ('' when it may stay). ``config`` is the
    consumer's configuration as JetStream's JSON has it."""
    if config.get("deliver_group"):
        return f"delivers to queue group {config['deliver_group']!r}"
    subject = config.get("deliver_subject") or ""
    if not subject:
        return ""  # a pull consumer delivers only to whoever asks (and may ask)
    if subject.startswith("$JS.M.") or subject.startswith(f"{private_inbox(site)}."):
        return ""
    if name in subscribers and subject.startswith(f"{subscriber_inbox(name)}."):
        return ""
    return f"delivers to {subject[:200]!r}"


class ConsumerGuard:
    def __init__(self, nc, js, site: str, subscribers):
        """``subscribers()`` returns the names of the active subscriber credentials."""
        self.nc, self.js, self.site, self.subscribers = nc, js, site, subscribers
        self.deleted = 0
        self._sub = None
        self._task: asyncio.Task | None = None
        self._pending: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()

    async def start(self) -> "ConsumerGuard":
        self._sub = await self.nc.subscribe(ADVISORY, cb=self._on_advisory)
        self._task = asyncio.create_task(self._run(), name="consumer-guard")
        return self

    async def stop(self) -> None:
        await tasks.cancel(self._task)
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass

    async def _on_advisory(self, msg) -> None:
        try:
            advisory = json.loads(msg.data)
            stream, name = advisory["stream"], advisory["consumer"]
        except (ValueError, KeyError, TypeError):
            return
        if policed(stream):
            self._pending.add((stream, name))
            self._wake.set()

    async def _run(self) -> None:
        await self.sweep()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), SWEEP_EVERY_S)
            except asyncio.TimeoutError:
                await self.sweep()
                continue
            self._wake.clear()
            pending, self._pending = self._pending, set()
            for stream, name in sorted(pending):
                await self._check(stream, name)

    async def sweep(self) -> None:
        """Every consumer of every event stream (advisories are lost while disconnected)."""
        try:
            for info in await self.js.streams_info():
                if policed(info.config.name):
                    for c in await self.js.consumers_info(info.config.name):
                        await self._check(info.config.name, c.name)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("consumer sweep failed; trying again later", error=f"{type(exc).__name__}: {exc}")

    async def _check(self, stream: str, name: str) -> None:
        try:
            reply = await self.nc.request(f"$JS.API.CONSUMER.INFO.{stream}.{name}", b"", timeout=5)
            config = json.loads(reply.data).get("config")
            if config is None:
                return  # gone already
            why = refusal(self.site, name, config, set(self.subscribers()))
            if not why:
                return
            await self.nc.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}", b"", timeout=5)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("could not check a consumer", stream=stream, consumer=name,
                        error=f"{type(exc).__name__}: {exc}")
            return
        self.deleted += 1
        log.warning("deleted a consumer that aimed the log elsewhere", stream=stream, consumer=name, reason=why)
