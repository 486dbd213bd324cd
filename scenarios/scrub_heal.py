"""Bit rot no one pulls: the background scrub finds it, takes the copy out of service and repairs it.

Hub A scrubs its store continually (a pass every second, fast: ODST_SCRUB_* settings);
B accepts only "prod". held.pkg (prod) is at A and B; lonely.pkg (test) only at A, so
no peer ever pulls it. First, B turns hostile: it records, signed in its own log, a
false ChunkRejected naming A for held.pkg. A re-checks its copy, finds it good and
keeps serving it. Then one byte of each file at A is flipped on disk. A's scrub finds
both (PackageDamaged, found by the scrub): held.pkg is repaired from B and served with
the right bytes again; lonely.pkg has no other holder, so A answers 503 for it (never
the damaged bytes) until an admin uploads it again.
"""

from __future__ import annotations

import base64
import hashlib

import httpx

from harness.network import Network
from odst.datadir import key_path
from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import subject_for
from odst.events.signing import SiteKey

MiB = 1 << 20
FAST_SCRUB = {"ODST_SCRUB_PERIOD_S": "1", "ODST_SCRUB_MIN_RATE": str(256 * MiB),
              "ODST_SCRUB_MAX_RATE": str(256 * MiB)}


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def run(net: Network) -> None:
    a, b = net.hub("A", ["B"], A={"env": FAST_SCRUB}, B={"accept": ["prod"]})
    net.start()
    net.register(a, b)
    held = net.upload(a, "held.pkg", 2 * MiB + 4321, stage="prod")
    lonely = net.upload(a, "lonely.pkg", MiB + 99, stage="test")
    net.wait_available("held.pkg", [b])

    def download_sha1(site, name) -> tuple[int, str]:
        r = httpx.get(f"{site.url}/CasperShare/Packages/{name}", timeout=30)
        return r.status_code, hashlib.sha1(r.content).hexdigest() if r.status_code == 200 else r.text

    def events_of(site, type_: str, origin) -> list[dict]:
        return net.get(site, "/api/v1/events", params={"type": type_, "origin": origin.id, "limit": 1000})["events"]

    def rechecks(site, trigger: str, result: str) -> int:
        return sum(r["count"] for r in net.get(site, "/api/v1/integrity")["rechecks"]
                   if r["trigger"] == trigger and r["result"] == result)

    with net.step("B records a false ChunkRejected naming A for held.pkg, signed with B's own key"):
        last = net.get(b, "/api/v1/events", params={"origin": b.id, "limit": 1000})["events"][-1]
        event = ev.ChunkRejected(source=a.id, name="held.pkg", blake3=held["blake3"], chunk=0,
                                 reason="chunk 0 of held.pkg failed verification (a lie)")
        envelope = codec.Envelope(id=codec.new_event_id(), origin=b.id, seq=last["seq"] + 1,
                                  prev=codec.chain_hash(base64.b64decode(last["signed"])), ts=codec.now_ms(),
                                  actor="mallory", event=event)
        net.nats_publish(b, subject_for(b.id, event), codec.seal(envelope, SiteKey.load_or_create(key_path(b.data))),
                         stream="EVENTS")
    with net.step("A re-checks held.pkg because of the report, finds it good and keeps serving it"):
        net.wait_until(lambda: rechecks(a, "report", "ok") >= 1, 30, "A to re-check held.pkg on B's report",
                       sites=[a, b])
        net.check(events_of(a, "ChunkRejected", b), "A's read model lacks B's ChunkRejected", [a])
        net.check(not events_of(a, "PackageDamaged", a), "a false report made A record PackageDamaged", [a])
        net.check(download_sha1(a, "held.pkg") == (200, held["sha1"]), "A no longer serves held.pkg rightly", [a])
        net.check(a.file("held.pkg").exists(), "a false report removed A's good file", [a])

    with net.step("flip one byte of held.pkg and of lonely.pkg in A's store"):
        flip_byte(a.file("held.pkg"), MiB + 17)
        flip_byte(a.file("lonely.pkg"), 5)

    with net.step("A's scrub finds both; lonely.pkg (no other holder) is answered 503, not bad bytes"):
        def found() -> list[dict] | None:
            damaged = [e["envelope"]["event"] for e in events_of(a, "PackageDamaged", a)]
            return damaged if {d["name"] for d in damaged} == {"held.pkg", "lonely.pkg"} else None
        damaged = net.wait_until(found, 30, "A's scrub to find both damaged files", sites=[a])
        net.check(all(d["found_by"] == "scrub" for d in damaged), f"not found by the scrub: {damaged}", [a])
        net.say(f"  A recorded: {[(d['name'], d['reason']) for d in damaged]}")
        status, text = download_sha1(a, "lonely.pkg")
        net.check(status == 503, f"A answered {status} for damaged lonely.pkg: {text}", [a])
        listed = net.get(a, "/api/v1/integrity")
        out = {d["name"]: d for d in listed["damaged"]}
        net.check("lonely.pkg" in out and out["lonely.pkg"]["sources"] == [],
                  f"A's integrity API should list lonely.pkg damaged, with no source: {listed['damaged']}", [a])
        net.check(listed["scrub"]["damaged_total"] >= 2 and listed["scrub"]["passes"] >= 1,
                  f"A's scrub state: {listed['scrub']}", [a])
        metrics = httpx.get(f"{a.url}/metrics", headers={"Authorization": f"Bearer {net.token}"}).text
        for line in ("odst_scrub_bytes_total", "odst_scrub_last_full_pass_timestamp_seconds",
                     "odst_scrub_damaged_found_total", "odst_packages_damaged"):
            net.check(line in metrics, f"/metrics lacks {line}", [a])

    with net.step("A repairs held.pkg from B and serves the right bytes again"):
        net.wait_until(lambda: download_sha1(a, "held.pkg") == (200, held["sha1"]), 30,
                       "A to serve held.pkg rightly again", sites=[a, b])
        net.check(download_sha1(a, "lonely.pkg")[0] == 503, "lonely.pkg came back with no source", [a])

    net.upload(a, "lonely.pkg", MiB + 99, stage="test")  # the same bytes as before: the admin's repair
    with net.step("the upload puts lonely.pkg back in service at A"):
        net.check(download_sha1(a, "lonely.pkg") == (200, lonely["sha1"]), "lonely.pkg not served after upload", [a])
        net.check(net.get(a, "/api/v1/integrity")["damaged"] == [], "A still lists damaged packages", [a])
    net.wait_converged()
    net.check_files()
