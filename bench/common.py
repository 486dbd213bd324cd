"""Small helpers both benchmarks use."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout: harness/ and odst/
from harness.ports import HOST, free_port  # noqa: E402,F401  (one port allocator; everything listens on HOST)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b
