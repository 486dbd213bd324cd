"""Fixtures that start real processes: nats-server from the wheel and ``odst serve``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness.ports import free_port  # noqa: F401  (one port allocator, safe under pytest-xdist)
from harness.site import ADMIN_TOKEN, SiteProcess, stop_all  # noqa: F401  (one harness for tests, scenarios, benches)
from harness.wait import wait_until
from odst.bus.embedded import nats_server_binary

pytest_plugins = ["tests.ldap_server", "tests.browser"]

# Every site and odst command the tests start hashes passwords with argon2's smallest parameters
# (odst.accounts.passwords.TEST_KNOB; the harness passes it on, odst honours it only under
# pytest): each site start makes one hash and many tests sign in. test_accounts'
# sign-in flood keeps the real ones, and checks that it has them.
os.environ["ODST_TEST_ARGON2"] = "cheap"


def _one_default_tls_context() -> None:
    """httpx builds a new SSL context (certifi's CA bundle parsed: ~25 ms of a core) for every
    ``httpx.get`` and every Client, even for http:// URLs, and the tests poll plain-HTTP sites
    thousands of times. Clients that ask for httpx's default verification (``verify=True``, no
    ``cert``) share the one the harness made; any other ``verify`` is built as asked."""
    from httpx._transports import default
    from harness.site import tls_context
    build = default.create_ssl_context

    def shared(verify=True, cert=None, trust_env=True):
        if verify is True and cert is None and trust_env:
            return tls_context()
        return build(verify=verify, cert=cert, trust_env=trust_env)
    default.create_ssl_context = shared


_one_default_tls_context()


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
    stop_all(started)  # SIGTERM to every site at once: a test's sites stop side by side


@pytest.fixture
def site(make_site) -> SiteProcess:
    return make_site().start()


@contextlib.contextmanager
def module_site(tmp_path_factory, label: str, **kw):
    """A site for a module's fixture (``scope="module"``): one start for many small cases that
    each leave it as they found it."""
    s = SiteProcess(data=tmp_path_factory.mktemp(label) / "site", port=free_port(), **kw).start()
    try:
        yield s
    finally:
        s.stop()


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


def available_at(events: list[dict], origin: str) -> list[str]:
    """The package names ``origin`` reported holding a verified copy of, one per report: each
    PackageAvailable's, and each item's of a PackagesAvailable (small packages pulled together)."""
    out = []
    for e in events:
        if e["envelope"]["origin"] != origin:
            continue
        if e["type"] == "PackageAvailable":
            out.append(e["envelope"]["event"]["name"])
        elif e["type"] == "PackagesAvailable":
            out += [item["name"] for item in e["envelope"]["event"]["items"]]
    return out


def read_status_line(sock: socket.socket, timeout: float = 20.0) -> tuple[int, bytes]:
    """Read an HTTP response head from a raw socket: (status, whole head)."""
    sock.settimeout(timeout)
    head = b""
    while b"\r\n\r\n" not in head:
        piece = sock.recv(65536)
        if not piece:
            break
        head += piece
    assert head.startswith(b"HTTP/1.1 "), head
    return int(head.split(b" ", 2)[1]), head


def site_run_info(data: Path) -> dict:
    """What a running ``odst serve`` published about itself (broker URL, pid, ...)."""
    import json
    return json.loads((data / "run" / "site.json").read_text())


async def open_log(url: str, key):
    """A connection to the NATS server at ``url`` and the event log of ``key``'s site on it,
    its stream made: (connection, JetStream context, log). The caller closes the connection."""
    import nats
    from odst.events.log import EventLog
    nc = await nats.connect(url)
    js = nc.jetstream()
    log = EventLog(js, key)
    await log.ensure_stream()
    return nc, js, log


@contextlib.asynccontextmanager
async def founded_log(url: str, tmp_path: Path):
    """A site's event log on the NATS server at ``url`` with a real projector folding it into
    ``tmp_path/read.sqlite`` and a ConfirmedAppender over both, the site founded: yields
    (JetStream context, site key, log, appender, reader). Everything is closed on the way out."""
    from odst.events import catalogue as ev
    from odst.events.log import EVENTS_STREAM
    from odst.events.signing import SiteKey
    from odst.projections.appender import ConfirmedAppender
    from odst.projections.db import connect
    from odst.projections.projector import Projector
    key = SiteKey.load_or_create(tmp_path / "site.key")
    nc, js, log = await open_log(url, key)
    projector = Projector(js, tmp_path / "read.sqlite", {key.site_id: key.public_key}, [EVENTS_STREAM])
    projector.start()
    reader = connect(tmp_path / "read.sqlite")
    try:
        writer = ConfirmedAppender(log, projector, reader)
        await writer.append(ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex(), name="G"),
                            actor="system")
        yield js, key, log, writer, reader
    finally:
        reader.close()
        await projector.stop()
        projector.conn.close()
        await nc.close()


async def site_nats(data: Path, **kw):
    """A NATS connection to a running site's broker with the site's own client credential
    (every right: tests that publish straight into a site's broker act as the site itself)."""
    from odst.bus import connect_as_site
    return await connect_as_site(data, **kw)


# Modules with the longest single tests (images and wheels built, three-site stories, rebuilds
# from the log, 2 GB uploads), longest first as measured: started first, so the two xdist workers
# do not end the run with one of them alone on a long test while the other has finished.
SLOW_FIRST = ("test_container.py", "test_scenarios.py", "test_roles.py", "test_done_means.py",
              "test_docs.py", "test_packaging.py", "test_cluster.py", "test_audit.py", "test_recovery.py",
              "test_jamf.py", "test_peer_evidence.py", "test_schemathesis.py", "test_backup.py",
              "test_logwatch.py", "test_registration.py")


def _uses_a_module_fixture(item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    return info is not None and any(defs and defs[-1].scope == "module"
                                    for defs in info.name2fixturedefs.values())


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """The slow modules first, in SLOW_FIRST's order: under xdist the two workers share them
    from the start instead of one of them ending the run alone on a long test.

    ``./run test`` distributes with ``--dist loadgroup --no-loadscope-reorder``: test by test in
    this order, except that the tests of a module with a module-scoped fixture (a shared site,
    a browser, a built image or wheel) are one group and run on one worker, so that fixture is
    made once, not once per worker."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: otherwise as collected
    for item in items:
        if _uses_a_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.path.stem))


class _GroupCheck:
    """Under ``--dist loadgroup``, after xdist's worker hook: each grouped item's node id must
    carry its group (``…@group``), which is all the scheduler goes by. pytest 9.2 with
    pytest-xdist 3.8 dropped it without a word, and every module fixture (a shared site, a
    browser, a built image) was made on both workers at once: two debootstraps into one
    directory failed CI."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items):
        if not getattr(config.option, "loadgroup", False):  # set in xdist workers only
            return
        lost = [item.nodeid for item in items if any(item.iter_markers("xdist_group")) and "@" not in item.nodeid]
        if lost:  # the run stops (xdist's controller may report it as an INTERNALERROR of its own)
            raise pytest.UsageError(f"--dist loadgroup lost the group of {len(lost)} tests (e.g. {lost[0]}): "
                                    "this pytest and pytest-xdist do not agree on node ids; see pyproject.toml")


def pytest_configure(config):
    config.pluginmanager.register(_GroupCheck(), "odst-group-check")


def read_http_response(sock, buffered: bytes = b"") -> tuple[int, bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length body from a raw socket (after ``buffered``,
    bytes already read): (status, body, bytes read past it)."""
    data = buffered
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")[1:]
                      if line.lower().startswith(b"content-length:")))
    while len(rest) < length:
        piece = sock.recv(65536)
        assert piece, rest
        rest += piece
    return int(head.split(b" ", 2)[1]), rest[:length], rest[length:]
