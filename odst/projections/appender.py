"""The one write path: append an event to the site's log, then wait until the read model applied it.

Every writer (the gateway's handlers, the replicator, the linker, registration, start-up)
gets a ``ConfirmedAppender``'s ``append``, so that what it reads next already shows what it wrote.
"""

from __future__ import annotations

import sqlite3
from typing import Callable, Protocol

from odst.events import catalogue as ev
from odst.events.log import EVENTS_STREAM, AppendFailed, Appended, EventLog, NotYetApplied
from odst.projections import views
from odst.projections.status import ProjectionStatus


class Append(Protocol):
    async def __call__(self, event: ev.Event, *, actor: str, wait: float = 30.0) -> Appended: ...


class AppendMany(Protocol):
    async def __call__(self, events: list[ev.Event], *, actor: str, wait: float = 30.0,
                       on_published: Callable[[], None] | None = None) -> list[Appended | AppendFailed]: ...


class ConfirmedAppender:
    def __init__(self, events: EventLog, projection: ProjectionStatus, reader: sqlite3.Connection):
        self.events = events
        self.projection = projection
        self.reader = reader

    async def append(self, event: ev.Event, *, actor: str, wait: float = 30.0) -> Appended:
        """Append an event and wait until the read model has applied it (read-your-writes).

        Raises AppendFailed if the projector does not apply it in time or refuses it.
        """
        appended = await self.events.append(event, actor=actor)
        if not await self.projection.wait_for(EVENTS_STREAM, appended.seq, timeout=wait):
            raise NotYetApplied(f"event {appended.envelope.id} was stored but not applied within {wait}s")
        if self.reader.execute("SELECT 1 FROM events WHERE id=?", (appended.envelope.id,)).fetchone() is None:
            q = self.reader.execute("SELECT reason FROM quarantine WHERE stream=? AND stream_seq=?",
                                    (EVENTS_STREAM, appended.seq)).fetchone()
            self.events.forget_head()
            raise AppendFailed(f"event {appended.envelope.id} was refused by the projector: "
                               f"{q[0] if q else 'unknown reason'}")
        return appended

    async def append_many(self, events: list[ev.Event], *, actor: str, wait: float = 30.0,
                          on_published: Callable[[], None] | None = None) -> list[Appended | AppendFailed]:
        """Append several events in one round trip (``EventLog.append_many``), then wait once
        until the read model has applied them all. Per event, its ``Appended`` or the
        ``AppendFailed`` saying why not (not appended, or refused by the projector).
        ``on_published`` is called once the events are handed to the broker's connection
        (``EventLog.append_many``'s ``on_sent``; at the latest once it answered), before their
        acks and the wait for the fold: batch.GroupCommit's next round goes out behind them."""
        results = await self.events.append_many(events, actor=actor, on_sent=on_published)
        if on_published is not None:
            on_published()
        done = [r for r in results if isinstance(r, Appended)]
        if not done:
            return results
        if not await self.projection.wait_for(EVENTS_STREAM, max(r.seq for r in done), timeout=wait):
            return [NotYetApplied(f"event {r.envelope.id} was stored but not applied within {wait}s")
                    if isinstance(r, Appended) else r for r in results]
        applied = {row[0] for row in views.rows_in(self.reader, "SELECT id FROM events WHERE id IN ({marks})",
                                                    [r.envelope.id for r in done])}
        out: list[Appended | AppendFailed] = []
        for r in results:
            if isinstance(r, Appended) and r.envelope.id not in applied:
                q = self.reader.execute("SELECT reason FROM quarantine WHERE stream=? AND stream_seq=?",
                                        (EVENTS_STREAM, r.seq)).fetchone()
                self.events.forget_head()
                r = AppendFailed(f"event {r.envelope.id} was refused by the projector: "
                                 f"{q[0] if q else 'unknown reason'}")
            out.append(r)
        return out
