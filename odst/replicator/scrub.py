"""Storage that heals itself: a background scrub of the whole store, and re-checks peers ask for.

* ``Scrubber`` re-hashes every package this site holds, one full pass every
  ``scrub_period_s`` (default 7 days), at a bounded rate: the store's size divided by
  the period, at least ``scrub_min_rate`` and at most ``scrub_max_rate`` bytes/s
  (``scrub_rate``). Its progress survives restarts (``<store>/scrub.json``: the pass
  resumes after the last name checked), and only one process per store scrubs
  (``<store>/scrub.lock``). ``/metrics`` and ``GET /api/v1/integrity`` read that file.
* ``RejectionWatch`` reads, from the read model, peers' ChunkRejected events that name
  this site as the source of a chunk that failed its SHA1. Such a report travels the
  way every fact does here: signed and chained in the reporting site's own log, which
  this site already mirrors and verifies (no new door, an audit trail, and it arrives
  even if this site was down when the chunk was dropped). A report is not trusted: it
  only asks for a re-check of this site's own copy, once per content per
  ``RECHECK_COOLDOWN_S`` while the copy keeps checking good, so a hostile or mistaken
  peer can cost a re-read but never a good file.

Both hand a content to ``integrity.Integrity.recheck``, the one checking path (``odst
verify`` uses it too): damaged → out of service at once (PackageDamaged), repaired
from peers by the replicator.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from odst import tasks
from odst.projections import views
from odst.replicator.integrity import Integrity

log = structlog.get_logger("odst.scrub")

STATE_FILE = "scrub.json"
LOCK_FILE = "scrub.lock"
SAVE_EVERY_S = 2.0  # progress written at most this often during a pass (and after it)
LOCK_RETRY_S = 30.0  # another process scrubs this store: try to take over this often
REPORTS_EVERY_S = 0.5  # RejectionWatch reads peers' reports at most this often
RECHECK_COOLDOWN_S = 600.0  # a copy that checked good is not re-read for another report for this long
REPORT_SKEW_MS = 600_000  # a report this much older than our latest verified copy is about an earlier one
BURST_S = 1.0  # a paced reader may catch up on at most this much idle time at once


class ScrubStopped(Exception):
    """The site is stopping: the paced read ends where it is (the pass resumes next start)."""


def scrub_rate(store_bytes: int, period_s: float, floor: float, ceiling: float) -> float:
    """Bytes per second for one full pass of ``store_bytes`` in ``period_s``, within [floor, ceiling]."""
    wanted = store_bytes / period_s if period_s > 0 else ceiling
    return float(min(max(wanted, floor), max(ceiling, floor)))


class Pace:
    """A rate limit for a reader on a worker thread: call it with each block's length; it
    sleeps (on ``stop``, so a stopping site is not kept waiting) to hold ``rate`` bytes/s."""

    def __init__(self, rate: float, stop: threading.Event | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], bool] | None = None):
        self.rate = max(float(rate), 1.0)
        self.stop = stop or threading.Event()
        self.clock = clock
        self.sleep = sleep or self.stop.wait
        self.bytes = 0
        self._due = clock()

    def __call__(self, n: int) -> None:
        if self.stop.is_set():
            raise ScrubStopped()
        self.bytes += n
        now = self.clock()
        self._due = max(self._due, now - BURST_S) + n / self.rate
        if self._due > now and self.sleep(self._due - now):
            raise ScrubStopped()


@dataclass
class ScrubState:
    """The scrub's progress, kept in ``<store>/scrub.json`` (local state, not events)."""

    pass_started: float = 0.0  # unix s: when the current (or last) pass began
    cursor: str = ""  # last name checked in the pass in progress; '' between passes
    last_full_pass: float = 0.0  # unix s: when the last complete pass ended; 0: none yet
    last_pass_s: float = 0.0  # how long it took
    passes: int = 0
    bytes_total: int = 0  # bytes re-hashed by scrubs, ever
    damaged_total: int = 0  # damaged or missing files the scrub found, ever
    pass_bytes: int = 0  # of the pass in progress
    pass_total: int = 0  # bytes the pass in progress has to read
    rate: float = 0.0  # bytes/s of the pass in progress (or the last one)
    period_s: float = 0.0

    @classmethod
    def load(cls, path: Path) -> "ScrubState | None":
        try:
            raw = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in raw.items() if k in known})

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, path)


def read_status(store_root: Path) -> dict:
    """The scrub's state as /metrics and the API show it (any process of the site may read it)."""
    state = ScrubState.load(Path(store_root) / STATE_FILE)
    return asdict(state) if state else {}


class Scrubber:
    """Background passes over the whole store (see the module docstring)."""

    def __init__(self, *, integrity: Integrity, reader, site_id: str, store_root: Path, period_s: float,
                 min_rate: float, max_rate: float):
        self.integrity, self.reader, self.site_id = integrity, reader, site_id
        self.root = Path(store_root)
        self.period_s, self.min_rate, self.max_rate = float(period_s), float(min_rate), float(max_rate)
        self.state = ScrubState()
        self._stop = threading.Event()
        self._task: asyncio.Task | None = None
        self._lock_fd: int | None = None

    def start(self) -> "Scrubber":
        if self.period_s > 0:
            self._task = asyncio.create_task(self._run(), name="scrub")
        return self

    async def stop(self) -> None:
        self._stop.set()
        await tasks.cancel(self._task)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _take_lock(self) -> bool:
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    async def _run(self) -> None:
        while not self._take_lock():
            await asyncio.sleep(LOCK_RETRY_S)  # another replicator process of this site scrubs
        path = self.root / STATE_FILE
        loaded = ScrubState.load(path)
        # a new store starts its clock now: every file was hashed on arrival
        self.state = loaded or ScrubState(pass_started=time.time())
        self.state.period_s = self.period_s
        self.state.save(path)
        while True:
            if not self.state.cursor:
                wait = self.state.pass_started + self.period_s - time.time()  # a pass starts every period
                if wait > 0:
                    await asyncio.sleep(min(wait, 60.0))
                    continue
                self.state.pass_started = time.time()
                self.state.pass_bytes = 0
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except ScrubStopped:
                return
            except Exception:
                log.exception("scrub pass failed; retrying in a minute")
                await asyncio.sleep(60.0)

    async def run_pass(self) -> None:
        """Check every held file after the cursor, paced; then record the full pass."""
        state, path = self.state, self.root / STATE_FILE
        held = sorted(views.file_holders(self.reader, self.site_id).items())
        sizes = {name: getattr(views.package(self.reader, name), "size", 0) for name, _ in held}
        state.pass_total = sum(sizes.values())
        state.rate = scrub_rate(state.pass_total, self.period_s, self.min_rate, self.max_rate)
        pace = Pace(state.rate, self._stop)
        if not state.cursor:
            log.info("scrub pass started", files=len(held), bytes=state.pass_total, rate_bytes_per_s=int(state.rate))
        saved = time.monotonic()
        for name, blake3 in held:
            if state.cursor and name <= state.cursor:
                continue
            finding = await self.integrity.recheck(name, blake3, found_by="scrub", pace=pace,
                                                   detail="found by the background scrub")
            state.bytes_total += finding.bytes
            state.pass_bytes += finding.bytes
            if finding.status in ("damaged", "missing"):
                state.damaged_total += 1
            state.cursor = name
            if time.monotonic() - saved >= SAVE_EVERY_S:
                state.save(path)
                saved = time.monotonic()
        state.cursor = ""
        state.last_full_pass = time.time()
        state.last_pass_s = state.last_full_pass - state.pass_started
        state.passes += 1
        state.save(path)
        log.info("scrub pass done", files=len(held), bytes=state.pass_bytes, seconds=round(state.last_pass_s, 1),
                 damaged_total=state.damaged_total)


class RejectionWatch:
    """Re-check this site's copy when a peer reports a chunk of it failed verification."""

    def __init__(self, *, integrity: Integrity, reader, site_id: str,
                 wait_changed: Callable[[float], Awaitable[None]], rate: float,
                 cooldown_s: float = RECHECK_COOLDOWN_S):
        self.integrity, self.reader, self.site_id = integrity, reader, site_id
        self.wait_changed, self.rate, self.cooldown_s = wait_changed, float(rate), cooldown_s
        self.checked_good: dict[str, float] = {}  # blake3 -> monotonic time the copy checked good
        self._stop = threading.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> "RejectionWatch":
        self._task = asyncio.create_task(self._run(), name="rejection-watch")
        return self

    async def stop(self) -> None:
        self._stop.set()
        await tasks.cancel(self._task)

    async def _run(self) -> None:
        after = 0
        while True:
            reports: list = []
            try:
                reports, after = views.chunk_rejections(self.reader, self.site_id, after)
                for report in reports:
                    await self.consider(report)
            except asyncio.CancelledError:
                raise
            except ScrubStopped:
                return
            except Exception:
                log.exception("reading chunk rejection reports failed; retrying")
                await asyncio.sleep(5.0)
                continue
            if after >= views.last_position(self.reader):  # caught up: wait for the next fold
                passed_at = time.monotonic()
                await self.wait_changed(2.0)
                # reports are rare: a burst of folds (uploads, a catch-up) is read a batch at a
                # time, at most one look per REPORTS_EVERY_S, not one per fold
                await asyncio.sleep(max(0.0, passed_at + REPORTS_EVERY_S - time.monotonic()))

    async def consider(self, report: views.ChunkRejection) -> None:
        name, blake3, reporter = report.name, report.blake3, report.reporter
        since = views.held_since(self.reader, name, blake3, self.site_id)
        if since is None or report.ts < since - REPORT_SKEW_MS:
            return  # not held here (now), or about a copy this site has replaced since
        good_at = self.checked_good.get(blake3)
        if good_at is not None and time.monotonic() - good_at < self.cooldown_s:
            return
        log.warning("a peer rejected a chunk this site served; re-checking the package", package=name,
                    peer=reporter, chunk=report.chunk)
        finding = await self.integrity.recheck(
            name, blake3, found_by="report", pace=Pace(self.rate, self._stop),
            detail=f"re-checked because site {reporter} rejected chunk {report.chunk}")
        if finding.status == "ok":
            self.checked_good[blake3] = time.monotonic()
            log.info("re-checked on a peer's report: the stored copy is good", package=name, peer=reporter)
