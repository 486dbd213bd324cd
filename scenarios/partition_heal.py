"""Partition and heal: the hub goes down while a spoke uploads; later a spoke is down while the hub uploads.

Hub H with spokes S1 and S2, all registered with H. (1) H is stopped; S1
uploads meanwhile — S2 cannot learn of it, the only path is through H; H comes
back and everyone converges. (2) S2 is stopped; H uploads meanwhile; S2 comes
back, catches up from the log and converges.
"""

from __future__ import annotations

import time

from harness.network import Network

MiB = 1 << 20
# From a site's start to convergence. The hub's mirrors resume within a second of the spokes'
# leaf links (odst.peering.mirrors.MirrorResume; measured: converged 0.4 s after the hub's
# start returned), the spokes' mirrors of a site back within 10 s at NATS's next stall check
# (at most ~20 s after it went down). Without MirrorResume a restarted site's mirrors wait
# ~40 s from its broker's start (30 s on a consumer request nobody heard, then a 10 s
# back-off; measured: 43-47 s from the start), so this bound fails. ODST never deletes or
# recreates a mirror to hurry it.
RESUME_S = 38


def run(net: Network) -> None:
    hub, s1, s2 = net.hub("H", ["S1", "S2"])
    net.start()
    net.register(hub, s1)
    net.register(hub, s2)
    net.upload(s1, "before.pkg", 2 * MiB)
    net.wait_converged()

    # (1) the hub is down: the spokes are cut off from each other
    net.stop(hub)
    net.upload(s1, "during-hub-outage.pkg", 3 * MiB)
    net.hold(lambda: not net.available_at(s2, "during-hub-outage.pkg", s1)
             and not s2.file("during-hub-outage.pkg").exists(),
             2, "S2 does not hear of S1's upload while the hub is down", sites=[s1, s2])
    started = time.monotonic()
    net.start(hub)
    net.wait_converged(timeout=max(1.0, RESUME_S - (time.monotonic() - started)))
    net.say(f"  converged {time.monotonic() - started:.1f}s after the hub's start")
    net.check_files()

    # (2) a spoke is down: it catches up when it returns
    net.stop(s2)
    net.upload(hub, "during-spoke-outage.dmg", 2 * MiB)
    net.upload(s1, "also-during-spoke-outage.pkg", MiB)
    net.wait_available("during-spoke-outage.dmg", [s1])
    net.wait_available("also-during-spoke-outage.pkg", [hub])
    started = time.monotonic()
    net.start(s2)
    net.wait_converged(timeout=max(1.0, RESUME_S - (time.monotonic() - started)))
    net.say(f"  converged {time.monotonic() - started:.1f}s after the spoke's start")
    net.check_files()
