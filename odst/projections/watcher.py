"""What a process without the projector (a separate gateway or replicator) knows of it.

The same ``ProjectionStatus`` as ``Projector`` (odst.projections.status) — checkpoint,
wait_for, wait_changed, lag, error — by polling the read model the projector process writes.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from odst.events.log import EVENTS_STREAM, unfolded
from odst.projections.db import connect
from odst.projections.projector import errors_text

POLL_S = 0.02
# wait_for (an append waiting for its fold) looks this soon first, then twice as late each time,
# up to POLL_S: a fold takes a few ms, and at a flat 20 ms a gateway process's uploads waited
# ~10 ms more each than the projector process's (each look is one indexed read, ~20 us).
FIRST_POLL_S = 0.001


class ReadModelWatcher:
    def __init__(self, js, db_path: Path):
        self.js = js
        self.db_path = Path(db_path)
        self.conn: sqlite3.Connection | None = None
        self.writer = None

    @property
    def error(self) -> str | None:
        """The projector process's ``error``, as it records it in the read model."""
        if self.conn is None:
            return None
        try:
            rows = self.conn.execute("SELECT stream, error FROM projection_errors").fetchall()
        except sqlite3.OperationalError:
            return None  # a read model from before the table (its projector not upgraded yet)
        return errors_text({r[0]: r[1] for r in rows})

    async def wait_ready(self, site_id: str, timeout: float, bootstrap_s: float = 30.0) -> None:
        """Wait until the projector has created the read model, folded this site's first event
        and, on a first start, its bootstrap admin token (a gateway answering before that would
        refuse the token it was started with): at most ``bootstrap_s`` after the first event,
        since a projector that finds its log damaged makes no token."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        founded_at = None
        while True:
            if self.db_path.exists():
                try:
                    if self.conn is None:
                        self.conn = connect(self.db_path)
                    if self.conn.execute("SELECT 1 FROM sites WHERE site=?", (site_id,)).fetchone():
                        founded_at = founded_at or loop.time()
                        if (self.conn.execute("SELECT 1 FROM tokens WHERE site=? LIMIT 1", (site_id,)).fetchone()
                                or loop.time() - founded_at > bootstrap_s):
                            return
                except sqlite3.OperationalError:
                    pass  # schema not created yet
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"no projector has built {self.db_path} within {timeout}s: "
                                   "start `odst projector` (or `odst serve`) on this data directory")
            await asyncio.sleep(0.1)

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()

    def add_stream(self, stream: str) -> None:
        pass  # the projector process tails streams

    def checkpoint(self, stream: str) -> int:
        row = self.conn.execute("SELECT seq FROM checkpoints WHERE stream=?", (stream,)).fetchone()
        return row[0] if row else 0

    def _generation(self) -> int:
        return self.conn.execute("SELECT coalesce(sum(seq), 0) FROM checkpoints").fetchone()[0]

    async def wait_for(self, stream: str, seq: int, timeout: float = 10.0) -> bool:
        deadline = asyncio.get_running_loop().time() + timeout
        pause = FIRST_POLL_S
        while self.checkpoint(stream) < seq:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL_S)
        return True

    async def wait_changed(self, timeout: float) -> None:
        before = self._generation()
        deadline = asyncio.get_running_loop().time() + timeout
        while self._generation() == before and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(POLL_S * 5)

    async def lag(self) -> dict[str, int]:
        streams = {r[0] for r in self.conn.execute("SELECT stream FROM checkpoints")} | {EVENTS_STREAM}
        return {s: await unfolded(self.js, s, self.checkpoint(s)) for s in sorted(streams)}
