"""A site whose event log lives on a 3-node NATS JetStream cluster with R3 streams, the
nodes started from the shipped deploy/nats/nats-cluster.conf (authenticated routes and
clients): a node killed during uploads, and another during a pull from a peer, lose nothing
and service goes on; a peer registered while the site runs gets its leaf link accepted
(the projector rewrites the users and reloads every node)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess

import re
from pathlib import Path

import httpx
import nats
import nats.errors
import pytest
import structlog.testing
from nats.js import api

from odst.bus import connect
from odst.bus.embedded import nats_server_binary
from odst.bus.identity import client_seed_path, read_seed
from odst.bus.streams import ensure_key_value, ensure_stream
from tests.conftest import ADMIN_TOKEN, all_events, free_port, run_odst, wait_until

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cluster(tmp_path):
    """Three nodes started from the shipped deploy/nats/nats-cluster.conf with the includes
    `odst nats-config` writes: routes authenticated, clients and leaf links the site's users."""
    data = tmp_path / "site"
    ports = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    https = [free_port() for _ in range(3)]
    leaf = free_port()  # node 0's leaf port: other sites dial it
    out = run_odst("nats-config", "--data", str(data), "--out", str(tmp_path / "nodes" / "site"),
                   *[a for r in routes for a in ("--route", f"nats-route://127.0.0.1:{r}")])
    assert out.returncode == 0, out.stderr
    site_id = run_odst("site-id", "--data", str(data)).stdout.strip()
    shipped = (ROOT / "deploy" / "nats" / "nats-cluster.conf").read_text()
    nodes = {}

    def start(i):
        conf = tmp_path / "nodes" / f"n{i}.conf"
        text = shipped
        for old, new in (('store_dir: "/data"', f'store_dir: "{tmp_path / f"js{i}"}"'),
                         ('"0.0.0.0:4222"', f'"127.0.0.1:{ports[i]}"'), ('"0.0.0.0:8222"', f'"127.0.0.1:{https[i]}"'),
                         ('"0.0.0.0:6222"', f'"127.0.0.1:{routes[i]}"'),
                         ('"0.0.0.0:7422"', f'"127.0.0.1:{leaf if i == 0 else free_port()}"')):
            assert old in text, f"nats-cluster.conf no longer has {old}"
            text = text.replace(old, new)
        conf.write_text(text)
        log = open(tmp_path / f"n{i}.log", "ab")
        nodes[i] = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log,
                                    stderr=subprocess.STDOUT, env={**os.environ, "NODE_NAME": f"n{i}"})
        log.close()

    for i in range(3):
        start(i)
    urls = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    wait_until(lambda: all(_routes(p) == 2 for p in https), 30, what="the nodes' authenticated routes")
    # no anonymous client, and no node without the route credential
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(_anonymous(ports[0]))
    yield data, site_id, urls, nodes, start, leaf
    for p in nodes.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in nodes.values():
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def _routes(http_port) -> int | None:
    """How many other nodes this node has routes to."""
    try:
        routes = httpx.get(f"http://127.0.0.1:{http_port}/routez", timeout=2).json()["routes"] or []
        return len({r["remote_id"] for r in routes})  # other nodes (a pool of connections to each)
    except httpx.HTTPError:
        return None


async def _anonymous(port):
    async def quiet(exc):
        pass
    nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=2, allow_reconnect=False, error_cb=quiet)
    await nc.close()


def test_cluster_routes_refuse_a_node_without_the_route_credential(cluster, tmp_path):
    data, site_id, urls, nodes, start, leaf = cluster
    stranger_route, http = free_port(), free_port()
    conf = (tmp_path / "nodes" / "n0.conf").read_text()
    node0_route = re.search(r'listen: "127.0.0.1:(\d+)"\n  authorization', conf).group(1)
    (tmp_path / "stranger.conf").write_text(
        f'server_name: "stranger"\nlisten: "127.0.0.1:{free_port()}"\nhttp: "127.0.0.1:{http}"\n'
        f'cluster {{ name: "{site_id}", listen: "127.0.0.1:{stranger_route}", '
        f'routes: ["nats-route://127.0.0.1:{node0_route}"] }}\n')
    log = open(tmp_path / "stranger.log", "ab")
    p = subprocess.Popen([nats_server_binary(), "-c", str(tmp_path / "stranger.conf")], stdout=log,
                         stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_until(lambda: "Authorization Violation" in (tmp_path / "stranger.log").read_text(errors="replace"),
                   30, what="node 0 to refuse a route without the credential")
        assert _routes(http) == 0
    finally:
        p.terminate()
        p.wait(10)


def test_streams_and_buckets_wait_for_a_node_that_is_down(cluster):
    """An R3 stream or bucket asked for while a node is down (as when a site starts with its
    cluster, or a node blinks) is made once the node is back: "no suitable peers" is the
    cluster not being ready, not another process having made it first."""
    data, site_id, urls, nodes, start, leaf = cluster
    nodes[2].terminate()
    nodes[2].wait(15)

    async def main():
        nc = await connect(urls, seed=read_seed(client_seed_path(data)))
        js = nc.jetstream(timeout=5)
        try:
            with structlog.testing.capture_logs() as logs:
                kv = asyncio.create_task(ensure_key_value(js, api.KeyValueConfig(bucket="waits", replicas=3)))
                stream = asyncio.create_task(ensure_stream(js, api.StreamConfig(
                    name="WAITS", subjects=[f"odst.{site_id}.waits"], num_replicas=3)))
                deadline = asyncio.get_running_loop().time() + 60
                while sum(e["event"] == "JetStream not ready yet; retrying" for e in logs) < 2:
                    assert asyncio.get_running_loop().time() < deadline, "no refused placement seen"
                    assert not kv.done() and not stream.done(), "made with a node down"
                    await asyncio.sleep(0.05)
                start(2)
                bucket, info = await asyncio.wait_for(asyncio.gather(kv, stream), 120)
            assert info.config.num_replicas == 3
            await bucket.put("k", b"v")
            assert (await bucket.get("k")).value == b"v"
            assert (await js.stream_info("KV_waits")).config.num_replicas == 3
        finally:
            await nc.close()
    asyncio.run(main())


def test_r3_event_log_survives_a_node_loss(cluster, make_site, tmp_path):
    data, site_id, urls, nodes, start, leaf = cluster
    site = make_site("site", env={"ODST_STREAM_REPLICAS": "3",
                                  "ODST_NATS_AUTH_FILE": str(tmp_path / "nodes" / "site" / "auth.conf")},
                     extra_args=["--nats", urls])
    site.data = data
    site.start(timeout=120)

    async def replicas():
        nc = await connect(urls, seed=read_seed(client_seed_path(data)))
        try:
            info = await nc.jetstream().stream_info("EVENTS")
            return info.config.num_replicas, len(info.cluster.replicas or []) + 1
        finally:
            await nc.close()
    assert asyncio.run(replicas()) == (3, 3)

    def put(i):
        body = hashlib.sha256(str(i).encode()).digest() * 4096
        for _ in range(20):  # a client retries a 503 while the cluster elects a new leader
            r = httpx.put(f"{site.url}/api/v1/packages/p{i}.pkg", content=body, headers=HEADERS, timeout=60)
            if r.status_code != 503:
                break
        # 200: a 503 "not known whether recorded" whose event was stored after all (the same
        # bytes again are identical); otherwise the retry records them (201)
        assert r.status_code in (200, 201), r.text
        return hashlib.sha1(body).hexdigest()

    async def current():
        nc = await connect(urls, seed=read_seed(client_seed_path(data)))
        try:
            info = await nc.jetstream().stream_info("EVENTS")
            return all(r.current for r in (info.cluster.replicas or [])) and len(info.cluster.replicas) == 2
        finally:
            await nc.close()
    sha = {i: put(i) for i in range(5)}
    nodes[1].kill()  # kill -9 of one node during the uploads
    nodes[1].wait(10)
    sha |= {i: put(i) for i in range(5, 10)}
    with site.client() as c:
        listed = {p["name"]: p["sha1"] for p in c.get("/api/v1/packages").json()["packages"]}
        assert listed == {f"p{i}.pkg": s for i, s in sha.items()}
        uploads = [e["envelope"]["event"]["name"] for e in all_events(c) if e["type"] == "PackageUploaded"]
        # every upload recorded; a retry of one whose first event was stored only after its
        # 503 may have recorded the same bytes twice (at least once, never lost)
        assert set(uploads) == {f"p{i}.pkg" for i in range(10)} and len(uploads) >= 10
    assert httpx.get(f"{site.url}/healthz").status_code == 200
    start(1)  # the node comes back
    wait_until(lambda: asyncio.run(current()), 60, what="the restarted node to catch up")

    # replication into the cluster site while a node dies: a peer dials node 0 by leaf link
    peer = make_site("peer", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}"]).start()
    with site.client() as c, peer.client() as pc:
        token = c.post("/api/v1/peers/invites", json={}).json()["token"]
        assert pc.post("/api/v1/peers/join", json={"token": token}).status_code == 201
        body = os.urandom(40 * (1 << 20))
        assert pc.put("/api/v1/packages/from-peer.pkg", content=body).status_code == 201

        def pulling():
            t = c.get("/api/v1/state").json()["transfers"]
            return any(x["name"] == "from-peer.pkg" and x["chunks_done"] >= 2 for x in t)
        wait_until(pulling, 60, what="the cluster site to start pulling")
        nodes[2].kill()  # another node dies mid-transfer
        nodes[2].wait(10)

        def pulled():
            r = c.get("/api/v1/packages/from-peer.pkg")
            return r.status_code == 200 and r.json()["availability"].get(site_id, {}).get("status") == "available"
        wait_until(pulled, 120, what="the pull to finish with a node down")
    assert hashlib.sha1(httpx.get(f"{site.url}/Packages/from-peer.pkg", timeout=60).content).digest() == \
        hashlib.sha1(body).digest()
    start(2)

    wait_until(lambda: asyncio.run(current()), 60, what="the restarted nodes to catch up")
    out = run_odst("audit", "--data", str(data), "--nats", urls)
    assert out.returncode == 0 and "violations  0" in out.stdout, out.stdout + out.stderr
