"""Counters of what a running site served: bumped by the gateway, read by /metrics."""

from __future__ import annotations

from collections import Counter


class SiteStats:
    """Counters the gateway and downloads bump; read by the collector."""

    def __init__(self):
        self.uploads: Counter[str] = Counter()  # by result: published | replaced | identical | refused | failed
        self.appends: Counter[str] = Counter()  # the gateway's group commit: rounds | events (batch.GroupCommit)
        self.downloads: Counter[int] = Counter()  # by HTTP status
        self.bytes_served = 0
