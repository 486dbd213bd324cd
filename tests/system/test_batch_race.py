"""Two replicators of one site racing for the small packages of a catch-up. Each process
queues every wanted package (their work items overlap), the workers of both take them from
one queue, and a content published keeps its lease until it expires (no delete per content):
every file arrives once and whole (reported available once per package, in the
PackagesAvailable of its batch, and placed by exactly one of the two), its bytes equal the source's, no temp file is left, and the log audits clean."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest

from odst.naming import name_key
from tests.conftest import ADMIN_TOKEN, all_events, available_at, free_port, run_odst, wait_until
from tests.system.test_replication import register, site_id
from tests.system.test_sync import upload_many
from tests.system.test_sync_derived import held_at

pytestmark = pytest.mark.timeout(300)

N = 160  # five work items of 32: both processes' workers take some


def test_two_replicators_of_one_site_pull_each_small_package_once(make_site, tmp_path):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    bodies = {f"Race {i:03d}.pkg": hashlib.sha512(f"race{i}".encode()).digest() * (20 + i % 50) for i in range(N)}
    upload_many(a, bodies)
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    # a second replicator process on B's data directory and broker, beside the one in `odst serve`
    log_path = tmp_path / "replicator-2.log"
    with open(log_path, "ab") as log:
        extra = subprocess.Popen(
            [sys.executable, "-m", "odst", "replicator", "--data", str(b.data), "--nats", b.run_info()["nats"]],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("ODST_")},
                 "ODST_ADMIN_TOKEN": ADMIN_TOKEN, "ODST_LOG_LEVEL": "info"})
    try:
        wait_until(lambda: "replication: full rescan" in log_path.read_text(errors="replace")
                   or extra.poll() is not None, 60, what="the second replicator to start")
        assert extra.poll() is None, log_path.read_text(errors="replace")[-3000:]
        register(a, b)
        b_id = site_id(b)
        wait_until(lambda: held_at(b, b_id) == N, 180, interval=0.3, what="B to hold every package")
        assert extra.poll() is None, "the second replicator died"
    finally:
        extra.terminate()
        extra.wait(20)

    folder = b.data / "store" / "packages"
    for name, body in bodies.items():
        assert (folder / name_key(name)).read_bytes() == body, f"{name} differs at B"
    with b.client() as c:
        events = all_events(c)
    available = Counter(available_at(events, b_id))
    assert set(available) == set(bodies) and set(available.values()) == {1}, available.most_common(3)
    batches = [e for e in events if e["type"] == "PackagesAvailable" and e["envelope"]["origin"] == b_id]
    assert batches and len(batches) < N // 2, f"{len(batches)} PackagesAvailable for {N} packages"
    assert not list((b.data / "store" / "tmp").glob("*.repl")), "temp files left behind"
    by = {"serve": b.log(1 << 24).count("package available"),
          "replicator-2": log_path.read_text(errors="replace").count("package available")}
    assert sum(by.values()) == N, by  # each package placed by exactly one of them
    assert all(by.values()), by  # and both took part (five work items, four workers each)
    b.stop()
    audit = run_odst("audit", "--data", str(b.data))
    assert audit.returncode == 0, audit.stdout + audit.stderr
