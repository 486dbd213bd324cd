"""Staging: a site that accepts only prod does not get a test package until it is promoted.

Hub A with spokes B (every stage) and C (--accept-stage prod), all registered
with A. A test upload at A reaches B but not C; C still knows of it (same
state digest) and lists who holds it. PATCH stage=prod at A: it reaches C.
"""

from __future__ import annotations

from harness.network import Network

MiB = 1 << 20


def run(net: Network) -> None:
    a, b, c = net.hub("A", ["B", "C"], C={"accept": ["prod"]})
    net.start()
    net.register(a, b)
    net.register(a, c)

    net.upload(a, "candidate.pkg", 3 * MiB, stage="test")
    net.upload(a, "released.pkg", MiB, stage="prod")
    net.wait_available("candidate.pkg", [b])
    net.wait_converged()  # includes: C agrees on the state and holds what it accepts
    with net.step("C knows candidate.pkg (test) but does not hold it"):
        st = net.state(c)
        pkg = next(p for p in st["packages"] if p["name"] == "candidate.pkg")
        net.check(pkg["stage"] == "test" and c.id not in pkg["available_at"],
                  f"C should know candidate.pkg as test and not hold it: {pkg}", [c])
        net.check(not c.file("candidate.pkg").exists(), "C has a candidate.pkg file although it accepts only prod",
                  [c])
        net.say(f"  C: candidate.pkg [{pkg['stage']}] held by {', '.join(net.names(pkg['available_at']))}; "
                f"released.pkg held by C too")
    net.hold(lambda: not net.available_at(c, "candidate.pkg") and not c.file("candidate.pkg").exists(),
             1, "C does not pull the test package", sites=[c])

    net.stage(a, "candidate.pkg", "prod")
    net.wait_available("candidate.pkg", [c])
    net.wait_converged()
    with net.step("every site shows candidate.pkg as prod"):
        for s in (a, b, c):
            stage = next(p["stage"] for p in net.state(s)["packages"] if p["name"] == "candidate.pkg")
            net.check(stage == "prod", f"{s.name} shows candidate.pkg as {stage}", [s])
    net.check_files()
