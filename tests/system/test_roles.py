"""One site run as separate processes on a shared NATS and data directory:
a projector, two gateways behind no load balancer, two replicators sharing the work."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys

from pathlib import Path

import httpx
import pytest

from odst.bus import connect
from odst.bus.embedded import nats_server_binary
from odst.bus.identity import client_seed_path, read_seed
from tests.conftest import ADMIN_TOKEN, free_port, run_odst, wait_until, write_random

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


class Procs:
    def __init__(self, tmp):
        self.tmp, self.procs = tmp, []

    def start(self, name, cmd, env=None):
        log = open(self.tmp / f"{name}.log", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, "ODST_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})})
        log.close()
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


def odst(*args):
    return [sys.executable, "-m", "odst", *args]


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    yield p
    p.stop_all()


def healthy(url):
    return httpx.get(f"{url}/healthz", timeout=2).status_code == 200


def shipped_nats_conf(dest: Path, **ports: int) -> Path:
    """deploy/nats/nats.conf as compose runs it, on loopback ports, its store in dest."""
    text = (ROOT / "deploy" / "nats" / "nats.conf").read_text()
    for old, new in (('store_dir: "/data"', f'store_dir: "{dest / "js"}"'),
                     ('"0.0.0.0:4222"', f'"127.0.0.1:{ports["client"]}"'),
                     ('"0.0.0.0:8222"', f'"127.0.0.1:{ports["http"]}"'),
                     ('"0.0.0.0:7422"', f'"127.0.0.1:{ports["leaf"]}"')):
        assert old in text, f"nats.conf no longer has {old}"
        text = text.replace(old, new)
    (dest / "nats.conf").write_text(text)
    return dest / "nats.conf"


def test_roles_share_one_site(tmp_path, procs, make_site):
    """compose.yaml's layout: the shipped nats.conf with what `odst nats-config` wrote, and the
    roles as separate processes; a peer registered while it runs gets its leaf link accepted
    without a restart of NATS (the projector rewrites auth.conf and reloads it over $SYS)."""
    data = tmp_path / "site"
    out = run_odst("nats-config", "--data", str(data), "--out", str(tmp_path / "nats" / "site"))
    assert out.returncode == 0, out.stderr
    site_id = run_odst("site-id", "--data", str(data)).stdout.strip()
    ports = {"client": free_port(), "http": free_port(), "leaf": free_port()}
    leaf = ports["leaf"]
    nats_proc = procs.start("nats", [nats_server_binary(), "-c", str(shipped_nats_conf(tmp_path / "nats", **ports))])
    url = f"nats://127.0.0.1:{ports['client']}"
    common = ["--data", str(data), "--nats", url]
    wait_until(lambda: httpx.get(f"http://127.0.0.1:{ports['http']}/healthz", timeout=2).status_code == 200, 30,
               what="nats-server up")

    # a NATS with the wrong domain is refused clearly (with a valid credential: the site's)
    wrong = run_odst("projector", "--data", str(tmp_path / "other"), "--nats", url, timeout=60,
                     env={"ODST_NATS_CREDENTIALS": str(client_seed_path(data))})
    assert wrong.returncode == 2 and "domain" in wrong.stderr and "site-id" in wrong.stderr

    procs.start("projector", odst("projector", *common),
                env={"ODST_NATS_AUTH_FILE": str(tmp_path / "nats" / "site" / "auth.conf")})
    g1, g2 = free_port(), free_port()
    projector = procs.procs[-1]
    for g in (g1, g2):
        procs.start(f"gateway-{g}", odst("gateway", *common, "--http", f"127.0.0.1:{g}"),
                    env={"ODST_APPLY_WAIT_S": "8"})
    u1, u2 = f"http://127.0.0.1:{g1}", f"http://127.0.0.1:{g2}"
    wait_until(lambda: healthy(u1) and healthy(u2), 90, what="both gateways healthy")

    # a second projector on the same data directory is refused
    second = run_odst("projector", *common, timeout=60)
    assert second.returncode == 2 and "another odst process" in second.stderr

    # read-your-writes across processes: upload through one gateway, read through the other
    body = os.urandom(300_000)
    r = httpx.put(f"{u1}/api/v1/packages/roles.pkg", content=body, headers=HEADERS, timeout=60)
    assert r.status_code == 201, r.text
    r2 = httpx.get(f"{u2}/api/v1/packages/roles.pkg", headers=HEADERS)
    assert r2.status_code == 200 and r2.json()["sha1"] == hashlib.sha1(body).hexdigest()
    assert httpx.get(f"{u2}/CasperShare/Packages/roles.pkg").content == body

    # a read model that does not apply an upload in time: the upload stands (its event is in
    # the log), so the answer says so and its file stays; it appears once the projector folds it
    projector.send_signal(signal.SIGSTOP)
    try:
        late = os.urandom(50_000)
        r = httpx.put(f"{u1}/api/v1/packages/late.pkg", content=late, headers=HEADERS, timeout=60)
        assert r.status_code == 503 and "recorded" in r.text, r.text
        assert (data / "store" / "packages" / "late.pkg").read_bytes() == late
    finally:
        projector.send_signal(signal.SIGCONT)
    wait_until(lambda: httpx.get(f"{u2}/api/v1/packages/late.pkg", headers=HEADERS).status_code == 200, 30,
               what="the late upload to be applied")
    assert httpx.get(f"{u2}/CasperShare/Packages/late.pkg").content == late
    again = httpx.put(f"{u1}/api/v1/packages/late.pkg", content=late, headers=HEADERS, timeout=60)
    assert again.status_code == 200, again.text  # the same bytes: identical, nothing new recorded

    # two replicators share one work queue; a killed one's pull passes to the other
    rep_env = {"ODST_REPLICATION_STREAMS": "1", "ODST_REPLICATION_LEASE_S": "6"}
    reps = [procs.start(f"replicator-{i}", odst("replicator", *common), env=rep_env) for i in range(2)]

    def leafs():
        return httpx.get(f"http://127.0.0.1:{ports['http']}/leafz", timeout=2).json()["leafnodes"]
    peer = make_site("peer", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}"]).start()
    wait_until(lambda: "Authorization Violation" in (peer.data / "run" / "nats.log").read_text(errors="replace"),
               30, what="NATS to refuse the leaf link of a site not registered yet")
    assert leafs() == 0
    token = httpx.post(f"{u1}/api/v1/peers/invites", json={}, headers=HEADERS).json()["token"]
    with peer.client() as pc:
        joined = pc.post("/api/v1/peers/join", json={"token": token})
        assert joined.status_code == 201, joined.text
        wait_until(lambda: leafs() == 1, 30, what="the registered peer's leaf link, after a reload")
        assert nats_proc.poll() is None  # the same nats-server: reloaded, not restarted
        # a pull slow enough to be caught in the middle (unthrottled, 80 MiB takes under a second;
        # loopback is a local network, exempt unless the link says otherwise)
        peer_id = pc.get("/api/v1/site").json()["site"]
        r = httpx.put(f"{u1}/api/v1/bandwidth/links/{peer_id}", json={"receive": "8MB", "local": "no"}, headers=HEADERS)
        assert r.status_code == 200, r.text
        src = write_random(tmp_path / "big.pkg", 80 * (1 << 20), seed=11)
        with open(src, "rb") as f:
            assert pc.put("/api/v1/packages/big.pkg", content=f).status_code == 201
        pkg = pc.get("/api/v1/packages/big.pkg").json()

    async def lease_owner():
        nc = await connect(url, seed=read_seed(client_seed_path(data)))
        try:
            kv = await nc.jetstream().key_value("ODST_LEASES")
            entry = await kv.get(pkg["blake3"])
            return entry.value.decode()
        except Exception:
            return None
        finally:
            await nc.close()

    def holder():
        owner = asyncio.run(lease_owner())
        tmp_file = data / "store" / "tmp" / f"{pkg['blake3']}.repl"
        if owner and tmp_file.exists():
            with peer.client() as pc:
                served = sum(pc.get("/api/v1/state").json()["chunks_served"].values())
            return (int(owner.split(":")[1]), served) if served >= 24 else None
    pid, served_before = wait_until(holder, 90, what="one replicator to hold the pull")
    victim = next(p for p in reps if p.pid == pid)
    victim.kill()
    victim.wait(10)

    def available():
        r = httpx.get(f"{u2}/api/v1/packages/big.pkg", headers=HEADERS)
        return r.status_code == 200 and r.json()["availability"].get(site_id, {}).get("status") == "available"
    wait_until(available, 120, what="the other replicator to finish the pull")
    assert hashlib.sha1(httpx.get(f"{u1}/Packages/big.pkg", timeout=60).content).hexdigest() == pkg["sha1"]
    with peer.client() as pc:
        served = sum(pc.get("/api/v1/state").json()["chunks_served"].values())
    # the survivor resumed from the verified chunks: at most the in-flight ones were fetched twice
    # (one stream asks for runs of up to 16 chunks; a fresh start would have cost 24 + all)
    assert len(pkg["chunks"]) <= served <= len(pkg["chunks"]) + 16, (served, len(pkg["chunks"]))
    audit = run_odst("audit", "--data", str(data))
    assert audit.returncode == 0, audit.stdout + audit.stderr
