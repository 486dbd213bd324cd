"""``odst audit`` and ``odst rebuild`` against real sites, and what a site does with
messages in its stream that it did not write (forged, replayed).

Every test runs real ``odst serve`` processes (with their embedded nats-server)
on 127.0.0.1 and synchronises only by polling with a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import sqlite3
from pathlib import Path

import blake3
import httpx
import nats
import pytest

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.signing import SiteKey
from odst.store.hashing import manifest_of
from tests.conftest import all_events, run_odst, site_nats, upload_bytes as upload, wait_until

MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------------

def packages(client: httpx.Client) -> list[dict]:
    r = client.get("/api/v1/packages")
    assert r.status_code == 200, r.text
    return r.json()["packages"]


def quarantine(client: httpx.Client) -> list[dict]:
    r = client.get("/api/v1/quarantine")
    assert r.status_code == 200, r.text
    return r.json()["quarantine"]


def reasons(client: httpx.Client) -> list[tuple[int, str]]:
    return [(q["stream_seq"], q["reason"]) for q in quarantine(client)]


def chain_hash(event: dict) -> str:
    return blake3.blake3(base64.b64decode(event["signed"])).hexdigest()


def summary(stdout: str) -> dict[str, str]:
    """``odst audit``'s summary as {field: value}; violation lines under 'list'."""
    out: dict = {"list": []}
    for line in stdout.splitlines():
        if line.startswith("  - "):
            out["list"].append(line[4:])
        elif line.strip():
            out[line[:12].strip()] = line[12:].strip()
    return out


def audit(data: Path) -> tuple[int, dict, str]:
    r = run_odst("audit", "--data", str(data))
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    return r.returncode, summary(r.stdout), text


def site_info(data: Path) -> dict:
    return json.loads((data / "run" / "site.json").read_text())


async def _publish(where: str | Path, subject: str, payload: bytes) -> int:
    if isinstance(where, Path):  # a site's data directory: act as the site itself
        nc = await site_nats(where, max_reconnect_attempts=0)
    else:
        nc = await nats.connect(where, connect_timeout=5, max_reconnect_attempts=0)
    try:
        ack = await nc.jetstream(timeout=10).publish(subject, payload, stream="EVENTS")
        return ack.seq
    finally:
        await nc.close()


def publish(where: str | Path, subject: str, payload: bytes) -> int:
    """Publish straight into the site's broker, bypassing the gateway; returns the stream seq.
    ``where``: the site's data directory (its own credential), or a broker URL."""
    return asyncio.run(_publish(where, subject, payload))


def wait_quarantined(client: httpx.Client, stream_seq: int) -> dict:
    def find():
        return next((q for q in quarantine(client)
                     if q["stream"] == "EVENTS" and q["stream_seq"] == stream_seq), None)
    return wait_until(find, 30, what=f"EVENTS seq {stream_seq} to be quarantined")


# --- a clean site ----------------------------------------------------------------------------

def test_audit_of_a_clean_site_passes_running_and_stopped(make_site):
    site = make_site().start()
    bodies = {n: os.urandom(MiB + i) for i, n in enumerate(["a.pkg", "b.pkg", "c.pkg", "d.dmg"])}
    with site.client() as c:
        for name, body in bodies.items():
            assert upload(c, name, body).status_code == 201
        assert c.patch("/api/v1/packages/a.pkg", json={"stage": "test"}).json()["stage"] == "test"
        assert c.patch("/api/v1/packages/b.pkg", json={"stage": "dev"}).json()["stage"] == "dev"
        assert c.patch("/api/v1/packages/a.pkg", json={"stage": "prod"}).json()["stage"] == "prod"
        assert c.delete("/api/v1/packages/c.pkg").status_code == 200
        assert c.delete("/api/v1/packages/d.dmg").status_code == 200
        info = c.get("/api/v1/site").json()
    # SiteFounded + bootstrap TokenCreated and UserCreated + 4 uploads + 3 stage changes + 2 deletes
    expected_events = 3 + 4 + 3 + 2
    assert info["events"] == expected_events and info["packages"] == 2

    for state in ("running", "stopped"):
        code, s, text = audit(site.data)
        assert code == 0, f"audit of a clean {state} site failed:\n{text}"
        assert s["violations"] == "0", text
        assert s["site"] == info["site"]
        assert s["events"] == str(expected_events), text
        assert s["packages"] == "2", text
        assert s["sites"] == "1" and s["quarantined"] == "0", text
        assert s["read model"] == "matches the rebuild", text
        if state == "running":
            assert site.stop() == 0


# --- a forged event --------------------------------------------------------------------------

def forged_upload(site_id: str, seq: int, prev: str, key: SiteKey, name: str) -> bytes:
    body = b"forged content"
    m = manifest_of([body])
    event = ev.PackageUploaded(name=name, **m.event_fields(), stage="prod")
    envelope = codec.Envelope(id=codec.new_event_id(), origin=site_id, seq=seq, prev=prev,
                              ts=codec.now_ms(), actor="token:attacker", event=event)
    return codec.seal(envelope, key)


def test_forged_event_is_quarantined_never_applied(make_site, tmp_path):
    site = make_site().start()
    with site.client() as c:
        assert upload(c, "real.pkg", os.urandom(MiB)).status_code == 201
        site_id = c.get("/api/v1/site").json()["site"]
        events_before = all_events(c)
        packages_before = packages(c)
    last_valid = events_before[-1]

    # Everything right but the key: the right subject, the next seq, the right prev hash.
    intruder = SiteKey.load_or_create(tmp_path / "intruder.key")
    assert intruder.site_id != site_id
    payload = forged_upload(site_id, last_valid["seq"] + 1, chain_hash(last_valid), intruder,
                            "forged.pkg")
    forged_seq = publish(site.data, f"odst.{site_id}.ev.PackageUploaded", payload)

    with site.client() as c:
        q = wait_quarantined(c, forged_seq)
        assert "signature" in q["reason"], q
        assert base64.b64decode(q["payload"]) == payload
        assert c.get("/healthz").status_code == 200
        assert c.get("/api/v1/packages/forged.pkg").status_code == 404
        assert packages(c) == packages_before
        assert all_events(c) == events_before, "a forged message must never become an event"
        assert httpx.get(f"{site.url}/CasperShare/Packages/forged.pkg").status_code == 404

        # The next legit write chains onto the last valid event, not onto the forgery.
        body = os.urandom(MiB + 5)
        r = upload(c, "next.pkg", body)
        assert r.status_code == 201, r.text
        assert r.json()["sha1"] == hashlib.sha1(body).hexdigest()
        new = all_events(c)[len(events_before):]
        assert [e["type"] for e in new] == ["PackageUploaded"]
        assert new[0]["stream_seq"] > forged_seq
        assert new[0]["seq"] == last_valid["seq"] + 1
        assert new[0]["envelope"]["prev"] == chain_hash(last_valid)
        assert {p["name"] for p in packages(c)} == {"real.pkg", "next.pkg"}
        assert c.get("/api/v1/site").json()["quarantined"] == 1

    # Anyone able to publish could have put it there, and it cannot be removed from the log:
    # the audit reports it as junk, and the chain is intact, so it passes.
    code, s, text = audit(site.data)
    assert code == 0, text
    assert s["violations"] == "0" and s["quarantined"] == "0" and s["junk"].startswith("1 "), text
    assert f"EVENTS seq {forged_seq}: signature" in text, text
    assert s["read model"] == "matches the rebuild", text


# --- a replayed event ------------------------------------------------------------------------

def replay_setup(site) -> tuple[list[dict], list[dict], dict]:
    """Upload then delete old.pkg, keep keep.pkg; replay old.pkg's (validly signed) upload."""
    with site.client() as c:
        assert upload(c, "old.pkg", os.urandom(MiB)).status_code == 201
        assert upload(c, "keep.pkg", os.urandom(MiB)).status_code == 201
        assert c.delete("/api/v1/packages/old.pkg").status_code == 200
        events_before = all_events(c)
        packages_before = packages(c)
    original = next(e for e in events_before
                    if e["type"] == "PackageUploaded" and e["envelope"]["event"]["name"] == "old.pkg")
    replay_seq = publish(site.data, original["subject"], base64.b64decode(original["signed"]))
    with site.client() as c:
        q = wait_quarantined(c, replay_seq)
    assert "replay" in q["reason"], q
    return events_before, packages_before, q


def test_replayed_event_is_quarantined_and_changes_nothing(make_site):
    site = make_site().start()
    events_before, packages_before, q = replay_setup(site)
    with site.client() as c:
        assert c.get("/healthz").status_code == 200
        assert packages(c) == packages_before
        assert c.get("/api/v1/packages/old.pkg").status_code == 404
        assert all_events(c) == events_before
        info = c.get("/api/v1/site").json()
        assert info["last_seq"] == events_before[-1]["seq"]
        assert info["quarantined"] == 1
    assert httpx.get(f"{site.url}/CasperShare/Packages/old.pkg").status_code == 404
    assert sorted(os.listdir(site.data / "store" / "packages")) == ["keep.pkg"]

    code, s, text = audit(site.data)
    assert code == 0 and s["violations"] == "0", text
    assert s["junk"].startswith("1 ") and f"EVENTS seq {q['stream_seq']}: replayed" in text, text


def test_site_keeps_writing_after_a_replayed_event(make_site):
    site = make_site().start()
    events_before, _, q = replay_setup(site)
    last_valid = events_before[-1]
    with site.client() as c:
        body = os.urandom(MiB + 3)
        r = upload(c, "next.pkg", body)
        assert r.status_code == 201, r.text
        assert r.json() is not None and r.json()["sha1"] == hashlib.sha1(body).hexdigest(), \
            f"upload after a replay was not applied: {r.text}\nquarantine: {reasons(c)}"
        new = all_events(c)[len(events_before):]
        assert [e["type"] for e in new] == ["PackageUploaded"], \
            f"the write after a replay must become an event; quarantine: {reasons(c)}"
        assert new[0]["seq"] == last_valid["seq"] + 1
        assert new[0]["envelope"]["prev"] == chain_hash(last_valid)
        assert len(quarantine(c)) == 1, reasons(c)
    code, s, text = audit(site.data)
    assert code == 0 and s["violations"] == "0" and s["junk"].startswith("1 "), text


# --- rebuild ---------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_rebuild_restores_the_read_model(make_site, damage):
    site = make_site().start()
    with site.client() as c:
        for name in ("x.pkg", "y.pkg", "z.pkg"):
            assert upload(c, name, os.urandom(MiB)).status_code == 201
        assert c.patch("/api/v1/packages/y.pkg", json={"stage": "test"}).status_code == 200
        assert c.delete("/api/v1/packages/z.pkg").status_code == 200
        events_before = all_events(c)
        packages_before = packages(c)
        site_before = c.get("/api/v1/site").json()
    assert site.stop() == 0

    model = site.data / "read-model.sqlite"
    if damage == "delete":
        for suffix in ("", "-wal", "-shm"):
            Path(str(model) + suffix).unlink(missing_ok=True)
    else:
        conn = sqlite3.connect(model)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        table = "contents" if "contents" in tables else "packages"  # the table behind the view
        with conn:
            changed = conn.execute(f"UPDATE {table} SET sha1=? WHERE name='x.pkg'",
                                   ("0" * 40,)).rowcount
        conn.close()
        assert changed == 1
        code, s, text = audit(site.data)
        assert code == 1, f"audit must notice a tampered read model:\n{text}"
        assert any(repr(table) in v for v in s["list"]), text

    r = run_odst("rebuild", "--data", str(site.data))
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(len(events_before)) in r.stdout, r.stdout
    assert model.exists()

    code, s, text = audit(site.data)
    assert code == 0 and s["violations"] == "0", text
    assert s["read model"] == "matches the rebuild", text

    site.start()
    with site.client() as c:
        assert packages(c) == packages_before
        assert all_events(c) == events_before
        assert c.get("/api/v1/site").json() == site_before
    code, s, text = audit(site.data)
    assert code == 0 and s["violations"] == "0", text


def test_rebuild_refuses_while_the_site_runs(make_site):
    site = make_site().start()
    with site.client() as c:
        assert upload(c, "x.pkg", os.urandom(MiB)).status_code == 201
        events_before = all_events(c)
    model = site.data / "read-model.sqlite"
    inode = model.stat().st_ino

    r = run_odst("rebuild", "--data", str(site.data))
    assert r.returncode != 0, r.stdout
    assert "running" in r.stderr and "stop" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr

    assert model.stat().st_ino == inode, "the live read model must not be replaced"
    with site.client() as c:
        assert c.get("/healthz").status_code == 200
        assert all_events(c) == events_before
        assert upload(c, "y.pkg", os.urandom(MiB)).status_code == 201
    code, s, text = audit(site.data)
    assert code == 0, text


# --- not a data dir --------------------------------------------------------------------------

def test_audit_of_a_directory_that_is_not_odst_data(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("not a site\n")
    r = run_odst("audit", "--data", str(plain))
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(plain) in r.stderr and "not an ODST data directory" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert sorted(os.listdir(plain)) == ["notes.txt"], "audit must not create anything"

    missing = tmp_path / "missing"
    r = run_odst("audit", "--data", str(missing))
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(missing) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not missing.exists(), "audit must not create the directory"
