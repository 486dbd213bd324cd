"""A hub and 4 spokes, each registered with the hub only: simultaneous uploads at two spokes.

First two spokes upload different packages at the same moment; every site ends
with both. Then two other spokes upload the same name with different content
at the same moment: every site ends with the same winner (the earliest upload),
the loser's spoke replaces its copy, and every site lists the conflict in
/api/v1/state "conflicts". The spoke whose upload lost the race is told so
with a 409 that says its upload was recorded but lost to an earlier one. (If
one spoke already sees the other's upload when its own finishes, it refuses
with a 409 before recording anything and there is no conflict; the pair is
then tried again under a new name.)
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from harness.network import Network

MiB = 1 << 20


def at_once(net: Network, *uploads: tuple, ok=(201,)) -> list[dict]:
    """Run uploads (site, name, size, seed) in parallel threads released by one barrier."""
    barrier = threading.Barrier(len(uploads))

    def go(args):
        site, name, size, seed = args
        barrier.wait(10)
        return net.upload(site, name, size, seed=seed, same_content=False, ok=ok)

    with ThreadPoolExecutor(len(uploads)) as pool:
        return list(pool.map(go, uploads))


def run(net: Network) -> None:
    hub, s1, s2, s3, s4 = net.hub("H", ["S1", "S2", "S3", "S4"])
    net.start()
    for spoke in (s1, s2, s3, s4):
        net.register(hub, spoke)
    net.wait_converged()

    with net.step("S1 and S2 upload different packages at the same moment"):
        at_once(net, (s1, "from-s1.pkg", 3 * MiB, "s1"), (s2, "from-s2.dmg", 2 * MiB, "s2"))
    net.wait_converged()
    net.check_files()

    with net.step("S3 and S4 upload the same name with different content at the same moment"):
        for attempt in range(1, 6):
            name = f"same-name-{attempt}.pkg"
            p3, p4 = at_once(net, (s3, name, MiB, f"s3-{attempt}"), (s4, name, MiB, f"s4-{attempt}"),
                             ok=(201, 409))
            recorded = [p["status"] == 201 or "at the same time" in p.get("detail", "") for p in (p3, p4)]
            if all(recorded):
                net.check(sorted([p3["status"], p4["status"]]) in ([201, 201], [201, 409]),
                          f"a race's loser should learn it lost (409) at once or later: {p3['status']}, "
                          f"{p4['status']}")
                break
            net.say(f"  attempt {attempt}: one spoke already saw the other's upload (409): no conflict; again")
        else:
            net.fail("five simultaneous same-name uploads never both got accepted")
        b3, b4 = p3["sent"]["blake3"], p4["sent"]["blake3"]
        net.check(b3 != b4, "the two uploads should differ in content")
    digest = net.wait_converged()
    with net.step(f"every site agrees on the winner of {name} and lists the conflict"):
        winners = {}
        for s in net.sites.values():
            # the digest covers each name's current content, not the losers: wait for the listing too
            st = net.wait_until(lambda s=s: (st := net.state(s)) and
                                any(c["name"] == name for c in st["conflicts"]) and st,
                                20, f"site {s.name} to list the conflict on {name}", sites=[s])
            pkg = next(p for p in st["packages"] if p["name"] == name)
            winners[s.name] = pkg["blake3"]
            conflicts = [c for c in st["conflicts"] if c["name"] == name]
            net.check(len(conflicts) == 1, f"site {s.name} should list one conflict for {name}, "
                                           f"lists {st['conflicts']}", [s])
            c = conflicts[0]
            net.check(c["winner"] == pkg["blake3"] and {c["blake3"], c["winner"]} == {b3, b4},
                      f"site {s.name} lists a conflict that does not match the two uploads: {c}", [s])
            full = net.package(s, name)
            winner_clock = f"{full['uploaded_at']:015d}:{full['origin']}"
            net.check(winner_clock < c["first_clock"], f"site {s.name}: the winner ({winner_clock}) should be "
                      f"the earlier upload, the loser was at {c['first_clock']}", [s])
        net.check(len(set(winners.values())) == 1, f"sites disagree on the winner: {winners}")
        winner = next(iter(winners.values()))
        won, lost = (s3, s4) if winner == b3 else (s4, s3)
        net.say(f"  winner: {won.name}'s upload ({winner[:12]}); {lost.name}'s content lost the name "
                f"everywhere (digest {digest[:12]})")
    net.check_files()
