"""A <- B <- C leaf chain, registered A-B and B-C only: an upload at A reaches C through B.

C never registers with A: it learns A's key from B's PeerRegistered event and
mirrors A's stream through the leaf tree. The story also measures how long a
1 MiB package uploaded at A takes to be available at C (target: under 2 s).
"""

from __future__ import annotations

import statistics
import time

from harness.network import Network

MiB = 1 << 20


def run(net: Network) -> None:
    a, b, c = net.chain("A", "B", "C")
    net.start()
    net.register(a, b)
    net.register(b, c)
    net.wait_converged()

    net.upload(a, "chain-first.pkg", 3 * MiB)
    net.wait_available("chain-first.pkg", [b, c])
    peers_of_c = {p["site"]: p for p in net.get(c, "/api/v1/peers")["peers"]}
    net.check(a.id in peers_of_c and not peers_of_c[a.id]["registered_here"],
              f"C should know A only through B's registration, not its own: {peers_of_c.get(a.id)}")
    net.say(f"  C knows A via {', '.join(net.names(peers_of_c[a.id]['vouched_by']))}, "
            f"link {peers_of_c[a.id]['link'].get('link')}")

    with net.step("measure: 1 MiB uploaded at A until available at C (3 packages)"):
        times = []
        for i in range(3):
            name = f"latency-{i}.pkg"
            t0 = time.monotonic()
            net.upload(a, name, MiB)
            t_up = time.monotonic()
            net.wait_until(lambda: net.available_at(c, name), 30, f"{name} to be available at C",
                           interval=0.01, sites=[a, b, c])
            t_c = time.monotonic()
            times.append(t_c - t0)
            net.say(f"  {name}: upload took {t_up - t0:.3f}s, available at C {t_c - t0:.3f}s after the "
                    f"upload began ({t_c - t_up:.3f}s after it was accepted)")
        median = statistics.median(times)
        net.results["chain3_1mib_latency_s"] = median
        net.say(f"  median time until available at C: {median:.3f}s (target < 2 s: "
                f"{'met' if median < 2 else 'NOT met'})")

    net.wait_converged()
    net.check_files()
