"""Partition and heal: the hub goes down while a spoke uploads; later a spoke is down while the hub uploads.

Hub H with spokes S1 and S2, all registered with H. (1) H is stopped; S1
uploads meanwhile — S2 cannot learn of it, the only path is through H; H comes
back and everyone converges. (2) S2 is stopped; H uploads meanwhile; S2 comes
back, catches up from the log and converges.
"""

from __future__ import annotations

from harness.network import Network

MiB = 1 << 20
# After the hub's restart its mirrors resume on NATS's own retry schedule (measured: 39 s; a
# mirror whose origin was unreachable when its server started backs off 10 s per failure, up
# to 2 min). ODST no longer deletes and recreates a mirror to hurry it: a mirror is evidence.
RESUME_S = 90


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
    net.start(hub)
    net.wait_converged(timeout=RESUME_S)
    net.check_files()

    # (2) a spoke is down: it catches up when it returns
    net.stop(s2)
    net.upload(hub, "during-spoke-outage.dmg", 2 * MiB)
    net.upload(s1, "also-during-spoke-outage.pkg", MiB)
    net.wait_available("during-spoke-outage.dmg", [s1])
    net.wait_available("also-during-spoke-outage.pkg", [hub])
    net.start(s2)
    net.wait_converged(timeout=RESUME_S)
    net.check_files()
