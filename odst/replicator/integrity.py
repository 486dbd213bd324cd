"""Integrity over time: re-hash stored packages, report bit rot, repair from peers.

A stored file that no longer matches its manifest (or is missing) is taken out
of the public directory at once — a Mac must never get damaged bytes — and this
site records PackageTransferFailed for it, so the replicator fetches a verified
copy from the sites that hold one.
"""

from __future__ import annotations

import asyncio
import hashlib

import blake3 as blake3_mod
import structlog

from odst.events import catalogue as ev
from odst.projections import views

log = structlog.get_logger("odst.integrity")


def _hash_file(path) -> tuple[int, str, str]:
    sha1, b3, size = hashlib.sha1(), blake3_mod.blake3(), 0
    with open(path, "rb", buffering=0) as f:
        while block := f.read(4 << 20):
            sha1.update(block)
            b3.update(block)
            size += len(block)
    return size, sha1.hexdigest(), b3.hexdigest()


async def verify_store(site, *, actor: str, repair: bool = True) -> dict:
    report = {"checked": 0, "ok": 0, "damaged": [], "missing": [], "repairing": [], "unrepairable": []}
    for name, blake3 in sorted(views.file_holders(site.reader, site.id).items()):
        pkg = views.package(site.reader, name)
        if pkg is None or pkg["blake3"] != blake3:
            continue  # a conflict loser being replaced: the replicator owns it
        path = site.store.path(name)
        report["checked"] += 1
        try:
            size, sha1, b3 = await asyncio.to_thread(_hash_file, path)
        except FileNotFoundError:
            report["missing"].append(name)
            reason = "stored file is missing"
        else:
            if (size, sha1, b3) == (pkg["size"], pkg["sha1"], pkg["blake3"]):
                report["ok"] += 1
                continue
            report["damaged"].append(name)
            reason = "bit rot: stored file does not match its manifest"
        log.error("stored package damaged", package=name, reason=reason)
        if not repair:
            continue
        site.store.remove(name)
        holders = views.sources(site.reader, name, blake3, site.id)
        await site.append(ev.PackageTransferFailed(name=name, blake3=blake3,
                                                   reason=f"{reason}; repairing from peers"), actor=actor)
        (report["repairing"] if holders else report["unrepairable"]).append(name)
    if site.replicator:
        site.replicator.kick()
    return report
