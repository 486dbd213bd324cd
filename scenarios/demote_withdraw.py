"""Demoting withdraws: a site stops serving a package whose stage it no longer accepts.

Hub A (every stage) with spokes B and C, both accepting only prod. B keeps a withdrawn file
for the default grace period (1 h); C's grace is 0, so it removes the file at once.

1. release.pkg (prod) reaches B and C; Macs download it from both.
2. Demoted to test at A: B and C answer 404 at once. C removes its file and records
   PackageWithdrawn; B keeps its file (within the grace period) but does not serve it.
3. Promoted to prod again: B serves its kept file at once, without pulling it again;
   C pulls it again from A and serves it.
4. C changes its own accepted stages to test only: it withdraws release.pkg (prod) and pulls
   beta.pkg (test); back to prod only, the reverse.
"""

from __future__ import annotations

import httpx

from harness.network import Network

MiB = 1 << 20


def run(net: Network) -> None:
    a, b, c = net.hub("A", ["B", "C"], B={"accept": ["prod"]},
                      C={"accept": ["prod"], "env": {"ODST_WITHDRAW_GRACE_S": "0"}})
    net.start()
    net.register(a, b)
    net.register(a, c)

    def status(site, name: str) -> int:
        return httpx.get(f"{net[site].url}/CasperShare/Packages/{name}", timeout=10).status_code

    def events_by(site, type_: str, name: str) -> int:
        """How many events of this type, about this package, the site itself recorded."""
        page = net.get(site, f"/api/v1/events?type={type_}&name={name}&limit=1000")["events"]
        return sum(1 for e in page if e["origin"] == net[site].id)

    net.upload(a, "release.pkg", 2 * MiB, stage="prod")
    net.upload(a, "beta.pkg", MiB, stage="test")
    net.wait_available("release.pkg", [b, c])
    net.wait_converged()
    with net.step("release.pkg is served by B and C"):
        net.check(status(b, "release.pkg") == 200 and status(c, "release.pkg") == 200,
                  "B and C should serve release.pkg", [b, c])
    kept_inode = b.file("release.pkg").stat().st_ino
    pulls_by_b = events_by(b, "PackageAvailable", "release.pkg")

    net.stage(a, "release.pkg", "test")
    with net.step("demoted to test: B and C stop serving it at once"):
        net.wait_until(lambda: status(b, "release.pkg") == 404 and status(c, "release.pkg") == 404, 30,
                       "B and C to answer 404 for the demoted release.pkg", sites=[a, b, c])
    with net.step("C (grace 0) removes its file and records PackageWithdrawn; B (grace 1 h) keeps it"):
        net.wait_until(lambda: not c.file("release.pkg").exists()
                       and events_by(c, "PackageWithdrawn", "release.pkg") == 1, 30,
                       "C to withdraw release.pkg", sites=[c])
        net.check(b.file("release.pkg").exists() and events_by(b, "PackageWithdrawn", "release.pkg") == 0,
                  "B should keep its file within the grace period", [b])
        pkg = net.package(c, "release.pkg")
        net.check(pkg["availability"][c.id]["status"] == "withdrawn",
                  f"C's availability should say withdrawn: {pkg['availability'].get(c.id)}", [c])
        net.check(status(b, "release.pkg") == 404, "B must not serve the kept file of a test package", [b])

    net.stage(a, "release.pkg", "prod")
    with net.step("promoted again: B serves its kept file at once; C pulls it again"):
        net.wait_until(lambda: status(b, "release.pkg") == 200, 30, "B to serve release.pkg again", sites=[b])
        net.check(b.file("release.pkg").stat().st_ino == kept_inode
                  and events_by(b, "PackageAvailable", "release.pkg") == pulls_by_b,
                  "B should serve the file it kept, not pull it again", [b])
        net.wait_until(lambda: status(c, "release.pkg") == 200, 60, "C to pull and serve release.pkg again",
                       sites=[a, c])
    net.wait_converged()

    with net.step("C accepts only test now: release.pkg withdrawn, beta.pkg pulled"):
        net.request(c, "PUT", "/api/v1/settings/accepted-stages", json={"stages": ["test"]})
        c.accept = ["test"]
        net.check(status(c, "release.pkg") == 404, "C serves release.pkg right after it stopped accepting prod",
                  [c])
        net.wait_until(lambda: status(c, "beta.pkg") == 200 and not c.file("release.pkg").exists(), 60,
                       "C to serve beta.pkg and remove release.pkg", sites=[a, c])
    with net.step("C accepts prod again: the reverse"):
        net.request(c, "PUT", "/api/v1/settings/accepted-stages", json={"stages": ["prod"]})
        c.accept = ["prod"]
        net.wait_until(lambda: status(c, "release.pkg") == 200 and status(c, "beta.pkg") == 404
                       and not c.file("beta.pkg").exists(), 60,
                       "C to serve release.pkg again and withdraw beta.pkg", sites=[a, c])
    net.wait_converged()
    net.check_files()
