"""A peer serves corrupted chunks: the puller drops them, re-fetches elsewhere and reports the peer.

Three sites, hub A with spokes B and C; C is registered with both A and B.
The package is uploaded at A as stage "test" and B pulls it; then bytes in
every chunk of B's stored file are overwritten on disk. C accepts only "prod",
so it waits until it knows both A and B hold the package; then the package is
promoted and C pulls from both at once. Every chunk B serves fails its SHA1:
C ends with the right file and lists B in bad_chunks_from. Finally B's damage
is found and repaired (POST /api/v1/verify), and everyone converges.
"""

from __future__ import annotations

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

    with net.step("find and repair B's damaged copy (POST /api/v1/verify at B)"):
        report = net.request(b, "POST", "/api/v1/verify")
        net.say(f"  B's verify report: {report}")
        net.check("rotten.pkg" in report.get("damaged", []), f"B's verify should find rotten.pkg damaged: {report}",
                  [b])
    net.wait_converged()
    net.check_files()
