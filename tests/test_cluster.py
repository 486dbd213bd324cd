"""A site whose event log lives on a 3-node NATS JetStream cluster with R3 streams:
a node killed during uploads, and another during a pull from a peer, lose nothing and
service goes on."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess

import httpx
import nats
import pytest

from odst.bus.embedded import nats_server_binary
from tests.conftest import ADMIN_TOKEN, all_events, free_port, run_odst, wait_until

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
def cluster(tmp_path):
    data = tmp_path / "site"
    site_id = run_odst("site-id", "--data", str(data)).stdout.strip()
    ports = [free_port() for _ in range(3)]
    routes = [free_port() for _ in range(3)]
    leaf = free_port()  # node 0 also accepts leaf links from other sites
    nodes = {}

    def start(i):
        conf = tmp_path / f"n{i}.conf"
        others = ", ".join(f'"nats-route://127.0.0.1:{r}"' for j, r in enumerate(routes) if j != i)
        conf.write_text(
            f'server_name: "n{i}"\nlisten: "127.0.0.1:{ports[i]}"\nmax_payload: 8MB\n'
            f'jetstream {{ store_dir: "{tmp_path / f"js{i}"}", domain: "{site_id}" }}\n'
            f'cluster {{ name: "odst", listen: "127.0.0.1:{routes[i]}", routes: [ {others} ] }}\n'
            + (f'leafnodes {{ listen: "127.0.0.1:{leaf}" }}\n' if i == 0 else ""))
        log = open(tmp_path / f"n{i}.log", "ab")
        nodes[i] = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=log,
                                    stderr=subprocess.STDOUT)
        log.close()

    for i in range(3):
        start(i)
    urls = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    yield data, site_id, urls, nodes, start, leaf
    for p in nodes.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in nodes.values():
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


def test_r3_event_log_survives_a_node_loss(cluster, make_site):
    data, site_id, urls, nodes, start, leaf = cluster
    site = make_site("site", env={"ODST_STREAM_REPLICAS": "3"}, extra_args=["--nats", urls])
    site.data = data
    site.start(timeout=120)

    async def replicas():
        nc = await nats.connect(urls.split(","))
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
        assert r.status_code == 201, r.text
        return hashlib.sha1(body).hexdigest()

    async def current():
        nc = await nats.connect(urls.split(","))
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
        uploads = [e for e in all_events(c) if e["type"] == "PackageUploaded"]
        assert len(uploads) == 10
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
