"""Integrity over time: re-hash stored packages, report bit rot, repair from peers.

A stored file that no longer matches its manifest (or is missing) is taken out
of the public directory at once — a Mac must never get damaged bytes — and this
site records PackageTransferFailed for it, so the replicator fetches a verified
copy from the sites that hold one.
"""

from __future__ import annotations

import asyncio

import structlog

from odst.events import catalogue as ev
from odst.projections import views
from odst.store.hashing import hash_file

log = structlog.get_logger("odst.integrity")


async def verify_store(site, *, actor: str, repair: bool = True) -> dict:
    report = {"checked": 0, "ok": 0, "damaged": [], "missing": [], "repairing": [], "unrepairable": []}
    for key, blake3 in sorted(views.file_holders(site.reader, site.id).items()):
        pkg = views.package(site.reader, key)
        if pkg is None or pkg["blake3"] != blake3:
            continue  # a conflict loser being replaced: the replicator owns it
        name = pkg["name"]  # the spelling shown; the store and the read model fold it
        path = site.store.path(name)
        report["checked"] += 1
        try:
            whole = await asyncio.to_thread(hash_file, path)
        except FileNotFoundError:
            report["missing"].append(name)
            reason = "stored file is missing"
        else:
            if (whole.size, whole.sha1, whole.blake3) == (pkg["size"], pkg["sha1"], pkg["blake3"]):
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
