"""The replicator's work queue and pull leases are derived state, kept in the broker's memory:
a broker killed in the middle of a catch-up loses them, and the catch-up still ends with every
package here, byte for byte (the queue is made again and refilled from the read model); a site
made by an earlier version, which kept them in files, has them recreated in memory at start."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess

import nats.js.errors
import pytest
from nats.js import api

from odst.bus.embedded import nats_server_binary
from tests.conftest import free_port, site_nats, wait_until
from tests.system.test_replication import register, site_id
from tests.system.test_sync import upload_many

pytestmark = pytest.mark.timeout(300)

LOST = "the work queue was lost"
RECREATED = "recreating derived state in memory"



def held_at(site, sid: str) -> int:
    with site.client() as c:
        state = c.get("/api/v1/state").json()
    return sum(1 for p in state["packages"] if sid in p["available_at"])


def known_at(site) -> int:
    """Packages the site's read model knows of (held or not)."""
    with site.client() as c:
        return len(c.get("/api/v1/state").json()["packages"])


def broker_pid(site) -> int:
    return int((site.data / "run" / "nats.pid").read_text().strip())


def _storage(info) -> str:
    storage = info.config.storage
    return getattr(storage, "value", storage)  # an enum, or the broker's text


def storage_of(site, streams: list[str]) -> dict[str, str]:
    async def ask():
        nc = await site_nats(site.data)
        try:
            js = nc.jetstream()
            return {s: _storage(await js.stream_info(s)) for s in streams}
        finally:
            await nc.close()
    return asyncio.run(ask())


def test_a_broker_killed_mid_catch_up_loses_the_queue_and_every_package_still_arrives(make_site):
    n = 200  # enough that the kill lands mid catch-up (asserted), few enough to upload quickly
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    bodies = {f"Q {i:03d}.pkg": hashlib.sha512(str(i).encode()).digest() * (200 + i % 50) for i in range(n)}
    upload_many(a, bodies)
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    assert storage_of(b, ["REPLICATION", "KV_ODST_LEASES"]) == {"REPLICATION": "memory", "KV_ODST_LEASES": "memory"}
    # B receives at most 500 kB/s on any link (loopback counts): past the bucket's 1 MiB burst,
    # the rest of its ~2.9 MB takes ~4 s, so the kill below lands mid catch-up (unthrottled, all
    # 200 were held before the poll saw one known)
    with b.client() as c:
        r = c.put("/api/v1/bandwidth/links/default", json={"receive": "500KB", "local": "no"})
        assert r.status_code == 200, r.text
    register(a, b)
    b_id = site_id(b)

    # killed once B knows of A's first packages: their pulls are queued from then on (waiting
    # until B held one was too late once a batch's packages were reported at once: all 200 held)
    wait_until(lambda: known_at(b) >= 1, 120, interval=0.02, what="B's catch-up to begin")
    before = held_at(b, b_id)
    pid = broker_pid(b)
    os.kill(pid, signal.SIGKILL)
    assert before < n, "the catch-up ended before the broker was killed: nothing would be tested"
    wait_until(lambda: broker_pid(b) != pid, 60, interval=0.05, what="B's broker to be restarted")

    wait_until(lambda: held_at(b, b_id) == n, 240, interval=0.5, what=f"B to hold all {n} packages")
    # the queue was in memory: it went with the broker, was noticed, made again and refilled
    wait_until(lambda: LOST in b.log(1 << 22), 30, what="B to log that it refilled the lost work queue")
    files = {p.name: p.read_bytes() for p in (b.data / "store" / "packages").iterdir()}
    assert len(files) == n
    for name, body in bodies.items():
        assert files[name.lower()] == body, f"{name} differs at B"
    assert storage_of(b, ["REPLICATION", "KV_ODST_LEASES"]) == {"REPLICATION": "memory", "KV_ODST_LEASES": "memory"}


def test_a_work_queue_and_lease_bucket_kept_in_files_are_recreated_in_memory_at_start(make_site, tmp_path):
    """What an earlier version made: both in FILE storage, an item queued. Recreated in memory at
    start (logged), and the site still pulls what a peer uploads."""
    leaf = free_port()
    hub = make_site("hub", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "Hub"]).start()
    a = make_site("a", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "A"]).start()
    register(hub, a)
    sid = site_id(a)
    a.stop()
    server = subprocess.Popen([nats_server_binary(), "-c", str(a.data / "run" / "nats.conf"), "--ports_file_dir",
                               str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ports = tmp_path / f"nats-server_{server.pid}.ports"
        # the ports file is created, then written: wait until it holds the whole answer
        url = wait_until(lambda: json.loads(ports.read_text())["nats"][0], 20, interval=0.05,
                         what="the bare broker to start")

        async def as_before():
            nc = await site_nats(a.data, url=url)
            try:
                js = nc.jetstream()
                for stream in ("REPLICATION", "KV_ODST_LEASES"):  # in memory: gone with the broker
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await js.delete_stream(stream)
                await js.add_stream(api.StreamConfig(
                    name="REPLICATION", subjects=[f"odst.{sid}.work.>"], retention=api.RetentionPolicy.WORK_QUEUE,
                    storage=api.StorageType.FILE, duplicate_window=60.0, max_age=24 * 3600.0))
                await js.publish(f"odst.{sid}.work.pull", b'{"name": "gone.pkg", "blake3": "00"}', stream="REPLICATION")
                await js.create_key_value(api.KeyValueConfig(bucket="ODST_LEASES", ttl=10, history=1,
                                                             storage=api.StorageType.FILE))
                return {s: _storage(await js.stream_info(s)) for s in ("REPLICATION", "KV_ODST_LEASES")}
            finally:
                await nc.close()

        assert asyncio.run(as_before()) == {"REPLICATION": "file", "KV_ODST_LEASES": "file"}
    finally:
        server.terminate()
        server.wait(20)

    a.start()
    assert storage_of(a, ["REPLICATION", "KV_ODST_LEASES"]) == {"REPLICATION": "memory", "KV_ODST_LEASES": "memory"}
    assert a.log(1 << 22).count(RECREATED) == 2, a.log_tail()
    body = os.urandom(5000)
    with hub.client() as c:
        assert c.put("/api/v1/packages/after.pkg", content=body).status_code == 201
    stored = a.data / "store" / "packages" / "after.pkg"
    wait_until(lambda: stored.exists() and stored.read_bytes() == body, 60,
               what="a package to reach the migrated site")
