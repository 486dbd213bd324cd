"""The live projector: tails every local stream and folds it into the read model."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import threading
from pathlib import Path

import structlog
from nats.js import JetStreamContext

from odst import tasks
from odst.events.log import read_stream, unfolded
from odst.projections.apply import ReadModelWriter
from odst.projections.db import connect, open_read_model

log = structlog.get_logger("odst.projector")


# While catching up, whoever waits for a change (replicator, dispatcher, linker, Jamf sync,
# SSE) is woken once this often, not after every event: each wake-up is a pass over the read
# model, and one per event made catching up with a big log quadratic. A fold that leaves
# nothing more to read wakes them at once.
NOTIFY_EVERY_S = 0.1

# Messages folded in one transaction while more are known to follow (a catch-up): one
# commit, and one wake-up of the waiters, for the run instead of one per event. Bounds how
# long one fold holds the event loop.
FOLD_BATCH = 64

# The projector's connection does not checkpoint the read model's WAL itself: SQLite's
# automatic checkpoint runs inside the COMMIT that crosses its threshold (every ~4 MiB of
# WAL), on the event loop, and writes the pages back with two fsyncs: in a catch-up a
# second in ten of each site's loop was spent there. A thread checkpoints instead (PASSIVE:
# never waits on a reader or the writer), at most this often while folds commit. What is
# durable when is unchanged (WAL, synchronous=NORMAL: a commit is in the WAL; a checkpoint
# fsyncs the WAL before writing the database file).
CHECKPOINT_EVERY_S = 1.0

GAP_REASON = "gap in "  # how apply.py opens a chain gap's reason ("gap in <site>'s chain: …")


def quarantined_gap(conn: sqlite3.Connection, stream: str) -> int | None:
    """The stream seq of the first chain gap quarantined in ``stream``, if any."""
    return conn.execute(f"SELECT min(stream_seq) FROM quarantine WHERE stream=? AND violation=1"
                        f" AND reason LIKE '{GAP_REASON}%'", (stream,)).fetchone()[0]


def rewind_for_gap(conn: sqlite3.Connection, stream: str, gap: int, first_seq: int) -> int | None:
    """Where to fold ``stream`` again from, if the chain gap quarantined at ``gap`` has
    messages before it in the stream that this read model never folded; else None.

    A reader that skipped messages (read_stream before it pulled: the client dropped what its
    caller was too slow for) left exactly that: the next event of the origin quarantined as a
    gap, and every later one too, while the missing ones sit in the stream below the
    checkpoint. Rewinding to the last event applied before the gap, and clearing the
    quarantine after it, lets the re-read fold them all in order; whatever is still due is
    quarantined again. A true gap (every message before it folded, or the stream starts
    after it: ``first_seq``) is left as it is, as is a stream with anything applied after the
    gap (re-reading it would be a replay).
    """
    if conn.execute("SELECT 1 FROM events WHERE stream=? AND stream_seq > ? LIMIT 1", (stream, gap)).fetchone():
        return None
    applied = conn.execute("SELECT coalesce(max(stream_seq), 0) FROM events WHERE stream=? AND stream_seq < ?",
                           (stream, gap)).fetchone()[0]
    low = max(applied, first_seq - 1)
    folded = conn.execute("SELECT count(*) FROM quarantine WHERE stream=? AND stream_seq > ? AND stream_seq < ?",
                          (stream, low, gap)).fetchone()[0]
    if folded >= gap - 1 - low:
        return None
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("DELETE FROM quarantine WHERE stream=? AND stream_seq > ?", (stream, applied))
        conn.execute("UPDATE checkpoints SET seq=? WHERE stream=?", (applied, stream))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied


class WalCheckpointer:
    """A connection of its own that checkpoints a database's WAL when asked (from a thread).
    PASSIVE: copies what no reader still needs, waits for nobody; the next writer then
    starts the WAL over from its beginning."""

    def __init__(self, path: Path):
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # run and close, one at a time, from any thread

    def run(self) -> tuple[int, int, int]:
        """(busy, WAL frames, frames checkpointed), as PRAGMA wal_checkpoint reports them."""
        with self._lock:
            if self._conn is None:
                self._conn = connect(self.path)
            return tuple(self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


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
        self.conn.execute("PRAGMA wal_autocheckpoint=0")  # _checkpoints does it, off the loop
        self._checkpointer = WalCheckpointer(db_path)
        self.writer = ReadModelWriter(self.conn, trusted)
        self.streams = list(streams)
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task] = []
        self._errors: dict[str, str] = {}  # stream → why its folding last failed
        self._rewound: set[tuple[str, int]] = set()  # (stream, gap seq) folded again this run
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
        self._tasks.append(asyncio.create_task(self._checkpoints(), name="projector:checkpoints"))

    async def _checkpoints(self) -> None:
        """Checkpoint the WAL in a thread once a second while folds have committed since."""
        done = self.conn.total_changes
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            if self.conn.total_changes == done:
                continue
            done = self.conn.total_changes
            try:
                await asyncio.shield(asyncio.to_thread(self._checkpointer.run))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a busy or full disk: tried again next time
                log.warning("read model checkpoint failed; trying again", error=f"{type(exc).__name__}: {exc}")

    def add_stream(self, stream: str) -> None:
        """Start tailing another stream (a peer's mirror) from its checkpoint."""
        if stream in self.streams:
            return
        self.streams.append(stream)
        self._tasks.append(asyncio.create_task(self._tail(stream), name=f"projector:{stream}"))

    async def stop(self) -> None:
        await tasks.cancel(*self._tasks)
        self._tasks.clear()
        await asyncio.to_thread(self._checkpointer.close)

    async def _heal(self, stream: str) -> bool:
        """Rewind ``stream`` to before a gap it can fill (``rewind_for_gap``); True if it did."""
        gap = quarantined_gap(self.conn, stream)
        if gap is None or (stream, gap) in self._rewound:  # once per gap and run: never a loop
            return False
        first_seq = (await self.js.stream_info(stream)).state.first_seq
        checkpoint = self.checkpoint(stream)
        rewound = rewind_for_gap(self.conn, stream, gap, first_seq)
        if rewound is None:
            return False
        self._rewound.add((stream, gap))
        log.warning("chain gap can be filled from the stream; folding it again", stream=stream,
                    seq=rewound + 1, checkpoint=checkpoint)
        return True

    async def _tail(self, stream: str) -> None:
        while True:
            try:
                await self._heal(stream)
                start = self.checkpoint(stream) + 1
                gap_checked = False  # once per read: a gap seen while reading from here
                clock = asyncio.get_running_loop().time
                notified = clock()
                # open for reading again: a broker error is over (a fold error recurs at once)
                reopened = functools.partial(self._folded, stream)
                async with contextlib.aclosing(read_stream(self.js, stream, start, on_open=reopened)) as messages:
                    batch: list = []
                    async for msg in messages:
                        batch.append(msg)
                        if msg.pending and len(batch) < FOLD_BATCH:
                            continue  # more are on their way: fold them together
                        run, batch = batch, []
                        rewound = False
                        while run:
                            outcomes = self.writer.fold_many(run, stop=lambda o: o.reason.startswith(GAP_REASON)
                                                             and not gap_checked)
                            for m, outcome in zip(run, outcomes):
                                if not outcome.applied and outcome.reason != "already applied":
                                    log.warning("event quarantined", stream=stream, seq=m.seq,
                                                subject=m.subject, reason=outcome.reason)
                            run = run[len(outcomes):]
                            if outcomes and outcomes[-1].reason.startswith(GAP_REASON) and not gap_checked:
                                gap_checked = True
                                if await self._heal(stream):
                                    rewound = True
                                    break
                        if not msg.pending or clock() - notified >= NOTIFY_EVERY_S:
                            async with self._changed:
                                self._changed.notify_all()
                            notified = clock()
                        self._folded(stream)
                        if rewound:
                            break  # read again from the rewound checkpoint
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker hiccup: resume from the checkpoint
                error = f"{type(exc).__name__}: {exc}"
                self._failed(stream, error)
                log.error("projector stream failed; resuming", stream=stream, error=error)
                await asyncio.sleep(1.0)

    # Both wait inside the caller's task (asyncio.timeout), not in an inner task of
    # asyncio.wait_for: a caller cancelled while wait_for was cancelling its inner wait released
    # the condition's lock from a task that did not hold it ("Lock is not acquired"), and the
    # projector then stopped folding: seen under load, a catch-up stalled for good.
    async def wait_for(self, stream: str, seq: int, timeout: float = 10.0) -> bool:
        """Wait until stream's checkpoint reaches seq (read-your-writes for the gateway)."""
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(lambda: self.checkpoint(stream) >= seq)
            return True
        except TimeoutError:
            return False

    async def wait_changed(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait()
        except TimeoutError:
            pass

    async def lag(self) -> dict[str, int]:
        """Messages in each stream not yet folded (asks the broker)."""
        return {s: await unfolded(self.js, s, self.checkpoint(s)) for s in self.streams}
