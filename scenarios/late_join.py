"""A site registered after packages were uploaded, staged and deleted catches up from the log.

Hub A with spoke B, registered, with history: three uploads, a promotion and a
delete. Then D is started, linked to A and registered with B only; it learns A
through B, replays everyone's log, pulls what it should hold (from both A and
B) and nothing that was deleted.
"""

from __future__ import annotations

from harness.network import Network

MiB = 1 << 20


def run(net: Network) -> None:
    a, b = net.hub("A", ["B"])
    net.start()
    net.register(a, b)
    net.upload(a, "old-1.pkg", 2 * MiB)
    net.upload(b, "old-2.dmg", 3 * MiB, stage="test")
    net.upload(a, "old-3.pkg", MiB)
    net.stage(b, "old-2.dmg", "prod")
    net.delete(a, "old-3.pkg")
    net.wait_converged()

    d = net.add("D", dial=[a])
    net.start(d)
    net.register(b, d)
    net.wait_converged()
    with net.step("D holds exactly the live packages, with the history's stages"):
        st = net.state(d)
        held = sorted(p["name"] for p in st["packages"] if d.id in p["available_at"])
        net.check(held == ["old-1.pkg", "old-2.dmg"], f"D should hold old-1.pkg and old-2.dmg, holds {held}", [d])
        stages = {p["name"]: p["stage"] for p in st["packages"]}
        net.check(stages.get("old-2.dmg") == "prod", f"D should see old-2.dmg promoted to prod: {stages}", [d])
        net.check(not d.file("old-3.pkg").exists(), "D resurrected the deleted old-3.pkg", [d])
        net.say(f"  D holds {', '.join(held)}")
    net.check_files()
