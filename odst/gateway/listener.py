"""The gateway's listening socket, shared only among one site's own gateway processes.

Several gateway processes of one site (``odst serve`` with ``http_workers`` > 1, or
``odst gateway`` roles on a shared data directory) listen on one port with SO_REUSEPORT and
the kernel spreads connections across them. SO_REUSEPORT alone would let any process of the
same user join, so a second site started on a port the first serves would get half of the
Macs' requests. So a process joins a port already in use only when its own data directory
holds a live claim on that address: every gateway process holds a shared ``flock`` on
``<data>/run/http-<host>-<port>.lock`` for as long as it lives. Anything else is refused
with :class:`PortTaken`.

The check (is the port in use, is it ours) and the bind happen under a machine-wide mutex,
a Linux abstract Unix socket named after the address (released by the kernel when the
process dies), so two sites starting at the same moment cannot both find the port free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

from odst.datadir import run_dir


class PortTaken(Exception):
    """The gateway's address is served by a process that is not one of this site's gateways."""


class AddressInvalid(Exception):
    """The gateway's address cannot be listened on here (no such host, not this machine's, no permission)."""


def claim_path(data: Path, host: str, port: int) -> Path:
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in host.strip("[]"))
    return run_dir(data) / f"http-{safe}-{port}.lock"


def _family_and_address(host: str, port: int) -> tuple[int, tuple]:
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise AddressInvalid(f"cannot listen on {host}:{port}: the host {host!r} does not resolve "
                             f"({getattr(exc, 'strerror', None) or exc})") from None
    family, _, _, _, address = infos[0]
    return family, address


def _claimed(path: Path) -> bool:
    """Does a live gateway process of this site hold the claim on this address?"""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _in_use(family: int, address: tuple) -> bool:
    """Is something listening on the address? (SO_REUSEADDR: a TIME_WAIT leftover does not count.)"""
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        return False
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return True
        raise AddressInvalid(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None
    finally:
        probe.close()


def _refusal(host: str, port: int) -> PortTaken:
    return PortTaken(f"{host}:{port} is already in use by another process (another ODST site, or another "
                     "program): only this site's own gateway processes may share its port. Stop that process "
                     "or give this site another --http HOST:PORT")


@contextlib.contextmanager
def _bind_mutex(host: str, port: int, wait_s: float = 10.0):
    """Machine-wide: one process at a time checks and binds this address (Linux only; elsewhere
    the check is still made, only not atomically with the bind)."""
    if not sys.platform.startswith("linux"):
        yield
        return
    mutex = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                mutex.bind(f"\0odst-http-bind:{host.strip('[]')}:{port}".encode())
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # another process's check-and-bind takes milliseconds
        yield
    finally:
        mutex.close()


def check(data: Path, host: str, port: int) -> None:
    """Before a site opens anything: fail early if the address is not ours to serve.
    :func:`listen` makes the same check again, atomically with the bind."""
    family, address = _family_and_address(host, port)
    if port and _in_use(family, address) and not _claimed(claim_path(data, host, port)):
        raise _refusal(host, port)


class Listener:
    """The bound, listening socket and this process's claim on its address (kept until exit)."""

    def __init__(self, sock: socket.socket, claim_fd: int):
        self.socket = sock
        self._claim_fd = claim_fd

    def close(self) -> None:
        self.socket.close()
        if self._claim_fd >= 0:
            os.close(self._claim_fd)
            self._claim_fd = -1


def listen(data: Path, host: str, port: int, backlog: int = 2048) -> Listener:
    """Bind and listen on host:port, joining the site's other gateway processes there if any
    run; refuse (:class:`PortTaken`) if something else holds the address."""
    family, address = _family_and_address(host, port)
    claim = claim_path(data, host, port)
    claim.parent.mkdir(parents=True, exist_ok=True)
    with _bind_mutex(host, port):
        if port and _in_use(family, address) and not _claimed(claim):
            raise _refusal(host, port)
        fd = os.open(claim, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
            sock.listen(backlog)
        except BaseException:
            sock.close()
            os.close(fd)
            raise
    sock.set_inheritable(True)
    return Listener(sock, fd)
