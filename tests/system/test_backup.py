"""Back up a site the documented way (deploy/README.md: stop, archive the data directory
without run/ and store/tmp/), restore it into a new directory, and find it whole."""

from __future__ import annotations

import hashlib
import subprocess

import httpx

from tests.conftest import run_odst, write_random


def test_backup_and_restore_on_a_new_machine(make_site, tmp_path):
    site = make_site("old").start()
    src = write_random(tmp_path / "p.pkg", 3 * (1 << 20) + 9, seed=21)
    with site.client() as c, open(src, "rb") as f:
        pkg = c.put("/api/v1/packages/Backup.pkg", content=f).json()
        assert c.patch("/api/v1/packages/Backup.pkg", json={"stage": "test"}).status_code == 200
        before = c.get("/api/v1/site").json()
        events_before = c.get("/api/v1/events", params={"limit": 1000}).json()["events"]
    assert site.stop() == 0

    archive = tmp_path / "odst-backup.tgz"
    subprocess.run(["tar", "-C", str(site.data), "-czpf", str(archive),
                    "--exclude=./run", "--exclude=./store/tmp", "."], check=True)
    restored = tmp_path / "new-machine" / "data"
    restored.mkdir(parents=True)
    subprocess.run(["tar", "-C", str(restored), "-xzpf", str(archive)], check=True)

    audit = run_odst("audit", "--data", str(restored))
    assert audit.returncode == 0 and "violations  0" in audit.stdout, audit.stdout + audit.stderr

    new = make_site("new-machine")
    new.data = restored
    new.start()
    with new.client() as c:
        after = c.get("/api/v1/site").json()
        assert (after["site"], after["public_key"], after["events"]) == \
               (before["site"], before["public_key"], before["events"])
        got = c.get("/api/v1/packages/Backup.pkg").json()
        assert (got["sha512"], got["stage"]) == (pkg["sha512"], "test")
        assert c.get("/api/v1/events", params={"limit": 1000}).json()["events"] == events_before
        assert c.post("/api/v1/verify").json()["ok"] == 1
        # the restored site goes on writing its chain
        assert c.put("/api/v1/packages/After.pkg", content=b"after" * 100).status_code == 201
    body = httpx.get(f"{new.url}/CasperShare/Packages/Backup.pkg", timeout=30).content
    assert hashlib.sha1(body).hexdigest() == pkg["sha1"]
    new.stop()
    audit = run_odst("audit", "--data", str(restored))
    assert audit.returncode == 0 and "violations  0" in audit.stdout, audit.stdout + audit.stderr
