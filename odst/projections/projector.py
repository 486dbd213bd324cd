"""The live projector: tails every local stream and folds it into the read model."""

from __future__ import annotations

import asyncio
from pathlib import Path

import structlog
from nats.js import JetStreamContext

from odst.events.log import read_stream, unfolded
from odst.projections.apply import ReadModelWriter
from odst.projections.db import open_read_model

log = structlog.get_logger("odst.projector")


def errors_text(errors: dict[str, str]) -> str | None:
    """``ProjectionStatus.error`` from the failing streams' errors: the first by name."""
    if not errors:
        return None
    stream = min(errors)
    return f"{stream}: {errors[stream]}"


class Projector:
    def __init__(self, js: JetStreamContext, db_path: Path, trusted: dict[str, bytes],
                 streams: list[str]):
        self.js = js
        self.conn = open_read_model(db_path)
        self.writer = ReadModelWriter(self.conn, trusted)
        self.streams = list(streams)
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        self._errors: dict[str, str] = {}  # stream → why its folding last failed
        self.conn.execute("DELETE FROM projection_errors")  # a past run's: this one finds its own

    @property
    def error(self) -> str | None:
        """Why folding a stream last failed ('STREAM: error'; the first stream by name), None
        while every stream folds. Kept per stream, cleared by that stream's next fold."""
        return errors_text(self._errors)

    def _failed(self, stream: str, error: str) -> None:
        if self._errors.get(stream) != error:
            self._errors[stream] = error
            self.conn.execute("INSERT OR REPLACE INTO projection_errors (stream, error) VALUES (?, ?)",
                              (stream, error))

    def _folded(self, stream: str) -> None:
        if self._errors.pop(stream, None) is not None:
            self.conn.execute("DELETE FROM projection_errors WHERE stream=?", (stream,))

    def checkpoint(self, stream: str) -> int:
        return self.writer.checkpoint(stream)

    def start(self) -> None:
        for s in self.streams:
            self._tasks.append(asyncio.create_task(self._tail(s), name=f"projector:{s}"))

    def add_stream(self, stream: str) -> None:
        """Start tailing another stream (a peer's mirror) from its checkpoint."""
        if stream in self.streams:
            return
        self.streams.append(stream)
        self._tasks.append(asyncio.create_task(self._tail(stream), name=f"projector:{stream}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _tail(self, stream: str) -> None:
        while True:
            try:
                start = self.checkpoint(stream) + 1
                async for msg in read_stream(self.js, stream, start):
                    outcome = self.writer.fold(msg)
                    if not outcome.applied and outcome.reason != "already applied":
                        log.warning("event quarantined", stream=stream, seq=msg.seq,
                                    subject=msg.subject, reason=outcome.reason)
                    async with self._changed:
                        self._changed.notify_all()
                    self._folded(stream)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker hiccup: resume from the checkpoint
                error = f"{type(exc).__name__}: {exc}"
                self._failed(stream, error)
                log.error("projector stream failed; resuming", stream=stream, error=error)
                await asyncio.sleep(1.0)

    async def wait_for(self, stream: str, seq: int, timeout: float = 10.0) -> bool:
        """Wait until stream's checkpoint reaches seq (read-your-writes for the gateway)."""
        async def reached() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: self.checkpoint(stream) >= seq)
        try:
            await asyncio.wait_for(reached(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def wait_changed(self, timeout: float) -> None:
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def lag(self) -> dict[str, int]:
        """Messages in each stream not yet folded (asks the broker)."""
        return {s: await unfolded(self.js, s, self.checkpoint(s)) for s in self.streams}
