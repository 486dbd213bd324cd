"""Replacing a package under the same name while Macs download it from every site.

Hub H with spokes S1 and S2, all registered with H. Browser.pkg (4 MiB) is uploaded at H
and reaches every site. Then one client per site downloads it over and over, whole and as
a resumed Range download (the second half asked with If-Range: the ETag of the first),
while S1 replaces it with new content (6 MiB). Each site keeps serving the old version
until it holds the new one verified, then swaps: no request is answered 404 or 5xx, every
body (a resumed one put together) hashes to the old or the new version, each client sees
the old version, then the new one, never the old again, and every site's swap is seen by
its client. The time from the replace's answer until each site serves the new version is
reported as the replace window.
"""

from __future__ import annotations

import hashlib
import threading
import time

from harness.macs import Mac
from harness.network import Network, content_blocks

MiB = 1 << 20
NAME = "Browser.pkg"
CLIENT_DEADLINE_S = 90.0


def sha256_of(size: int, seed: str) -> str:
    h = hashlib.sha256()
    for block in content_blocks(size, seed):
        h.update(block)
    return h.hexdigest()


def run(net: Network) -> None:
    hub, s1, s2 = net.hub("H", ["S1", "S2"])
    net.start()
    net.register(hub, s1)
    net.register(hub, s2)
    sites = [hub, s1, s2]

    v1 = net.upload(hub, NAME, 4 * MiB, seed="v1")
    net.wait_converged()
    old_tag, old_sha = f'"{v1["blake3"]}"', sha256_of(4 * MiB, "v1")
    new_size = 6 * MiB
    new_sha = sha256_of(new_size, "v2")

    stop = threading.Event()
    macs = {s.name: Mac(s.name, s.url, NAME, stop, deadline_s=CLIENT_DEADLINE_S) for s in sites}
    try:
        with net.step("a Mac per site downloads the old version over and over"):
            for m in macs.values():
                m.start()
            net.wait_until(lambda: all(m.first(old_tag) for m in macs.values()), 30,
                           "every site to serve the old version to its Mac", sites=sites)
        v2 = net.upload(s1, NAME, new_size, seed="v2", replace=True)
        replaced_at = time.monotonic()
        new_tag = f'"{v2["sent"]["blake3"]}"'
        net.check(v2["blake3"] == v2["sent"]["blake3"] and v2["generation"] == 1,
                  f"S1 should answer with the new version, generation 1: {v2}")
        with net.step("wait until every site serves the new version, by every site's read model and its Mac"):
            ids = {s.id for s in sites}
            for s in sites:
                net.wait_until(lambda s=s: (p := net.package(s, NAME)) and p["serving"] == {i: v2["blake3"] for i in ids},
                               60, f"{s.name} to know that every site serves the new version", sites=sites)
            net.wait_until(lambda: all(m.first(new_tag) for m in macs.values()), 30,
                           "every Mac to get the new version", sites=sites)
    finally:
        stop.set()
        for m in macs.values():
            m.join(40)

    with net.step("check every answer the Macs got"):
        windows = {}
        for name, m in macs.items():
            problems = m.problems({old_tag: old_sha, new_tag: new_sha})
            net.check(not problems, f"the Mac at {name}: {problems[:5]}")
            tags = [x.etag for x in m.seen]
            first_new = tags.index(new_tag)
            net.check(first_new > 0, f"the Mac at {name} never got the old version")
            windows[name] = max(0.0, m.seen[first_new].t - replaced_at)
            net.say(f"  {name}: {len(m.seen)} downloads ({first_new} old, {len(m.seen) - first_new} new, "
                    f"{sum(1 for x in m.seen if x.kind == 'resumed, restarted')} resumes restarted by the swap); "
                    f"new version seen {windows[name]:.2f}s after the replace")
        net.results["replace_window_s"] = windows
    net.wait_converged()
    net.check_files()
