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
from urllib.parse import quote

import httpx

from harness.network import Network, content_blocks

MiB = 1 << 20
NAME = "Browser.pkg"
CLIENT_DEADLINE_S = 90.0


def sha256_of(size: int, seed: str) -> str:
    h = hashlib.sha256()
    for block in content_blocks(size, seed):
        h.update(block)
    return h.hexdigest()


class Mac(threading.Thread):
    """Downloads NAME from one site until told to stop (or a deadline): whole, then resumed."""

    def __init__(self, site, stop: threading.Event):
        super().__init__(daemon=True, name=f"mac-{site.name}")
        self.site, self.stop_flag = site, stop
        self.seen: list[tuple[float, int, str, str, str]] = []  # (t, status, etag, sha256, kind)
        self.errors: list[str] = []

    def run(self) -> None:
        url = f"/CasperShare/Packages/{quote(NAME)}"
        deadline = time.monotonic() + CLIENT_DEADLINE_S
        with httpx.Client(base_url=self.site.url, timeout=30) as http:
            whole = True
            while not self.stop_flag.is_set() and time.monotonic() < deadline:
                try:
                    self._whole(http, url) if whole else self._resumed(http, url)
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                whole = not whole

    def _record(self, status: int, etag: str, body: bytes, kind: str) -> None:
        self.seen.append((time.monotonic(), status, etag, hashlib.sha256(body).hexdigest(), kind))

    def _whole(self, http, url) -> None:
        r = http.get(url)
        self._record(r.status_code, r.headers.get("etag", ""), r.content, "whole")

    def _resumed(self, http, url) -> None:
        first = http.get(url, headers={"Range": f"bytes=0-{2 * MiB - 1}"})
        if first.status_code != 206:
            self._record(first.status_code, first.headers.get("etag", ""), first.content, "first half")
            return
        etag = first.headers["etag"]
        rest = http.get(url, headers={"Range": f"bytes={2 * MiB}-", "If-Range": etag})
        if rest.status_code == 206:  # the same version: the halves make one body
            self._record(206, etag, first.content + rest.content, "resumed")
        else:  # 200: the version changed in between, and the whole new body came
            self._record(rest.status_code, rest.headers.get("etag", ""), rest.content, "resumed, restarted")


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
    macs = {s.name: Mac(s, stop) for s in sites}
    try:
        with net.step("a Mac per site downloads the old version over and over"):
            for m in macs.values():
                m.start()
            net.wait_until(lambda: all(any(x[2] == old_tag for x in m.seen) for m in macs.values()), 30,
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
            net.wait_until(lambda: all(any(x[2] == new_tag for x in m.seen) for m in macs.values()), 30,
                           "every Mac to get the new version", sites=sites)
    finally:
        stop.set()
        for m in macs.values():
            m.join(40)

    with net.step("check every answer the Macs got"):
        windows = {}
        for name, m in macs.items():
            net.check(not m.errors, f"the Mac at {name} had failed requests: {m.errors[:5]}")
            bad = [x for x in m.seen if x[1] not in (200, 206)]
            net.check(not bad, f"the Mac at {name} got {sorted({x[1] for x in bad})} answers: {bad[:3]}")
            for t, status, etag, sha, kind in m.seen:
                expect = {old_tag: old_sha, new_tag: new_sha}.get(etag)
                net.check(expect is not None and sha == expect,
                          f"the Mac at {name} got a {kind} body ({status}, ETag {etag}) that is neither "
                          f"version: sha256 {sha}")
            tags = [x[2] for x in m.seen]
            first_new = tags.index(new_tag)
            net.check(old_tag not in tags[first_new:],
                      f"the Mac at {name} got the old version again after the new one: {tags}")
            net.check(first_new > 0, f"the Mac at {name} never got the old version")
            windows[name] = max(0.0, m.seen[first_new][0] - replaced_at)
            net.say(f"  {name}: {len(m.seen)} downloads ({first_new} old, {len(m.seen) - first_new} new, "
                    f"{sum(1 for x in m.seen if x[4] == 'resumed, restarted')} resumes restarted by the swap); "
                    f"new version seen {windows[name]:.2f}s after the replace")
        net.results["replace_window_s"] = windows
    net.wait_converged()
    net.check_files()
