"""A delete reaches a site that was offline: it removes its copy and nothing resurrects it.

Chain A <- B <- C, registered A-B and B-C. C holds the package; C is stopped;
the package is deleted at A (B removes its copy); C restarts, learns the
tombstone from the log, removes its file, and no site brings the package back.
"""

from __future__ import annotations

from harness.network import Network

MiB = 1 << 20


def run(net: Network) -> None:
    a, b, c = net.chain("A", "B", "C")
    net.start()
    net.register(a, b)
    net.register(b, c)
    net.upload(a, "doomed.pkg", 2 * MiB)
    net.upload(a, "keeper.pkg", MiB)
    net.wait_converged()
    net.check(c.file("doomed.pkg").exists(), "C should hold doomed.pkg before going offline", [c])

    net.stop(c)
    net.delete(a, "doomed.pkg")
    net.wait_until(lambda: not b.file("doomed.pkg").exists() and net.package(b, "doomed.pkg") is None,
                   30, "B to drop doomed.pkg", sites=[a, b])
    net.check(c.file("doomed.pkg").exists(), "C is offline: its copy of doomed.pkg should still be there", [c])

    net.start(c)
    net.wait_until(lambda: not c.file("doomed.pkg").exists(), 60, "C to remove its copy of doomed.pkg",
                   sites=[b, c])
    net.wait_converged()

    def gone_everywhere() -> bool:
        return all(net.package(s, "doomed.pkg") is None and not s.file("doomed.pkg").exists()
                   and all(p["name"] != "doomed.pkg" for p in net.state(s)["packages"])
                   for s in (a, b, c))
    net.check(gone_everywhere(), "doomed.pkg should be gone from every site")
    net.hold(gone_everywhere, 3, "doomed.pkg stays gone on every site (nobody resurrects it)")
    net.check_files()
