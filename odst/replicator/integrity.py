"""Integrity over time: re-hash stored packages, take damaged ones out of service, repair from peers.

One checking path for every trigger: ``odst verify`` (``verify_store``), the background
scrub and a peer's ChunkRejected report (``odst.replicator.scrub``) all call
``Integrity.recheck``. A stored file that no longer matches its manifest (or is missing)
is moved out of the public directory at once — a Mac must never get damaged bytes —
into the puller's temp file for that content (``tmp/<blake3>.repl``), and this site
records PackageDamaged: downloads answer 503 and peers are not sent its chunks, the
content is wanted here again, and the replicator pulls a verified copy from the sites
that hold one, re-using every chunk of the damaged file that still verifies (a flipped
byte costs one 1 MiB chunk from a peer, not the whole package). Its PackageAvailable
puts it back in service.

Only this site's own finding takes a file out: a report from a peer merely asks for the
re-check (see ``scrub.RejectionWatch``).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable

import structlog

from odst.events import catalogue as ev
from odst.events.log import AppendFailed
from odst.projections import views
from odst.replicator.puller import temp_path
from odst.store.hashing import hash_file

log = structlog.get_logger("odst.integrity")


@dataclass(frozen=True, slots=True)
class Finding:
    """What one re-check of one stored content found."""

    name: str
    blake3: str
    status: str  # ok | damaged | missing | skipped (not held, replaced meanwhile, being published)
    reason: str = ""
    bytes: int = 0  # bytes read
    taken_out: bool = False  # moved out of service and PackageDamaged recorded


def check_file(path, size: int, sha1: str, blake3: str, pace=None) -> tuple[str, str, int]:
    """Hash one stored file against its manifest: (status, reason, bytes read). ``status`` is
    ok, damaged, missing, or skipped when the file was replaced while it was read."""
    try:
        before = os.stat(path)
        whole = hash_file(path, pace=pace)
        after = os.stat(path)
    except FileNotFoundError:
        return "missing", "stored file is missing", 0
    if (before.st_ino, before.st_mtime_ns, before.st_size) != (after.st_ino, after.st_mtime_ns, after.st_size):
        return "skipped", "replaced while being checked", whole.size
    if (whole.size, whole.sha1, whole.blake3) == (size, sha1, blake3):
        return "ok", "", whole.size
    return "damaged", (f"bit rot: stored file does not match its manifest ({whole.size} bytes, sha1 "
                       f"{whole.sha1[:12]}…; expected {size} bytes, sha1 {sha1[:12]}…)"), whole.size


class Integrity:
    """Re-checks stored contents and takes damaged ones out of service (the replicator's role)."""

    def __init__(self, *, reader, store, site_id: str,
                 append: Callable[..., Awaitable], kick: Callable[[], None] = lambda: None):
        self.reader, self.store, self.site_id = reader, store, site_id
        self.append, self.kick = append, kick
        self.rechecks: Counter[tuple[str, str]] = Counter()  # (trigger, status) -> count
        self._locks: dict[str, asyncio.Lock] = {}  # per content (one small lock per content ever checked)

    async def recheck(self, name: str, blake3: str, *, found_by: str, detail: str = "", pace=None,
                      actor: str = "integrity", repair: bool = True) -> Finding:
        """Re-hash the file this site holds for (name, blake3); if it is damaged or missing,
        take it out of service and record PackageDamaged (unless ``repair`` is false)."""
        lock = self._locks.setdefault(blake3, asyncio.Lock())
        async with lock:  # a scrub and a report about the same content: one check at a time
            finding = await self._recheck(name, blake3, found_by=found_by, detail=detail, pace=pace,
                                          actor=actor, repair=repair)
        self.rechecks[(found_by, finding.status)] += 1
        return finding

    async def _recheck(self, name, blake3, *, found_by, detail, pace, actor, repair) -> Finding:
        pkg = views.package(self.reader, name)  # any spelling (or the key) finds it
        if (pkg is None or pkg.blake3 != blake3 or self.store.is_publishing(name)
                or views.held_since(self.reader, name, blake3, self.site_id) is None):
            return Finding(name, blake3, "skipped", "not held here (any more)")
        name = pkg.name  # events and logs say the spelling shown; the store folds it
        path = self.store.path(name)
        status, reason, nbytes = await asyncio.to_thread(check_file, path, pkg.size, pkg.sha1, blake3, pace)
        if status in ("ok", "skipped"):
            return Finding(name, blake3, status, reason, nbytes)
        log.error("stored package damaged", package=name, reason=reason, found_by=found_by)
        if not repair:
            return Finding(name, blake3, status, reason, nbytes)
        await self.take_out(name, blake3, path, f"{reason}{'; ' + detail if detail else ''}", found_by, actor)
        return Finding(name, blake3, status, reason, nbytes, taken_out=True)

    async def take_out(self, name: str, blake3: str, path, reason: str, found_by: str, actor: str) -> None:
        """Out of the public directory first (no more bad bytes), then the event; the
        damaged bytes become the repair's starting point (``tmp/<blake3>.repl``)."""
        try:
            os.replace(path, temp_path(self.store.tmp, blake3))
        except FileNotFoundError:
            pass
        holders = views.sources(self.reader, name, blake3, self.site_id)
        note = "repairing from peers" if holders else "no other site holds a verified copy: re-upload it"
        try:
            await self.append(ev.PackageDamaged(name=name, blake3=blake3, reason=f"{reason}; {note}"[:500],
                                                found_by=found_by), actor=actor)
        except AppendFailed as exc:
            # the file is out of packages/: the replicator's missing-file check records it later
            log.error("could not record a damaged package", package=name, error=str(exc))
        self.kick()


async def verify_store(site, *, actor: str, repair: bool = True) -> dict:
    """``odst verify`` / POST /api/v1/verify: re-check every stored package now, at full speed."""
    integrity = site.integrity or Integrity(reader=site.reader, store=site.store, site_id=site.id,
                                            append=site.append)
    report = {"checked": 0, "ok": 0, "damaged": [], "missing": [], "repairing": [], "unrepairable": []}
    for key, blake3 in sorted(views.file_holders(site.reader, site.id).items()):
        finding = await integrity.recheck(key, blake3, found_by="verify", actor=actor, repair=repair)
        if finding.status == "skipped":
            continue
        name = finding.name  # the spelling shown (file_holders gives keys)
        report["checked"] += 1
        if finding.status == "ok":
            report["ok"] += 1
            continue
        report[finding.status].append(name)
        if finding.taken_out:
            holders = views.sources(site.reader, name, blake3, site.id)
            (report["repairing"] if holders else report["unrepairable"]).append(name)
    if site.replicator:
        site.replicator.kick()
    return report
