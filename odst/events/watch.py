"""A site watching its own log: is EVENTS still the stream the read model was folded from?

Signatures stop forgery, not destruction: anyone allowed to reach the broker's JetStream API
can cut a stream (a ``max_msgs`` of 1 erases all but the last message at once), delete it or
loosen its configuration. The read model remembers what it folded — a checkpoint per stream
and, per origin, the first and last event with their exact bytes — so a site can tell.

``assess`` is the one rule, a pure function used by the live ``LogWatch``, ``odst audit``
and ``odst rebuild``. While the watch finds a problem, ``/healthz`` answers 503 with it,
appends are refused (appending to a cut stream would start a second history, and with a
limit in place every append would erase another event), and an alert is raised once per
problem: an error log line and a ``LogAlert`` notification (``<data>/alerts.sqlite``, fanned
out by the notification dispatcher like ``MessageQuarantined``).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext

from odst import tasks
from odst.events.log import EventLog, config_drift

log = structlog.get_logger("odst.logwatch")

CHECK_EVERY_S = 2.0
LOG_ALERT = "LogAlert"


@dataclass(frozen=True, slots=True)
class Landmark:
    """An event the read model folded from a stream: where it sits and its exact bytes."""

    stream_seq: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Recorded:
    """What the read model holds of one stream."""

    checkpoint: int = 0  # last stream sequence folded (events and junk alike)
    first: Landmark | None = None  # the origin's first event (SiteFounded), if folded from this stream
    last: Landmark | None = None  # the origin's last folded event, if folded from this stream


async def assess(js: JetStreamContext, stream: str, recorded: Recorded,
                 expected: dict[str, object] | None = None) -> list[str]:
    """Every way ``stream`` is no longer what the read model recorded; [] if none.

    Raises nats errors if the broker does not answer (the caller says 'unreachable').
    """
    try:
        info = await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        if recorded.checkpoint:
            return [f"{stream} is missing (deleted): the read model had folded it up to seq {recorded.checkpoint}"]
        return [f"{stream} is missing (deleted)"] if expected is not None else []
    problems = []
    if expected is not None:
        drift = config_drift(info.config, expected)
        if drift:
            problems.append(f"{stream} configuration changed: {', '.join(drift)}")
    state = info.state
    first, last, messages = state.first_seq, state.last_seq, state.messages
    if last < recorded.checkpoint:
        problems.append(f"{stream} ends at seq {last} but the read model had folded it up to seq "
                        f"{recorded.checkpoint}: the log was cut or replaced")
    if last and not messages:
        problems.append(f"{stream} holds no messages though its last seq is {last}: it was purged")
    elif messages and first > 1:
        problems.append(f"{stream} starts at seq {first}: messages 1..{first - 1} were removed")
    if messages and messages < last - first + 1:
        problems.append(f"{last - first + 1 - messages} messages were deleted inside {stream} "
                        f"(seq {first}..{last} holds {messages})")
    for what, mark in (("first", recorded.first), ("last", recorded.last)):
        if mark is None or mark.stream_seq > last or mark.stream_seq < first:
            continue  # gone with the range reported above
        try:
            stored = await js.get_msg(stream, mark.stream_seq)
        except nats.js.errors.NotFoundError:
            problems.append(f"{stream} seq {mark.stream_seq}, this site's {what} folded event, is gone")
            continue
        if bytes(stored.data or b"") != mark.payload:
            problems.append(f"{stream} seq {mark.stream_seq} is not the {what} event the read model folded "
                            "there: the stream was replaced")
    return problems


def _kind(problem: str) -> str:
    """A problem without its numbers: junk arriving in a cut stream moves them, not the problem."""
    return re.sub(r"\d+", "N", problem)


class AlertBook:
    """Alerts about the site's own streams, kept for the notification dispatcher.

    Not in the read model: an alert is something this site observed, not a function of
    the log (a rebuild must not invent or lose them). ``<data>/alerts.sqlite``, 0600.
    """

    def __init__(self, data: Path):
        path = Path(data) / "alerts.sqlite"
        if not path.exists():
            path.touch(mode=0o600)
        self.conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY AUTOINCREMENT,"
                          " ts INTEGER NOT NULL, stream TEXT NOT NULL, reason TEXT NOT NULL)")

    def raise_alert(self, stream: str, reason: str) -> int:
        cur = self.conn.execute("INSERT INTO alerts(ts, stream, reason) VALUES (?,?,?)",
                                (time.time_ns() // 1_000_000, stream, reason))
        return cur.lastrowid

    def after(self, alert_id: int, limit: int = 500) -> list[sqlite3.Row]:
        return self.conn.execute("SELECT * FROM alerts WHERE id > ? ORDER BY id LIMIT ?",
                                 (alert_id, limit)).fetchall()

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM alerts").fetchone()[0]

    def close(self) -> None:
        self.conn.close()


class LogWatch:
    """Checks the site's own stream every few seconds against the read model.

    ``recorded`` reads what the read model holds of the stream; ``alerts`` is None in a
    process that only answers health checks (the projector's process raises the alerts,
    once per site).
    """

    def __init__(self, event_log: EventLog, recorded: Callable[[], Recorded], *,
                 alerts: AlertBook | None = None, every_s: float = CHECK_EVERY_S):
        self.log = event_log
        self.stream = event_log.stream
        self.recorded = recorded
        self.alerts = alerts
        self.every_s = every_s
        self.problems: list[str] = []
        self.unreachable = ""  # the broker did not answer the last check (not a log problem)
        self.checks = 0
        self.alerts_raised = 0
        self._raised: set[str] = set()
        self._task: asyncio.Task | None = None

    async def start(self, restored: list[str] | None = None) -> "LogWatch":
        """Check once (so nothing is appended before), then keep checking.

        ``restored``: settings ``ensure_stream`` had to put back at start (changed while the
        site was not watching): they are alerted once, though the stream is sound again.
        """
        if restored:
            self._alert(f"{self.stream} configuration had been changed and was restored at start: "
                        f"{', '.join(restored)}")
        await self.check()
        self._task = asyncio.create_task(self._loop(), name=f"logwatch:{self.stream}")
        return self

    async def stop(self) -> None:
        await tasks.cancel(self._task)
        self._task = None
        if self.alerts:
            self.alerts.close()

    @property
    def healthy(self) -> bool:
        return not self.problems

    def reason(self) -> str:
        return "event log damaged: " + "; ".join(self.problems) if self.problems else ""

    async def check(self) -> list[str]:
        try:
            problems = await assess(self.log.js, self.stream, self.recorded(), self.log.expected())
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            self.unreachable = f"{type(exc).__name__}"
            return self.problems  # the broker's own health check reports it
        except sqlite3.OperationalError:
            return self.problems  # read model not created yet
        self.unreachable = ""
        self.checks += 1
        self.problems = problems
        self.log.refusal = "; ".join(problems)
        kinds = {_kind(p): p for p in problems}
        for kind, p in kinds.items():
            if kind not in self._raised:
                self._alert(p)
        self._raised = set(kinds)  # once per kind of problem while it lasts; again if it comes back
        return problems

    def _alert(self, reason: str) -> None:
        self.alerts_raised += 1
        log.error("event log alert", stream=self.stream, reason=reason)
        if self.alerts is not None:
            try:
                self.alerts.raise_alert(self.stream, reason)
            except sqlite3.Error as exc:
                log.error("could not record the alert for notification", error=str(exc))

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)  # a timer: the broker has no 'stream changed' event
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("event log check failed; retrying", error=f"{type(exc).__name__}: {exc}")


async def watch_own_log(event_log: EventLog, recorded: Callable[[], Recorded], *, data: Path | None,
                        restored: list[str] | None = None) -> LogWatch:
    """Start watching; ``data`` given = this process raises the site's notifications."""
    return await LogWatch(event_log, recorded, alerts=AlertBook(data) if data else None).start(restored)



def log_watch_metrics(watch: LogWatch | None, reader: sqlite3.Connection):
    """Prometheus families for /metrics: the log's state, alerts, junk dropped from quarantine."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    if watch is not None:
        g = GaugeMetricFamily("odst_event_log_intact", "1 while the site's own stream is the log its read model "
                              "folded (not cut, deleted, replaced or reconfigured)", labels=["stream"])
        g.add_metric([watch.stream], 0 if watch.problems else 1)
        yield g
        yield GaugeMetricFamily("odst_event_log_problems", "Problems the log watch finds now",
                                value=len(watch.problems))
        yield CounterMetricFamily("odst_event_log_alerts", "Event-log alerts raised by this process",
                                  value=watch.alerts_raised)
    c = CounterMetricFamily("odst_quarantine_dropped", "Junk messages dropped from quarantine (bounded), "
                            "by stream", labels=["stream"])
    try:
        for stream, n in reader.execute("SELECT stream, messages FROM quarantine_dropped ORDER BY stream"):
            c.add_metric([stream], n)
    except sqlite3.OperationalError:
        pass
    yield c
