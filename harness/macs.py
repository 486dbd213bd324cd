"""Macs downloading one package from one site over and over: the clients of the replace stories
(scenarios/replace_cutover.py, the Jamf Pro story in tests/system/test_jamf.py, bench/jamf.py).

Each ``Mac`` alternates a whole GET and a resumed download (the first ``split`` bytes, then the
rest with ``If-Range`` naming the first answer's ETag) until told to stop or a deadline, and
keeps one ``Sample`` per download: when it started and ended, the status, the ETag and the
SHA-256 of the body (a resumed one put together)."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import NamedTuple
from urllib.parse import quote

import httpx

MiB = 1 << 20


class Sample(NamedTuple):
    started: float  # time.monotonic() when the (first) request was sent
    t: float  # time.monotonic() when the body was complete
    status: int
    etag: str
    sha256: str
    kind: str  # "whole" | "resumed" | "resumed, restarted" (the version changed in between) | "first half"


class Mac(threading.Thread):
    """Downloads ``name`` from ``url`` (a site's base URL) until ``stop`` is set or ``deadline_s``."""

    def __init__(self, label: str, url: str, name: str, stop: threading.Event, *, deadline_s: float = 90.0,
                 split: int = 2 * MiB):
        super().__init__(daemon=True, name=f"mac-{label}")
        self.label, self.url, self.path = label, url, f"/CasperShare/Packages/{quote(name)}"
        self.stop_flag, self.deadline_s, self.split = stop, deadline_s, split
        self.seen: list[Sample] = []
        self.errors: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.deadline_s
        with httpx.Client(base_url=self.url, timeout=30) as http:
            whole = True
            while not self.stop_flag.is_set() and time.monotonic() < deadline:
                try:
                    self._whole(http) if whole else self._resumed(http)
                except httpx.HTTPError as exc:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                whole = not whole

    def _record(self, started: float, status: int, etag: str, body: bytes, kind: str) -> None:
        self.seen.append(Sample(started, time.monotonic(), status, etag, hashlib.sha256(body).hexdigest(), kind))

    def _whole(self, http: httpx.Client) -> None:
        started = time.monotonic()
        r = http.get(self.path)
        self._record(started, r.status_code, r.headers.get("etag", ""), r.content, "whole")

    def _resumed(self, http: httpx.Client) -> None:
        started = time.monotonic()
        first = http.get(self.path, headers={"Range": f"bytes=0-{self.split - 1}"})
        if first.status_code != 206:
            self._record(started, first.status_code, first.headers.get("etag", ""), first.content, "first half")
            return
        etag = first.headers["etag"]
        rest = http.get(self.path, headers={"Range": f"bytes={self.split}-", "If-Range": etag})
        if rest.status_code == 206:  # the same version: the halves make one body
            self._record(started, 206, etag, first.content + rest.content, "resumed")
        else:  # 200: the version changed in between, and the whole new body came
            self._record(started, rest.status_code, rest.headers.get("etag", ""), rest.content, "resumed, restarted")

    def problems(self, versions: dict[str, str]) -> list[str]:
        """What went wrong for this Mac, given {ETag: sha256} of the versions it may get: failed
        requests, answers other than 200/206, bodies that are neither version (or do not match
        their ETag), and the old version again after a newer one (versions in order, oldest first)."""
        out = [f"{self.label}: failed request: {e}" for e in self.errors[:5]]
        bad = [x for x in self.seen if x.status not in (200, 206)]
        if bad:
            out.append(f"{self.label}: answers {sorted({x.status for x in bad})}: {bad[:3]}")
        for x in self.seen:
            if versions.get(x.etag) != x.sha256:
                out.append(f"{self.label}: a {x.kind} body ({x.status}, ETag {x.etag}) that is neither version: "
                           f"sha256 {x.sha256}")
        order = list(versions)
        ranks = [order.index(x.etag) for x in self.seen if x.etag in versions]
        if any(b < a for a, b in zip(ranks, ranks[1:])):
            out.append(f"{self.label}: an older version after a newer one: {[x.etag for x in self.seen]}")
        return out

    def first(self, etag: str) -> Sample | None:
        """The first download that got ``etag``."""
        return next((x for x in self.seen if x.etag == etag), None)
