"""Small helpers both benchmarks use."""

from __future__ import annotations

import socket
import statistics

HOST = "127.0.0.1"  # everything the benchmarks start listens here only


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b
