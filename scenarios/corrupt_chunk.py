"""A peer serves corrupted chunks: the puller drops them, re-fetches elsewhere and reports the peer.

Three sites, hub A with spokes B and C; C is registered with both A and B.
The package is uploaded at A as stage "test" and B pulls it; then bytes in
every chunk of B's stored file are overwritten on disk. C accepts only "prod",
so it waits until it knows both A and B hold the package; then the package is
promoted and C pulls from both at once. Every chunk B serves fails its SHA1:
C ends with the right file and lists B in bad_chunks_from. B heals itself, with
no admin: C records a ChunkRejected naming B in its own log; B sees it in its
mirror of C's log, re-checks its copy, finds it damaged, takes it out of service
(PackageDamaged) and repairs it from a peer; then B serves the right bytes,
``odst verify`` at B finds nothing wrong, and everyone converges.
"""

from __future__ import annotations

import hashlib

import httpx

from harness.network import Network

MiB = 1 << 20
CHUNK = 1 << 20


def run(net: Network) -> None:
    a, b, c = net.hub("A", ["B", "C"], C={"accept": ["prod"]})
    net.start()
    net.register(a, b)
    net.register(a, c)
    net.register(b, c)

    pkg = net.upload(a, "rotten.pkg", 4 * MiB + 12345, stage="test")
    net.wait_available("rotten.pkg", [b])

    with net.step("corrupt a few bytes in every chunk of B's stored file"):
        path = b.file("rotten.pkg")
        with open(path, "r+b") as f:
            for i in range(len(pkg["chunks"])):
                f.seek(i * CHUNK + 777)
                byte = f.read(1)
                f.seek(i * CHUNK + 777)
                f.write(bytes([byte[0] ^ 0xFF]) * 1)
        net.say(f"  flipped one byte in each of the {len(pkg['chunks'])} chunks of {path}")

    with net.step("wait until C knows that both A and B hold rotten.pkg"):
        net.wait_until(lambda: net.available_at(c, "rotten.pkg", a) and net.available_at(c, "rotten.pkg", b),
                       30, "C to see rotten.pkg held by A and B", sites=[a, b, c])
    net.check(not c.file("rotten.pkg").exists(), "C accepts only prod but holds a test package", [c])

    net.stage(a, "rotten.pkg", "prod")
    net.wait_available("rotten.pkg", [c])
    with net.step("C's copy is right, and C reports B as a source of bad chunks"):
        st = net.state(c)
        bad = st["bad_chunks_from"]
        net.say(f"  C's bad_chunks_from: { {net.name_of(k): v for k, v in bad.items()} }")
        net.check(bad.get(b.id, 0) >= 1, f"C should list B ({b.id}) in bad_chunks_from, lists {bad}", [b, c])
        net.check(a.id not in bad, f"A served only good chunks, yet C lists it: {bad}", [a, c])
        net.check_files([c])

    def events(site, type_: str, origin) -> list[dict]:
        return net.get(site, "/api/v1/events", params={"type": type_, "origin": origin.id, "limit": 1000})["events"]

    with net.step("C reported B's bad chunks in its log; B re-checked, took its copy out and repaired it"):
        net.wait_until(lambda: any(e["envelope"]["event"]["source"] == b.id
                                   and e["envelope"]["event"]["name"] == "rotten.pkg"
                                   for e in events(b, "ChunkRejected", c)),
                       30, "B to see C's ChunkRejected naming B", sites=[b, c])
        damaged = net.wait_until(lambda: events(b, "PackageDamaged", b), 30, "B to record PackageDamaged",
                                 sites=[b, c])
        net.check(damaged[0]["envelope"]["event"]["found_by"] == "report",
                  f"B's PackageDamaged was not found on C's report: {damaged[0]['envelope']['event']}", [b])
        net.say(f"  B: {damaged[0]['envelope']['event']['reason']}")
        net.wait_until(lambda: [e for e in events(b, "PackageAvailable", b) if e["seq"] > damaged[0]["seq"]],
                       30, "B to hold a repaired copy (PackageAvailable after PackageDamaged)", sites=[a, b, c])
        body = httpx.get(f"{b.url}/CasperShare/Packages/rotten.pkg", timeout=30).content
        net.check(hashlib.sha1(body).hexdigest() == pkg["sha1"], "B does not serve the right bytes again", [b])
        report = net.request(b, "POST", "/api/v1/verify")
        net.check(report["ok"] == report["checked"] >= 1 and not report["damaged"],
                  f"B's verify after the repair: {report}", [b])
    net.wait_converged()
    net.check_files()
