"""One allocator of free TCP ports on 127.0.0.1, safe when pytest-xdist workers run side by side."""

from __future__ import annotations

import os
import socket

HOST = "127.0.0.1"  # everything the harness starts listens here only

_PORT_BLOCK = 2000
_ports: dict[str, int] = {}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now.

    Under pytest-xdist (``PYTEST_XDIST_WORKER=gwN``) each worker hands out ports from a block
    of its own below the kernel's ephemeral range (32768+): two workers never pick the same
    port between checking it and a server binding it, and no kernel-chosen port (an embedded
    broker's ``:-1``) lands on one either. Otherwise the kernel picks.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not (worker.startswith("gw") and worker[2:].isdigit() and int(worker[2:]) < 6):
        with socket.socket() as s:
            s.bind((HOST, 0))
            return s.getsockname()[1]
    base = 20000 + int(worker[2:]) * _PORT_BLOCK
    for _ in range(_PORT_BLOCK):
        port = _ports.get(worker, base)
        _ports[worker] = base + (port + 1 - base) % _PORT_BLOCK
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue  # still held, or in TIME_WAIT from an earlier test
            return port
    raise RuntimeError(f"no free port in {base}-{base + _PORT_BLOCK - 1}")
