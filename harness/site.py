"""One ``odst serve`` process: its command, environment and log; start until healthy, stop, kill -9.

Tests (``tests/conftest.py``), scenarios (:mod:`harness.network`) and benches (``bench/``) all
start sites through :class:`SiteProcess`, so a site is started, awaited and stopped one way.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import httpx

from harness.ports import HOST
from harness.wait import TimedOut, wait_until

ADMIN_TOKEN = "test-admin-token-0123456789"
CHECKOUT = Path(__file__).resolve().parent.parent  # the sites run the odst of this very checkout
STOP_TIMEOUT = 30.0
# the caller's ODST_* variables a site still gets: the test suite's cheap-argon2 knob
# (odst.accounts.passwords.TEST_KNOB, honoured only inside a pytest run)
PASSED_ON = ("ODST_TEST_ARGON2",)


@functools.cache
def tls_context():
    """The SSL context every harness client shares (httpx's default: certifi's CA bundle).
    httpx otherwise builds one for each Client and each ``httpx.get``, parsing the bundle again:
    ~25 ms of a core, though sites speak plain HTTP. Readiness polls every 50 ms made that
    about as much CPU as the site's own start."""
    return httpx.create_ssl_context()


class SiteFailed(AssertionError):
    """A site exited while starting or did not become healthy in time; the message has its log."""


def _die_with_parent() -> None:  # in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # Ctrl-C reaches the runner only; it stops the sites in order


@dataclass(kw_only=True)
class SiteProcess:
    """``odst serve --data DATA --http 127.0.0.1:PORT [--site-name NAME] [--leaf-listen ...] *extra_args``.

    The process inherits the caller's environment without its ``ODST_*`` variables (but those in
    ``PASSED_ON``), plus
    ``ODST_ADMIN_TOKEN``, ``ODST_LOG_LEVEL=info`` and ``env``; stdout and stderr go to
    ``log_path`` (default ``<data>-serve.log`` beside the data directory).

    ``die_with_parent`` puts the site in its own process group and has the kernel SIGTERM it
    when the starting thread dies: right for a runner (scenarios, benches) that must never leave
    sites behind, wrong for pytest, where a site may be started from a short-lived thread.
    """

    data: Path
    port: int
    token: str = ADMIN_TOKEN
    name: str | None = None  # --site-name
    leaf_port: int | None = None  # --leaf-listen 127.0.0.1:leaf_port (accepts leaf links)
    env: dict = field(default_factory=dict)
    extra_args: list = field(default_factory=list)
    log_path: Path | None = None
    die_with_parent: bool = False
    proc: subprocess.Popen | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        if self.log_path is None:
            self.log_path = self.data.parent / f"{self.data.name}-serve.log"

    # ----------------------------------------------------------------- what it is

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def nats_log(self) -> Path:
        return self.data / "run" / "nats.log"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "odst", "serve", "--data", str(self.data), "--http", f"{HOST}:{self.port}"]
        if self.name:
            cmd += ["--site-name", self.name]
        if self.leaf_port:
            cmd += ["--leaf-listen", f"{HOST}:{self.leaf_port}"]
        return cmd + [str(a) for a in self.extra_args]

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        kw.setdefault("verify", tls_context())
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {token or self.token}"}, **kw)

    def run_info(self) -> dict:
        """What the running process wrote to <data>/run/site.json (pid, site id, NATS URL)."""
        return json.loads((self.data / "run" / "site.json").read_text())

    def log(self, chars: int = 5000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = self.log(1 << 20)
        if not text:
            return "(no log)"
        return "\n".join(line[:400] for line in text.splitlines()[-lines:])

    # ----------------------------------------------------------------- starting

    def start_process(self) -> "SiteProcess":
        """Spawn ``odst serve`` and return at once (see :meth:`start` to wait until healthy)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ODST_") or k in PASSED_ON}
        env.update({"ODST_ADMIN_TOKEN": self.token, "ODST_LOG_LEVEL": "info", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([str(CHECKOUT), *filter(None, [os.environ.get("PYTHONPATH")])]),
                    **self.env})
        self.data.parent.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== harness: start #{self.starts} at {time.strftime('%H:%M:%SZ', time.gmtime())}: "
                      f"{' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, cwd=str(self.data.parent),
                                         preexec_fn=_die_with_parent if self.die_with_parent else None)
        return self

    def healthy(self) -> bool:
        """GET /healthz answers 200; raise :class:`SiteFailed` if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise SiteFailed(f"odst serve ({self.data.name}) exited with {self.proc.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.url}/healthz", timeout=2, verify=tls_context()).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float = 60.0) -> "SiteProcess":
        try:
            wait_until(self.healthy, timeout, 0.05, f"odst serve ({self.data.name}) to become healthy",
                       reraise=(SiteFailed,))
        except TimedOut:
            raise SiteFailed(f"odst serve ({self.data.name}) did not become healthy in {timeout:.0f}s:\n"
                             f"{self.log()}") from None
        return self

    def start(self, timeout: float = 60.0) -> "SiteProcess":
        """Start and wait until /healthz says 200."""
        return self.start_process().wait_healthy(timeout)

    # ----------------------------------------------------------------- stopping

    def signal_stop(self, sig: int = signal.SIGTERM) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def finish_stop(self, deadline: float, note: Callable[[str], None] = lambda _: None) -> int | None:
        """Wait for the signalled process until ``deadline``, then SIGKILL it."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            note(f"site {self.name or self.data.name} ignored its stop signal; killing pid {self.proc.pid}")
            self.proc.kill()
            return self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Signal (an orderly shutdown by default), wait; SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.signal_stop(sig)
        return self.finish_stop(time.monotonic() + timeout)

    def kill9(self) -> None:
        """kill -9 ``odst serve``. Its nats-server should follow by itself (PDEATHSIG): tests check
        that, so this does not reap it; a runner calls :meth:`reap_broker` afterwards."""
        self.proc.kill()
        self.proc.wait(10)

    def broker_pids(self) -> list[int]:
        """nats-server processes serving this site's data directory (started by its odst serve)."""
        needle = str(self.data / "run").encode()
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"nats-server" in cmd and needle in cmd:
                pids.append(int(p.name))
        return pids

    def reap_broker(self, timeout: float = 10.0, note: Callable[[str], None] = lambda _: None) -> None:
        """Wait until the site's nats-server is gone (it gets SIGTERM when its parent dies); one
        still there after ``timeout`` was started for this site, so it is killed by its pid."""
        deadline = time.monotonic() + timeout
        while (pids := self.broker_pids()) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            note(f"nats-server {pid} of site {self.name or self.data.name} outlived its parent; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def stop_all(sites: list[SiteProcess], timeout: float = STOP_TIMEOUT,
             note: Callable[[str], None] = lambda _: None) -> list[int | None]:
    """SIGTERM every given site that runs, all at once; wait for each (SIGKILL after ``timeout``)
    and for its nats-server. Returns the exit codes, None for a site that was not running."""
    running = [s for s in sites if s.running]
    for s in running:
        s.signal_stop()
    deadline = time.monotonic() + timeout
    codes = {id(s): s.finish_stop(deadline, note) for s in running}
    for s in running:
        s.reap_broker(note=note)
    return [codes.get(id(s)) for s in sites]
