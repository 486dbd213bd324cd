"""A site watching its own log, and audit/rebuild telling the truth about it.

Real ``odst serve`` processes; the attacks are made on the site's broker with the site's own
client credential (``site_nats``): what NATS lets through is what ODST must notice. Every
wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3

import httpx
import pytest

from odst.events.log import EVENT_MAX_BYTES
from odst.projections.apply import QUARANTINE_KEEP_BYTES, QUARANTINE_MAX_BYTES, QUARANTINE_MAX_ROWS
from tests.conftest import all_events, run_odst, site_nats, upload_bytes as upload, wait_until
from tests.system.test_audit import audit, packages

MiB = 1 << 20


def js_api(data, subject: str, body: dict | None = None) -> dict:
    """One JetStream API request on the site's broker, as the site itself."""
    async def go():
        nc = await site_nats(data)
        try:
            msg = await nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=10)
            return json.loads(msg.data)
        finally:
            await nc.close()
    return asyncio.run(go())


def stream_config(data) -> dict:
    return js_api(data, "$JS.API.STREAM.INFO.EVENTS")["config"]


def health(site) -> tuple[int, str]:
    r = httpx.get(f"{site.url}/healthz", timeout=10)
    return r.status_code, r.json().get("reason", "")


def busy_site(make_site):
    """A site with packages, a second token and a second user."""
    site = make_site().start()
    with site.client() as c:
        for name in ("a.pkg", "b.pkg"):
            assert upload(c, name, os.urandom(MiB)).status_code == 201
        token = c.post("/api/v1/tokens", json={"name": "ci", "role": "operator"}).json()["token"]
        r = c.post("/api/v1/users", json={"username": "alice", "role": "operator",
                                          "password": "correct horse battery staple"})
        assert r.status_code == 201, r.text
        events = all_events(c)
    return site, token, events


def assert_sign_ins_work(site, token: str) -> None:
    with site.client() as admin, site.client(token=token) as ci:
        assert admin.get("/api/v1/packages").status_code == 200
        assert ci.get("/api/v1/packages").status_code == 200
        assert {u["username"] for u in admin.get("/api/v1/users").json()["users"]} >= {"admin", "alice"}


def cut(data, how: str) -> None:
    if how == "max_msgs":
        r = js_api(data, "$JS.API.STREAM.UPDATE.EVENTS", {**stream_config(data), "max_msgs": 1})
    elif how == "delete":
        r = js_api(data, "$JS.API.STREAM.DELETE.EVENTS")
    else:  # deleted, then recreated empty with loose limits: "restarted empty"
        config = stream_config(data)
        assert js_api(data, "$JS.API.STREAM.DELETE.EVENTS").get("success"), "delete"
        r = js_api(data, "$JS.API.STREAM.CREATE.EVENTS",
                   {"name": "EVENTS", "subjects": config["subjects"], "storage": "file", "max_age": 3600 * 10**9})
    assert "error" not in r, r


@pytest.mark.parametrize("how", ["max_msgs", "delete", "recreate"])
def test_a_cut_log_is_a_503_an_alert_an_audit_failure_and_a_refused_rebuild(make_site, how):
    site, token, events = busy_site(make_site)
    assert health(site) == (200, "ok")
    cut(site.data, how)

    # /healthz: 503 with the reason, at once (the watch checks every 2 s)
    code, reason = wait_until(lambda: (h := health(site))[0] == 503 and "event log damaged" in h[1] and h, 15,
                              what="healthz 503 with the reason")
    if how == "max_msgs":
        assert "max_msgs -1 → 1" in reason and "ends at seq" not in reason and "starts at seq" in reason, reason
    elif how == "delete":
        assert "EVENTS is missing" in reason, reason
    else:
        assert "max_age" in reason and "ends at seq 0" in reason, reason
    # ... in /metrics, in the log at error level, and queued for notification
    metrics = site.client().get("/metrics").text
    assert re.search(r'^odst_event_log_intact\{stream="EVENTS"\} 0\.0$', metrics, re.M), metrics
    assert re.search(r"error.*event log alert|event log alert.*error", site.log()), site.log()
    alerts = sqlite3.connect(site.data / "alerts.sqlite").execute("SELECT stream, reason FROM alerts").fetchall()
    assert alerts and all(s == "EVENTS" for s, _ in alerts), alerts

    # writes are refused with the reason, reads still work
    with site.client() as c:
        r = upload(c, "c.pkg", os.urandom(1000))
        assert r.status_code == 503 and "refused" in r.text, r.text
        assert {p["name"] for p in packages(c)} == {"a.pkg", "b.pkg"}
        assert httpx.get(f"{site.url}/CasperShare/Packages/a.pkg").status_code == 200

    # audit: violations with a summary, exit 1, no traceback — running and stopped
    for state in ("running", "stopped"):
        code, s, text = audit(site.data)
        assert code == 1, text
        assert int(s["violations"]) >= 1 and s["site"], text
        assert any("EVENTS" in v for v in s["list"]), text
        if state == "running":
            assert site.stop() == 0

    # rebuild: refused, nothing touched; tokens and users survive
    model = site.data / "read-model.sqlite"
    inode = model.stat().st_ino
    r = run_odst("rebuild", "--data", str(site.data))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "refused" in r.stderr and "--force" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert model.stat().st_ino == inode

    # after a restart: still 503 with the reason (not healed by pretending), sign-ins still work
    site.start_process()
    wait_until(lambda: health(site)[0] == 503, 60, what="the restarted site to answer 503")
    assert "event log damaged" in health(site)[1]
    assert_sign_ins_work(site, token)
    with site.client() as c:
        assert len(all_events(c)) == len(events)
    code, s, text = audit(site.data)
    assert code == 1, text
    site.stop()

    # --force: rebuilds from what is left, and says what is lost
    r = run_odst("rebuild", "--data", str(site.data), "--force")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "accepted" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_purge_is_refused_and_the_site_stays_healthy(make_site):
    site, token, events = busy_site(make_site)
    r = js_api(site.data, "$JS.API.STREAM.PURGE.EVENTS")
    assert r.get("error"), r  # deny_purge
    r = js_api(site.data, "$JS.API.STREAM.MSG.DELETE.EVENTS", {"seq": 2})
    assert r.get("error"), r  # deny_delete
    assert health(site) == (200, "ok")
    code, s, text = audit(site.data)
    assert code == 0, text


def test_a_config_change_that_erased_nothing_is_raised_then_restored_at_restart(make_site):
    site, token, events = busy_site(make_site)
    r = js_api(site.data, "$JS.API.STREAM.UPDATE.EVENTS", {**stream_config(site.data), "max_age": 3600 * 10**9})
    assert "error" not in r, r
    code, reason = wait_until(lambda: (h := health(site))[0] == 503 and h, 15, what="healthz 503")
    assert "configuration changed: max_age 0.0 → 3600.0" in reason, reason
    assert site.stop() == 0
    code, s, text = audit(site.data)
    assert code == 1 and any("max_age" in v for v in s["list"]), text
    site.start()  # ensure_stream puts ODST's configuration back (it loses nothing) and says so
    assert health(site) == (200, "ok")
    assert stream_config(site.data)["max_age"] == 0
    assert "restored" in site.log()
    with site.client() as c:
        assert upload(c, "c.pkg", os.urandom(1000)).status_code == 201
    code, s, text = audit(site.data)
    assert code == 0, text


def test_junk_is_bounded_reported_and_never_fails_the_audit(make_site):
    site = make_site().start()
    with site.client() as c:
        assert upload(c, "a.pkg", os.urandom(MiB)).status_code == 201
        site_id = c.get("/api/v1/site").json()["site"]
        events = all_events(c)

    async def flood():
        nc = await site_nats(site.data)
        js = nc.jetstream(timeout=30)
        subject = f"odst.{site_id}.ev.PackageUploaded"
        try:
            with pytest.raises(Exception, match="(?i)maximum|size"):
                await js.publish(subject, b"x" * (EVENT_MAX_BYTES + 1), stream="EVENTS")
            big = QUARANTINE_MAX_BYTES // QUARANTINE_KEEP_BYTES + 10
            acks = [js.publish(subject, os.urandom(256 << 10), stream="EVENTS") for _ in range(big)]
            acks += [js.publish(f"odst.{site_id}.ev.x", b"not an event %d" % i, stream="EVENTS")
                     for i in range(QUARANTINE_MAX_ROWS + 50)]
            return [a.seq for a in await asyncio.gather(*acks)]
        finally:
            await nc.close()
    seqs = asyncio.run(flood())
    last = max(seqs)

    def folded():
        with site.client() as c:
            return c.get("/healthz").status_code == 200 and all_events(c) == events and \
                sqlite3.connect(site.data / "read-model.sqlite").execute(
                    "SELECT seq FROM checkpoints WHERE stream='EVENTS'").fetchone()[0] == last
    wait_until(folded, 120, what="the junk to be folded")
    db = sqlite3.connect(site.data / "read-model.sqlite")
    rows, kept, largest = db.execute("SELECT count(*), sum(length(payload)), max(length(payload))"
                                     " FROM quarantine").fetchone()
    assert rows <= QUARANTINE_MAX_ROWS and kept <= QUARANTINE_MAX_BYTES and largest <= QUARANTINE_KEEP_BYTES
    dropped = db.execute("SELECT messages FROM quarantine_dropped WHERE stream='EVENTS'").fetchone()[0]
    assert rows + dropped == len(seqs)
    oldest = db.execute("SELECT min(stream_seq) FROM quarantine").fetchone()[0]
    assert oldest > min(seqs), "the oldest junk goes first"
    assert re.search(r'^odst_quarantine_dropped_total\{stream="EVENTS"\} [1-9]', site.client().get("/metrics").text,
                     re.M)

    for state in ("running", "stopped"):
        code, s, text = audit(site.data)
        assert code == 0, text
        assert s["violations"] == "0" and s["quarantined"] == "0", text
        assert s["junk"].startswith(f"{len(seqs)} "), text
        assert "dropped from the bounded quarantine" in text and s["read model"] == "matches the rebuild", text
        if state == "running":
            assert site.stop() == 0
    site.start()
    with site.client() as c:
        assert upload(c, "b.pkg", os.urandom(1000)).status_code == 201


def test_audit_of_an_unreachable_broker_is_a_violation_not_a_traceback(make_site):
    from harness.ports import free_port
    site = make_site().start()
    assert site.stop() == 0
    r = run_odst("audit", "--data", str(site.data), "--nats", f"nats://127.0.0.1:{free_port()}")
    text = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in text, text
    assert "violations  1" in r.stdout and "unreachable" in r.stdout, text
