"""The one write path: append an event to the site's log, then wait until the read model applied it.

Every writer (the gateway's handlers, the replicator, the linker, registration, start-up)
gets a ``ConfirmedAppender``'s ``append``, so that what it reads next already shows what it wrote.
"""

from __future__ import annotations

import sqlite3
from typing import Protocol

from odst.events import catalogue as ev
from odst.events.log import EVENTS_STREAM, AppendFailed, Appended, EventLog
from odst.projections.status import ProjectionStatus


class Append(Protocol):
    async def __call__(self, event: ev.Event, *, actor: str, wait: float = 30.0) -> Appended: ...


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
            raise AppendFailed(f"event {appended.envelope.id} was stored but not applied within {wait}s")
        if self.reader.execute("SELECT 1 FROM events WHERE id=?", (appended.envelope.id,)).fetchone() is None:
            q = self.reader.execute("SELECT reason FROM quarantine WHERE stream=? AND stream_seq=?",
                                    (EVENTS_STREAM, appended.seq)).fetchone()
            self.events.forget_head()
            raise AppendFailed(f"event {appended.envelope.id} was refused by the projector: "
                               f"{q[0] if q else 'unknown reason'}")
        return appended
