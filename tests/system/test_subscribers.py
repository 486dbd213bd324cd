"""Downstream services read a site's events over NATS with a credential of their own.

`odst credentials add --role subscriber NAME` makes one: the site keeps only its public
NKey (an event), the broker lets it subscribe to event subjects and read the event
streams through consumers named NAME, with its replies under its own inbox prefix
``_INBOX_NAME`` that no one else is sent, and refuses everything else; revoking it closes
the door again.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import nats
import nats.js.errors
import nats.errors
import pytest
from nats.js.api import ConsumerConfig

from odst.bus.identity import new_user_seed, public_key_of_seed, read_seed
from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import StoredMessage
from odst.events.signing import SiteKey
from odst.gateway.credentials import CredentialNameInvalid, check_name, public_servers
from odst.projections import apply, db, views
from harness.wait import until
from tests.conftest import ADMIN_TOKEN, all_events, site_run_info, upload_bytes, wait_until
from tests.unit.test_projection import Log


# ---------------------------------------------------------------- the rules, pure

@pytest.mark.parametrize("name", ["jamf-sync", "audit_bot", "A", "x" * 64, "0-_"])
def test_a_name_is_one_subject_token(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "a.b", "a b", "a*", "a>", "../x", "a/b", "é", "a\x00",
                                  "a\n", "$JS", "a,b"])
def test_anything_else_is_refused_with_a_reason(name):
    with pytest.raises(CredentialNameInvalid) as exc:
        check_name(name)
    assert exc.value.status == 400 and exc.value.detail


def test_the_broker_urls_handed_out_carry_no_password():
    assert public_servers("nats://odst:secret@10.0.0.1:4222,nats://10.0.0.2:4222") == \
        ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]


def _fold(tmp: Path, log: Log, trusted: dict, name: str):
    conn = db.open_read_model(tmp / name)
    writer = apply.ReadModelWriter(conn, trusted)
    for m in log.msgs:
        assert writer.fold(m).applied
    return conn


def test_projection_one_active_credential_per_name_own_site_only(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    seeds = [new_user_seed() for _ in range(4)]
    log = Log(key, key)
    log.append(ev.NatsCredentialCreated(credential_id="c1", name="feed", nkey=public_key_of_seed(seeds[0])))
    # the same name in another case while c1 is active: not applied (consumer names would clash)
    log.append(ev.NatsCredentialCreated(credential_id="c2", name="FEED", nkey=public_key_of_seed(seeds[1])))
    log.append(ev.NatsCredentialCreated(credential_id="c3", name="other", role="subscriber",
                                        nkey=public_key_of_seed(seeds[2])))
    log.append(ev.NatsCredentialRevoked(credential_id="c1"))
    log.append(ev.NatsCredentialCreated(credential_id="c4", name="feed", nkey=public_key_of_seed(seeds[3])))
    log.append(ev.NatsCredentialRevoked(credential_id="c4"))
    log.append(ev.NatsCredentialRevoked(credential_id="c4"))  # twice: the first revocation stands
    log.append(ev.NatsCredentialCreated(credential_id="c5", name="again", nkey=public_key_of_seed(seeds[2])))

    live = _fold(tmp_path, log, {key.site_id: key.public_key}, "live.sqlite")
    # the broker's users (odst.bus.authorization.Subscriber): the active one only
    assert [(u.name, u.nkey) for u in views.nats_subscribers(live)] == [("other", public_key_of_seed(seeds[2]))]
    rows = {c.credential_id: c for c in views.nats_credentials(live)}
    assert set(rows) == {"c1", "c3", "c4"}  # c2 (name taken) and c5 (key reused) never applied
    assert rows["c1"].revoked_at and rows["c1"].revoked_by == "t"
    assert rows["c3"].revoked_at is None and rows["c3"].created_by == "t"
    assert rows["c4"].revoked_at == _ts(log.msgs[-3])  # the first revocation stands
    assert [c.credential_id for c in views.nats_credentials(live, include_revoked=False)] == ["c3"]
    dump = json.dumps(apply.dump(live), default=str)
    assert not any(s in dump for s in seeds)  # public keys only

    # a rebuild gives the same table
    assert apply.dump(_fold(tmp_path, log, {key.site_id: key.public_key}, "rebuilt.sqlite")) == apply.dump(live)

    # a peer that mirrors this log grants nothing on its own broker
    other = SiteKey.load_or_create(tmp_path / "other.key")
    peer_log = Log(other, other)
    peer_log.append(ev.PeerRegistered(site=key.site_id, public_key=key.public_key.hex()))
    peer = _fold(tmp_path, peer_log, {other.site_id: other.public_key}, "peer.sqlite")
    writer = apply.ReadModelWriter(peer, {other.site_id: other.public_key})
    for m in log.msgs:
        assert writer.fold(StoredMessage(f"PEER_{key.site_id}", m.seq, m.subject, m.payload)).applied
    assert views.nats_credentials(peer) == [] and views.nats_subscribers(peer) == []


def _ts(msg: StoredMessage) -> int:
    return codec.decode_body(codec.unverified_body(msg.payload)).ts


# ---------------------------------------------------------------- Admin API and CLI

def _error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["detail"], body
    return body


def test_admin_api_creates_lists_and_revokes_only_for_admins(make_site):
    site = make_site().start()
    admin = site.client()
    r = admin.post("/api/v1/credentials", json={"name": "jamf-sync", "role": "subscriber"})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["seed"].startswith("SU") and public_key_of_seed(made["seed"]) == made["nkey"]
    assert made["nkey"].startswith("U") and made["name"] == "jamf-sync" and made["role"] == "subscriber"
    assert made["servers"] and all(u.startswith("nats://127.0.0.1:") for u in made["servers"])
    assert made["site"] and "jamf-sync" in made["may"]["consumers"]
    assert made["inbox_prefix"] == "_INBOX_jamf-sync" and "_INBOX_jamf-sync" in made["may"]["inbox"]

    listed = admin.get("/api/v1/credentials").json()["credentials"]
    # the log (mirrored by every peer) holds the public key only
    events = admin.get("/api/v1/events", params={"type": "NatsCredentialCreated"}).json()["events"]
    assert len(events) == 1 and made["seed"] not in json.dumps(events)
    assert events[0]["envelope"]["event"]["nkey"] == made["nkey"]
    assert [(c["credential_id"], c["name"], c["role"], c["nkey"], c["created_by"], c["revoked_at"])
            for c in listed] == [(made["credential_id"], "jamf-sync", "subscriber", made["nkey"],
                                  events[0]["actor"], None)]
    assert made["seed"] not in json.dumps(listed)

    # clear 4xx for every bad request
    for body, status, code in [({"name": "a.b"}, 400, "credential_name_invalid"),
                               ({"name": ""}, 400, "credential_name_invalid"),
                               ({"name": "x" * 65}, 400, "credential_name_invalid"),
                               ({"name": "odst.*.ev.>"}, 400, "credential_name_invalid"),
                               ({"name": "ok", "role": "admin"}, 400, "request_invalid"),
                               ({"name": "ok", "extra": 1}, 400, "request_invalid"),
                               ({"role": "subscriber"}, 400, "request_invalid"),
                               ({"name": "JAMF-sync"}, 409, "credential_exists")]:
        assert _error(admin.post("/api/v1/credentials", json=body), status)["error"] == code, body
    _error(admin.post("/api/v1/credentials", content=b"{not json"), 400)
    _error(admin.delete("/api/v1/credentials/nc_nope"), 404)

    # operators and auditors may not see, make or revoke credentials
    for role in ("operator", "auditor"):
        token = admin.post("/api/v1/tokens", json={"name": role, "role": role}).json()["token"]
        other = site.client(token=token)
        _error(other.get("/api/v1/credentials"), 403)
        _error(other.post("/api/v1/credentials", json={"name": f"by-{role}"}), 403)
        _error(other.delete(f"/api/v1/credentials/{made['credential_id']}"), 403)

    r = admin.delete(f"/api/v1/credentials/{made['credential_id']}")
    assert r.status_code == 200 and r.json() == {"revoked": made["credential_id"]}
    _error(admin.delete(f"/api/v1/credentials/{made['credential_id']}"), 404)
    listed = admin.get("/api/v1/credentials").json()["credentials"]
    assert listed[0]["revoked_at"] and listed[0]["revoked_by"]
    # the name is free again once revoked
    assert admin.post("/api/v1/credentials", json={"name": "jamf-sync"}).status_code == 201

    doc = admin.get("/schema/openapi.json").json()
    assert {"get", "post"} <= set(doc["paths"]["/api/v1/credentials"])
    assert "delete" in doc["paths"]["/api/v1/credentials/{credential_id}"]
    assert doc["paths"]["/api/v1/credentials"]["post"]["operationId"] == "createCredential"


def test_cli_add_list_revoke(make_site, tmp_path):
    site = make_site().start()
    flags = ["--server", site.url, "--token", ADMIN_TOKEN]
    cwd = tmp_path / "work"
    cwd.mkdir()

    def odst(*args):  # run_odst, from a working directory of its own (where ./NAME.nk goes)
        return subprocess.run([sys.executable, "-m", "odst", *args, *flags], capture_output=True, text=True,
                              timeout=120, cwd=cwd, stdin=subprocess.DEVNULL)

    p = odst("credentials", "add", "--role", "subscriber", "reporting")
    assert p.returncode == 0, p.stderr
    seed_file = cwd / "reporting.nk"
    assert stat.S_IMODE(seed_file.stat().st_mode) == 0o600
    seed = read_seed(seed_file)
    assert seed not in p.stdout  # the seed is in the file, not on the screen
    assert "nkeys_seed" in p.stdout and "nats --server" in p.stdout and "--nkey" in p.stdout
    assert "inbox_prefix='_INBOX_reporting'" in p.stdout and "--inbox-prefix _INBOX_reporting" in p.stdout
    assert "durable='reporting'" in p.stdout and "ordered_consumer" not in p.stdout
    info = site.client().get("/api/v1/credentials").json()["credentials"]
    assert [(c["name"], c["nkey"]) for c in info] == [("reporting", public_key_of_seed(seed))]

    # never overwrites a seed file; nothing is created then
    p = odst("credentials", "add", "--role", "subscriber", "reporting2", "--out", str(seed_file))
    assert p.returncode == 2 and "exists" in p.stderr and "Traceback" not in p.stderr
    p = odst("credentials", "add", "--role", "subscriber", "bad.name")
    assert p.returncode == 2 and "letters, digits" in p.stderr and not (cwd / "bad.name.nk").exists()
    p = odst("credentials", "add", "--role", "subscriber", "other", "--out", str(tmp_path / "keys" / "o.nk"))
    assert p.returncode == 0, p.stderr

    p = odst("credentials", "list")
    assert p.returncode == 0, p.stderr
    rows = [line.split("\t") for line in p.stdout.splitlines()]
    assert [(r[1], r[2], r[3]) for r in rows] == [("reporting", "subscriber", "active"),
                                                   ("other", "subscriber", "active")]

    p = odst("credentials", "revoke", "REPORTING")  # by name, as the list shows it (any case)
    assert p.returncode == 0, p.stderr
    p = odst("credentials", "revoke", rows[1][0])  # by id
    assert p.returncode == 0, p.stderr
    p = odst("credentials", "revoke", "reporting")
    assert p.returncode == 2 and "no active credential" in p.stderr
    listed = json.loads(odst("credentials", "list", "--json").stdout)["credentials"]
    assert all(c["revoked_at"] for c in listed)


# ---------------------------------------------------------------- on the broker itself

async def _connect(url: str, seed: str, name: str | None = None, errors: list[str] | None = None):
    """A service's connection: with the inbox prefix its credential ``name`` must use
    (README, "Event subscribers"); without a name, nats-py's default ``_INBOX``."""
    async def on_error(exc):
        if errors is not None:
            errors.append(str(exc))
    prefix = {"inbox_prefix": f"_INBOX_{name}"} if name else {}
    return await nats.connect(url, nkeys_seed_str=seed, error_cb=on_error, allow_reconnect=False,
                              connect_timeout=5, max_reconnect_attempts=0, **prefix)


async def _try_connect(url: str, seed: str) -> str:
    """'ok', or why the broker refused the seed."""
    try:
        nc = await _connect(url, seed)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    await nc.close()
    return "ok"


def _add_credential(site, cwd: Path, name: str) -> str:
    p = subprocess.run([sys.executable, "-m", "odst", "credentials", "add", "--role", "subscriber", name,
                        "--server", site.url, "--token", ADMIN_TOKEN], capture_output=True, text=True,
                       timeout=120, cwd=cwd, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    return read_seed(cwd / f"{name}.nk")


def test_a_subscriber_reads_every_event_and_is_refused_everything_else(make_site, tmp_path):
    site = make_site().start()
    admin = site.client()
    site_id = admin.get("/healthz").json()["site"]
    url = site_run_info(site.data)["nats"]
    feed = _add_credential(site, tmp_path, "feed")
    other = _add_credential(site, tmp_path, "other")
    for seed in (feed, other):  # the broker reloads its users shortly after the event
        wait_until(lambda: asyncio.run(_try_connect(url, seed)) == "ok", 30,
                   what="the broker to accept the new credential")

    async def story():
        errors: list[str] = []
        nc = await _connect(url, feed, "feed", errors)
        nc_other = await _connect(url, other, "other")
        js, js_other = nc.jetstream(timeout=5), nc_other.jetstream(timeout=5)

        # live: an upload's event arrives on the event subjects
        live = await nc.subscribe(f"odst.{site_id}.ev.>")
        await nc.flush()
        r = await asyncio.to_thread(upload_bytes, admin, "live.pkg", b"live bytes")
        assert r.status_code == 201, r.text
        while True:
            msg = await live.next_msg(timeout=30)
            if msg.subject == f"odst.{site_id}.ev.PackageUploaded":
                break
        await live.unsubscribe()

        # the whole log, byte for byte as signed, through a durable pull consumer of its own name,
        # acknowledged as it goes
        logged = await asyncio.to_thread(all_events, admin)
        signed = {e["stream_seq"]: base64.b64decode(e["signed"]) for e in logged if e["stream"] == "EVENTS"}
        count = (await js.stream_info("EVENTS")).state.messages
        assert count == len(signed) >= 3
        pull = await js.pull_subscribe("odst.*.ev.>", durable="feed", stream="EVENTS")
        got = {}
        while len(got) < count:
            for m in await pull.fetch(count - len(got), timeout=10):
                got[m.metadata.sequence.stream] = m.data
                await m.ack()
        assert got == signed
        await pull.unsubscribe()

        # again from the start: delete it, and read it pushed into the service's own inbox
        assert await js.delete_consumer("EVENTS", "feed")
        inbox = nc.new_inbox()
        assert inbox.startswith("_INBOX_feed.")
        push = await js.subscribe("odst.*.ev.>", stream="EVENTS", durable="feed", manual_ack=True,
                                  flow_control=True, idle_heartbeat=1.0,
                                  config=ConsumerConfig(name="feed", deliver_subject=inbox))
        got = {}
        while len(got) < count:
            m = await push.next_msg(timeout=30)
            got[m.metadata.sequence.stream] = m.data
            await m.ack()
        assert got == signed
        info = await js.consumer_info("EVENTS", "feed")
        assert info.config.deliver_subject == inbox and info.config.durable_name == "feed"
        await push.unsubscribe()
        await js_other.pull_subscribe("odst.*.ev.>", durable="other", stream="EVENTS")

        # refused: every way to change a stream, a consumer not its own, KV, and publishing events
        junk = json.dumps({"name": "EVENTS", "subjects": [f"odst.{site_id}.ev.>"], "max_msgs": 1}).encode()
        refused_requests = [
            ("$JS.API.STREAM.DELETE.EVENTS", b""),
            ("$JS.API.STREAM.UPDATE.EVENTS", junk),
            ("$JS.API.STREAM.PURGE.EVENTS", b""),
            ("$JS.API.STREAM.MSG.DELETE.EVENTS", b'{"seq": 1}'),
            ("$JS.API.STREAM.CREATE.JUNK", b'{"name": "JUNK", "subjects": ["junk.>"]}'),
            (f"$JS.{site_id}.API.STREAM.DELETE.EVENTS", b""),
            ("$JS.API.CONSUMER.DELETE.EVENTS.other", b""),
            ("$JS.API.CONSUMER.CREATE.EVENTS.other", b'{"stream_name": "EVENTS", "config": {"name": "other"}}'),
            ("$JS.API.CONSUMER.CREATE.REPLICATION", b'{"stream_name": "REPLICATION", "config": {}}'),
            ("$JS.API.CONSUMER.CREATE.NOTIFY", b'{"stream_name": "NOTIFY", "config": {}}'),
            ("$KV.ODST_LEASES.some.pkg", b"mine"),
            (f"odst.{site_id}.ev.x", b"junk"),
            (f"odst.{site_id}.rpc.register", b"{}"),
            (f"odst.{site_id}.chunk", b"{}"),
        ]

        async def refused(subject: str, body: bytes):
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.request(subject, body, timeout=2)
        await asyncio.gather(*(refused(s, b) for s, b in refused_requests))
        await nc.publish(f"odst.{site_id}.ev.PackageDeleted", b"junk")
        for subject in (f"odst.{site_id}.work.>", f"_INBOX.{site_id}.>", f"odst.{site_id}.rpc.>",
                        "$JS.API.>", "$KV.>", ">"):
            await nc.subscribe(subject)
        await nc.flush()
        # the server reports each (lower-cased by nats-py; the domain's API prefix mapped to $JS.API)
        expected = [f'publish to "{s.replace(f"$JS.{site_id}.API", "$JS.API")}"' for s, _ in refused_requests]
        expected += [f'publish to "odst.{site_id}.ev.PackageDeleted"']
        expected += [f'subscription to "{s}"' for s in (f"odst.{site_id}.work.>", f"_INBOX.{site_id}.>",
                                                        f"odst.{site_id}.rpc.>", "$JS.API.>", "$KV.>", ">")]
        missing = lambda: [e for e in expected if not any(e.lower() in err.lower() for err in errors)]  # noqa: E731
        await until(lambda: not missing(), 10, what=lambda: f"a permissions violation for {missing()}")
        assert all("permissions violation" in err.lower() for err in errors), errors

        # nothing happened: the log is whole, the other service's consumer is there
        info = await js.stream_info("EVENTS")
        assert info.state.messages == count and info.config.max_msgs in (None, -1)
        assert (await js_other.consumer_info("EVENTS", "other")).name == "other"
        assert nc.is_connected  # refused requests do not cost the service its connection
        await nc.close()
        await nc_other.close()
    asyncio.run(story())
    assert admin.get("/api/v1/quarantine").json()["count"] == 0  # no junk reached the log
    assert httpx.get(f"{site.url}/healthz", timeout=10).status_code == 200


def test_a_revoked_subscriber_is_cut_off(make_site, tmp_path):
    site = make_site().start()
    url = site_run_info(site.data)["nats"]
    feed = _add_credential(site, tmp_path, "feed")
    other = _add_credential(site, tmp_path, "other")
    for seed in (feed, other):
        wait_until(lambda: asyncio.run(_try_connect(url, seed)) == "ok", 30,
                   what="the broker to accept the new credential")

    async def revoke_while_connected():
        nc = await _connect(url, feed, "feed")
        p = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "odst", "credentials", "revoke", "feed", "--server", site.url,
                             "--token", ADMIN_TOKEN], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        await until(lambda: nc.is_closed, 30, what="the broker to close the revoked service's connection")
    asyncio.run(revoke_while_connected())
    refusal = wait_until(lambda: (r := asyncio.run(_try_connect(url, feed))) != "ok" and r, 30,
                         what="the revoked seed to be refused")
    assert "authorization" in refusal.lower(), refusal
    assert asyncio.run(_try_connect(url, other)) == "ok"  # only that one
    # and nobody gets in without a credential
    assert asyncio.run(_try_connect(url, new_user_seed())) != "ok"


def _start_with_two_services(make_site, tmp_path):
    """A site, its broker's URL and the seeds of two subscriber credentials, "feed" and
    "other", once the broker accepts both (it reloads its users shortly after the event)."""
    site = make_site().start()
    url = site_run_info(site.data)["nats"]
    seeds = {name: _add_credential(site, tmp_path, name) for name in ("feed", "other")}
    for seed in seeds.values():
        wait_until(lambda: asyncio.run(_try_connect(url, seed)) == "ok", 30,
                   what="the broker to accept the new credential")
    return site, url, seeds


def _violations_for(errors: list[str], expected: list[str]):
    """The expected permission violations (``publish to "…"``, ``subscription to "…"``) that
    the server has not reported yet."""
    return lambda: [e for e in expected if not any(e.lower() in err.lower() for err in errors)]


async def _refused(nc, subject: str, body: bytes) -> None:
    with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
        await nc.request(subject, body, timeout=2)


def test_a_subscriber_cannot_rewrite_another_subscribers_consumer(make_site, tmp_path):
    site, url, seeds = _start_with_two_services(make_site, tmp_path)

    async def story():
        errors: list[str] = []
        nc, nc_other = await _connect(url, seeds["feed"], "feed", errors), await _connect(url, seeds["other"], "other")
        js_other = nc_other.jetstream(timeout=5)
        await js_other.pull_subscribe("odst.*.ev.>", durable="other", stream="EVENTS")
        before = (await js_other.consumer_info("EVENTS", "other")).config
        config = before.as_dict()
        config["filter_subject"] = "odst.nothing.ev.>"
        body = json.dumps({"stream_name": "EVENTS", "config": config}).encode()
        # the unnamed route (its body names the consumer) and the legacy durable route are closed
        await _refused(nc, "$JS.API.CONSUMER.CREATE.EVENTS", body)
        await _refused(nc, "$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.other", body)
        await _refused(nc, "$JS.API.CONSUMER.CREATE.EVENTS.other.odst.nothing.ev.>", body)
        missing = _violations_for(errors, [f'publish to "{s}"' for s in (
            "$JS.API.CONSUMER.CREATE.EVENTS", "$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.other",
            "$JS.API.CONSUMER.CREATE.EVENTS.other.odst.nothing.ev.>")])
        await until(lambda: not missing(), 10, what=lambda: f"a permissions violation for {missing()}")
        # its own route with a body naming the other consumer: the server holds name and subject together
        r = json.loads((await nc.request("$JS.API.CONSUMER.CREATE.EVENTS.feed", body, timeout=5)).data)
        assert r.get("error"), r
        after = (await js_other.consumer_info("EVENTS", "other")).config
        await nc.close()
        await nc_other.close()
        return before, after
    before, after = asyncio.run(story())
    assert after.filter_subject == before.filter_subject == "odst.*.ev.>" and after.durable_name == "other"
    assert after == before


def test_a_subscriber_never_receives_another_ones_replies(make_site, tmp_path):
    site, url, seeds = _start_with_two_services(make_site, tmp_path)
    site_id = site.client().get("/healthz").json()["site"]

    async def story():
        # a client left on nats-py's default inbox prefix is answered nowhere it may listen
        errors: list[str] = []
        plain = await _connect(url, seeds["feed"], None, errors)
        with pytest.raises(nats.errors.TimeoutError):
            await plain.jetstream(timeout=2).stream_info("EVENTS")
        await until(lambda: any('subscription to "_inbox.' in e.lower() for e in errors), 10,
                     what="the server to refuse the default reply subscription")
        await plain.close()

        # "feed" listens wherever it can think of, while "other" asks the broker a question
        errors.clear()
        nc, nc_other = await _connect(url, seeds["feed"], "feed", errors), await _connect(url, seeds["other"], "other")
        heard: list[str] = []

        async def record(msg):
            heard.append(msg.subject)
        spying = ["_INBOX.>", f"_INBOX.{site_id}.>", "_INBOX_other.>", "*.>", ">"]
        for subject in spying:
            await nc.subscribe(subject, cb=record)
        own = await nc.subscribe("_INBOX_feed.>", cb=record)  # its own: allowed, hears only its own
        await nc.flush()
        missing = _violations_for(errors, [f'subscription to "{s}"' for s in spying])
        await until(lambda: not missing(), 10, what=lambda: f"a permissions violation for {missing()}")
        assert not any('"_inbox_feed.>"' in e.lower() for e in errors), errors

        info = await nc_other.jetstream(timeout=5).stream_info("EVENTS")  # its reply: _INBOX_other.…
        assert info.config.name == "EVENTS"
        await nc.flush()  # anything the server sent "feed" alongside that reply has arrived by now
        assert heard == []
        # and its own questions are answered, on its own inbox
        assert (await nc.jetstream(timeout=5).stream_info("EVENTS")).config.name == "EVENTS"
        await own.unsubscribe()
        assert all(s.startswith("_INBOX_feed.") for s in heard) and heard
        assert nc.is_connected and nc_other.is_connected
        await nc.close()
        await nc_other.close()
    asyncio.run(story())


async def _last_seqs(js, streams) -> dict[str, int]:
    return {name: (await js.stream_info(name)).state.last_seq for name in streams}


def test_a_subscriber_creates_only_its_named_consumer_and_it_stores_nothing_anywhere(make_site, tmp_path):
    """No unnamed, ephemeral or ordered consumer; and its named consumer pointed at the subjects
    of the site's internal streams (the REPLICATION work queue, the lease bucket, NOTIFY)
    puts nothing into them, even when JetStream delivers there."""
    from tests.conftest import site_nats

    site, url, seeds = _start_with_two_services(make_site, tmp_path)
    site_id = site.client().get("/healthz").json()["site"]
    internal = ["REPLICATION", "KV_ODST_LEASES", "KV_ODST_NONCES", "NOTIFY"]

    async def story():
        errors: list[str] = []
        nc = await _connect(url, seeds["feed"], "feed", errors)
        js = nc.jetstream(timeout=3)
        own = await site_nats(site.data)
        own_js = own.jetstream(timeout=5)
        count = (await own_js.stream_info("EVENTS")).state.messages
        assert count >= 3

        # unnamed, ephemeral and ordered consumers: refused, whichever way they are asked for
        unnamed = json.dumps({"stream_name": "EVENTS", "config": {"deliver_policy": "all"}}).encode()
        await _refused(nc, "$JS.API.CONSUMER.CREATE.EVENTS", unnamed)
        for attempt in (lambda: js.subscribe("odst.*.ev.>", stream="EVENTS", ordered_consumer=True),
                        lambda: js.subscribe("odst.*.ev.>", stream="EVENTS"),
                        lambda: js.pull_subscribe("odst.*.ev.>", stream="EVENTS"),  # a random name
                        lambda: js.subscribe("odst.*.ev.>", stream="EVENTS", durable="feed")):  # legacy route
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await attempt()
        missing = _violations_for(errors, ['publish to "$JS.API.CONSUMER.CREATE.EVENTS"',
                                           'publish to "$JS.API.CONSUMER.DURABLE.CREATE.EVENTS.feed"'])
        await until(lambda: not missing(), 10, what=lambda: f"a permissions violation for {missing()}")
        assert "feed" not in [c.name for c in await own_js.consumers_info("EVENTS")]

        streams = [s.config.name for s in await own_js.streams_info()]
        assert set(internal) <= set(streams), streams
        for target in (f"odst.{site_id}.work.pull", "$KV.ODST_LEASES.x", "$KV.ODST_NONCES.x",
                       f"odst.{site_id}.notify.x"):
            # interest in the subject, as any of the site's own processes could have: so that
            # JetStream really delivers there
            witnessed: list[bytes] = []

            async def witness(msg):
                witnessed.append(msg.data)
            wsub = await own.subscribe(target, cb=witness)
            await own.flush()
            before = await _last_seqs(own_js, internal)
            body = {"stream_name": "EVENTS", "config": {"name": "feed", "durable_name": "feed",
                                                        "deliver_subject": target, "ack_policy": "none"}}
            answer = json.loads((await nc.request("$JS.API.CONSUMER.CREATE.EVENTS.feed",
                                                  json.dumps(body).encode(), timeout=5)).data)
            if "error" not in answer:  # accepted (nats-server checks no rights on it): see where it lands
                # until the site's consumer guard deletes it, nothing it delivers may be stored
                deadline = asyncio.get_running_loop().time() + 30
                gone = False
                while asyncio.get_running_loop().time() < deadline and not gone:
                    after = await _last_seqs(own_js, internal)
                    assert after == before, (f"a subscriber's consumer delivering to {target} stored messages "
                                             f"in the site's internal streams: {before} -> {after}")
                    try:
                        await own_js.consumer_info("EVENTS", "feed")
                        await asyncio.sleep(0.05)
                    except nats.js.errors.NotFoundError:
                        gone = True
                assert gone, f"the site kept a subscriber's consumer delivering to {target}"
            await wsub.unsubscribe()
            assert await _last_seqs(own_js, internal) == before
        await nc.close()
        await own.close()
    asyncio.run(story())
    assert site.client().get("/api/v1/quarantine").json()["count"] == 0
    assert httpx.get(f"{site.url}/healthz", timeout=10).status_code == 200


def test_a_subscribers_consumer_cannot_deliver_into_the_sites_own_services(make_site, tmp_path):
    """A push consumer's deliver_group joins a queue group: pointed at the site's chunk and
    registration services, JetStream would hand them the log as requests from the site's own
    account, subjects the subscriber may not publish to. The services' queue groups have
    names only the site knows, and the site deletes such a consumer (its consumer guard)."""
    import nats.js.errors

    from tests.conftest import site_nats

    site, url, seeds = _start_with_two_services(make_site, tmp_path)
    site_id = site.client().get("/healthz").json()["site"]

    async def story():
        nc = await _connect(url, seeds["feed"], "feed")
        own = await site_nats(site.data)
        own_js = own.jetstream(timeout=5)
        delivered, removed = {}, {}
        for target, group in ((f"odst.{site_id}.chunk", "chunk"), (f"odst.{site_id}.rpc.register", "register")):
            body = {"stream_name": "EVENTS", "config": {"name": "feed", "durable_name": "feed", "ack_policy": "none",
                                                        "deliver_subject": target, "deliver_group": group}}
            answer = json.loads((await nc.request("$JS.API.CONSUMER.CREATE.EVENTS.feed",
                                                  json.dumps(body).encode(), timeout=5)).data)
            if "error" in answer:
                delivered[target], removed[target] = 0, True
                continue
            # until the guard deletes it, watch what it delivered (poll with a deadline)
            deadline = asyncio.get_running_loop().time() + 30
            seq, gone = 0, False
            while asyncio.get_running_loop().time() < deadline:
                try:
                    seq = max(seq, (await own_js.consumer_info("EVENTS", "feed")).delivered.stream_seq)
                except nats.js.errors.NotFoundError:
                    gone = True
                    break
                await asyncio.sleep(0.05)
            delivered[target], removed[target] = seq, gone
        await nc.close()
        await own.close()
        return delivered, removed
    delivered, removed = asyncio.run(story())
    assert delivered == {f"odst.{site_id}.chunk": 0, f"odst.{site_id}.rpc.register": 0}, \
        f"events delivered into the site's own services by a subscriber's consumer (up to stream seq): {delivered}"
    assert all(removed.values()), f"the site kept a consumer aimed at its own services: {removed}"
    assert "deleted a consumer that aimed the log elsewhere" in site.log()
    assert "unsigned peer request" not in site.log()


# ---------------------------------------------------------------- web UI (last: the module's browser
# keeps an event loop marked running, and the asyncio.run() tests above must come first)

def test_the_settings_page_creates_shows_once_and_revokes_a_subscriber(make_site, page):
    from playwright.sync_api import expect

    from tests.browser import shot
    from tests.system.test_ui import ADMIN_PASSWORD, accessibility_problems, sign_in

    site = make_site(env={"ODST_ADMIN_PASSWORD": ADMIN_PASSWORD}).start()
    sign_in(page, site, "admin", ADMIN_PASSWORD)
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Settings").click()
    page.get_by_role("tab", name="Event subscribers").click()  # Settings shows one section at a time
    subs = page.locator("section[aria-labelledby=sec-subscribers]")
    expect(subs.get_by_text("No event subscribers.")).to_be_visible()

    subs.get_by_label("Name").fill("jamf.sync")
    subs.get_by_role("button", name="Create credential").click()
    expect(subs.get_by_role("alert")).to_contain_text("letters, digits")
    subs.get_by_label("Name").fill("jamf-sync")
    subs.get_by_role("button", name="Create credential").click()
    secret = subs.locator(".secret code")
    expect(secret).to_have_text(re.compile(r"^SU[A-Z0-9]+$"))
    seed = secret.inner_text()
    expect(subs.get_by_role("link", name="Save jamf-sync.nk")).to_have_attribute("download", "jamf-sync.nk")
    row = subs.get_by_role("row", name=re.compile("^jamf-sync"))
    expect(row).to_contain_text("active")
    expect(row).to_contain_text("by ")
    with site.client() as c:
        listed = c.get("/api/v1/credentials").json()["credentials"]
    assert [(x["name"], x["nkey"]) for x in listed] == [("jamf-sync", public_key_of_seed(seed))]
    assert accessibility_problems(page) == []
    shot(page, "1-created")

    # the same name again: the server's 409 is shown
    subs.get_by_label("Name").fill("JAMF-sync")
    subs.get_by_role("button", name="Create credential").click()
    expect(subs.get_by_role("alert")).to_contain_text("is active")

    page.reload()  # shown once: after a reload only the public facts remain
    subs = page.locator("section[aria-labelledby=sec-subscribers]")
    expect(subs.get_by_role("row", name=re.compile("^jamf-sync"))).to_be_visible()
    assert seed not in page.content()
    subs.get_by_role("button", name="Revoke subscriber jamf-sync").click()
    page.get_by_role("dialog").get_by_role("button", name="Revoke").click()
    expect(subs.get_by_role("row", name=re.compile("^jamf-sync"))).to_contain_text("revoked")
    with site.client() as c:
        assert c.get("/api/v1/credentials").json()["credentials"][0]["revoked_at"]
    shot(page, "2-revoked")
