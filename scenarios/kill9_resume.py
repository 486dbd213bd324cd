"""kill -9 of a site in the middle of pulling a ~200 MB package; after a restart it resumes.

Hub A holds the package; spoke B pulls it. When B's /api/v1/state shows the
transfer part-way (chunks_done), B's odst serve gets SIGKILL (its nats-server
follows it). B restarts, re-verifies the chunks already in its temp file,
fetches only the rest, and converges. A's chunks_served shows the total chunks
served to B stays well below twice the chunk count: verified chunks were not
fetched again. (B pulls with 2 chunks in flight instead of 8, to make the
transfer long enough to interrupt on a fast machine.)
"""

from __future__ import annotations

import time

from harness.network import Network

MiB = 1 << 20
SIZE = 200 * MiB


def run(net: Network) -> None:
    a, b = net.hub("A", ["B"], B={"env": {"ODST_REPLICATION_STREAMS": "2"}})
    net.start()
    net.register(a, b)
    net.wait_converged()

    pkg = net.upload(a, "big.pkg", SIZE)
    chunks = len(pkg["chunks"])

    with net.step(f"watch B's transfer of big.pkg ({chunks} chunks) and kill -9 B part-way"):
        def part_way():
            st = net.try_get(b, "/api/v1/state", timeout=2)
            if st is None:
                return None
            for t in st["transfers"]:
                if t["name"] == "big.pkg":
                    if t["status"] == "available" or t["chunks_done"] >= chunks:
                        net.fail("B finished big.pkg before it could be interrupted", [a, b])
                    if t["chunks_done"] >= chunks // 5:
                        return t
            if any(p["name"] == "big.pkg" and b.id in p["available_at"] for p in st["packages"]):
                net.fail("B finished big.pkg before it could be interrupted", [a, b])
            return None
        t = net.wait_until(part_way, 60, "B's transfer of big.pkg to pass 20%", sites=[a, b], interval=0.02)
        done_at_kill = t["chunks_done"]
        net.say(f"  B reports {done_at_kill}/{chunks} chunks done, {t['rate_bytes_per_s'] / 1e6:.0f} MB/s "
                f"from {', '.join(net.names(t['sources']))}")
        net.kill9(b)
    partial = b.tmp_dir / f"{pkg['blake3']}.repl"
    net.check(partial.exists(), f"B should have left its partial download at {partial}", [b])
    net.say(f"  B's partial download: {partial.name}, {partial.stat().st_size} bytes allocated")
    served_before = sum(net.state(a)["chunks_served"].values())
    net.say(f"  A has served {served_before} chunks so far")

    t0 = time.monotonic()
    net.start(b)
    net.wait_available("big.pkg", [b], timeout=120)
    net.say(f"  big.pkg available at B {time.monotonic() - t0:.1f}s after the restart began")
    net.wait_converged()
    with net.step("check that verified chunks were not fetched again"):
        served = net.state(a)["chunks_served"]
        total = sum(served.values())
        net.say(f"  A served {total} chunks for a {chunks}-chunk package ({total / chunks:.2f}x): "
                f"{served_before} before the kill, {total - served_before} after; "
                f"B had {done_at_kill} verified when it was killed")
        resumed = [line for line in b.log_path.read_text(errors="replace").splitlines()
                   if "resuming transfer" in line]
        if resumed:
            net.say(f"  B's log: {resumed[-1].strip()[:200]}")
        net.check(total < 2 * chunks and total < chunks + done_at_kill,
                  f"A served {total} chunks for {chunks}: B fetched again chunks it had verified "
                  f"({done_at_kill} were done when it was killed)", [a, b])
    net.check_files()
