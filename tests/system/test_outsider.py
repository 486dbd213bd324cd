"""Every NATS door of two linked sites, tried as an attacker would (issue: trust at the site
boundary).

Three places to attack from:
* an outsider on each site's client port: no credentials, or a key nobody registered;
* a stranger ``nats-server`` leaf-linked to the hub's leaf port, without credentials or with
  a key nobody registered, its own client having every right on its own server;
* a registered peer using its own valid credentials to exceed them: the spoke's own broker
  (the site's full-rights client key) sending through its leaf link to the hub, and a hostile
  hub, whose own config gives the spoke's link every right, sending to a spoke that dialled it.

Each attack is one that erased or corrupted a site's history before NATS was authenticated:
STREAM.UPDATE with max_msgs 1, STREAM.DELETE/PURGE/MSG.DELETE, deleting the replication
consumer or a peer's mirror, KV puts on the lease bucket, junk published into event subjects,
a consumer whose deliveries are aimed at another stream's subjects, eavesdropping on internal
subjects. Afterwards both logs and both mirrors hold every event, nothing landed in the
internal streams, replication still works and ``odst audit`` is clean on both sites.
"""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import nats
import nats.errors
import pytest

from odst.bus.embedded import nats_server_binary
from odst.bus import authorization as authz
from odst.bus.identity import new_user_seed
from tests.conftest import free_port, run_odst, site_nats, wait_until, write_random
from tests.system.test_replication import available_at, register, site_id, upload

MiB = 1 << 20
INTERNAL = ("REPLICATION", "NOTIFY", "KV_ODST_LEASES", "KV_ODST_NONCES")


# --- what we look at before and after -------------------------------------------------------

async def _streams(data) -> dict[str, tuple[int, int, int]]:
    """Every stream of a site's broker: (messages, first_seq, last_seq), read as the site."""
    nc = await site_nats(data)
    try:
        out = {}
        for info in await nc.jetstream().streams_info():
            out[info.config.name] = (info.state.messages, info.state.first_seq, info.state.last_seq)
        return out
    finally:
        await nc.close()


def streams(site) -> dict[str, tuple[int, int, int]]:
    return asyncio.run(_streams(site.data))


def site_conf_of(site) -> dict:
    return json.loads((site.data / "run" / "site.json").read_text())


def nats_port(site) -> int:
    return int(site_conf_of(site)["nats"].rsplit(":", 1)[1])


def audit_clean(site) -> None:
    r = run_odst("audit", "--data", str(site.data))
    out = r.stdout + r.stderr
    assert "Traceback" not in out, out
    assert r.returncode == 0, out
    assert "violations  0" in r.stdout, out


# --- the attacks ----------------------------------------------------------------------------

async def attempt(nc, subject: str, payload: bytes = b"", timeout: float = 1.5) -> str:
    """Send one request; return what came back (or why nothing did)."""
    try:
        reply = await nc.request(subject, payload, timeout=timeout)
    except Exception as exc:  # no responders, timeout, permissions violation, connection closed
        return type(exc).__name__
    return reply.data.decode("utf-8", "replace")[:300]


def granted(seen: list[str]) -> list[str]:
    """The attempts that got a success, or a stream's config (= an answer from its JetStream).
    Creating a consumer on EVENTS is what a mirror does, so peers may: the evil ones are
    checked afterwards for never having delivered anything (assert_internal_untouched)."""
    return [x for x in seen if ('"success":true' in x or '"config"' in x) and ".CONSUMER.CREATE.EVENTS." not in x]


def destructive_requests(target: str, events_config: dict, peer: str) -> list[tuple[str, bytes]]:
    api = f"$JS.{target}.API"
    cut = {**events_config, "max_msgs": 1, "deny_delete": False, "deny_purge": False}
    evil_consumer = lambda name, deliver: json.dumps(  # noqa: E731
        {"stream_name": "EVENTS", "config": {"name": name, "deliver_subject": deliver,
                                             "deliver_policy": "all", "ack_policy": "none"}}).encode()
    return [
        (f"{api}.STREAM.UPDATE.EVENTS", json.dumps(cut).encode()),
        (f"{api}.STREAM.PURGE.EVENTS", b"{}"),
        (f"{api}.STREAM.MSG.DELETE.EVENTS", json.dumps({"seq": 2, "no_erase": True}).encode()),
        (f"{api}.STREAM.DELETE.EVENTS", b""),
        (f"{api}.STREAM.DELETE.PEER_{peer}", b""),
        (f"{api}.STREAM.PURGE.PEER_{peer}", b"{}"),
        (f"{api}.STREAM.DELETE.REPLICATION", b""),
        (f"{api}.STREAM.DELETE.NOTIFY", b""),
        (f"{api}.STREAM.DELETE.KV_ODST_LEASES", b""),
        (f"{api}.STREAM.DELETE.KV_ODST_NONCES", b""),
        (f"{api}.CONSUMER.DELETE.REPLICATION.replicators", b""),
        (f"{api}.CONSUMER.CREATE.REPLICATION.thief", json.dumps(
            {"stream_name": "REPLICATION", "config": {"name": "thief", "ack_policy": "none"}}).encode()),
        # a consumer on the event log whose deliveries are aimed at internal streams' subjects
        (f"{api}.CONSUMER.CREATE.EVENTS.evilwork", evil_consumer("evilwork", f"odst.{target}.work.pull")),
        (f"{api}.CONSUMER.CREATE.EVENTS.evilkv", evil_consumer("evilkv", f"$KV.ODST_LEASES.stolen{target}")),
        (f"{api}.CONSUMER.CREATE.EVENTS.evilapi", evil_consumer("evilapi", f"{api}.STREAM.DELETE.EVENTS")),
        (f"{api}.CONSUMER.CREATE.EVENTS.evilapi2", evil_consumer("evilapi2", "$JS.API.STREAM.DELETE.EVENTS")),
        (f"{api}.CONSUMER.CREATE.EVENTS.evilnotify", evil_consumer("evilnotify", f"odst.{target}.notify.x")),
        (f"{api}.STREAM.CREATE.EVIL", json.dumps({"name": "EVIL", "subjects": ["evil.>"]}).encode()),
        (f"{api}.ACCOUNT.PURGE.$G", b""),
        (f"{api}.META.LEADER.STEPDOWN", b""),
    ]


async def attack(nc, target: str, events_config: dict, peer: str) -> list[str]:
    """Every attack on ``target`` from connection ``nc``; returns what each got back."""
    seen: list[str] = []
    internal: list[bytes] = []
    for subject in (f"odst.{target}.work.>", f"odst.{target}.notify.>", "$KV.>", f"$JS.{target}.API.>"):
        try:
            await nc.subscribe(subject, cb=lambda m: internal.append(m.data))
        except Exception:
            pass  # a client port refuses the subscription outright
    for subject, payload in destructive_requests(target, events_config, peer):
        seen.append(f"{subject}: {await attempt(nc, subject, payload)}")
    for i in range(3):  # junk into the event log and the lease bucket
        try:
            await nc.publish(f"odst.{target}.ev.PackageDeleted", b"junk" * 256 * (1 + i * 1024))
            await nc.publish(f"$KV.ODST_LEASES.junk{target}{i}", b"mine")
            await nc.publish(f"odst.{target}.work.pull", b"{}")
        except Exception:
            break
    try:
        await nc.flush(2)
    except Exception:
        pass
    assert not internal, f"an attacker received internal traffic: {internal[:3]}"
    return seen


async def events_config(site) -> dict:
    nc = await site_nats(site.data)
    try:
        reply = await nc.request("$JS.API.STREAM.INFO.EVENTS", b"", timeout=5)
        return json.loads(reply.data)["config"]
    finally:
        await nc.close()


# --- processes ------------------------------------------------------------------------------

def start_nats(tmp_path, name: str, conf: str) -> subprocess.Popen:
    path = tmp_path / f"{name}.conf"
    path.write_text(conf)
    log = open(tmp_path / f"{name}.log", "ab")
    proc = subprocess.Popen([nats_server_binary(), "-c", str(path)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def stranger_leaf(tmp_path, name: str, hub_leaf_port: int, seed: str | None) -> tuple[subprocess.Popen, int]:
    """A nats-server of the attacker's, dialling the hub's leaf port (its own client port is open)."""
    port = free_port()
    remote = {"url": f"nats-leaf://127.0.0.1:{hub_leaf_port}", **({"nkey": seed} if seed else {})}
    conf = (f'server_name: "{name}"\nlisten: "127.0.0.1:{port}"\nmax_payload: 8MB\n'
            f'jetstream {{ store_dir: "{tmp_path / name}", domain: "{name}" }}\n'
            f'leafnodes {{ remotes: [ {json.dumps(remote)} ], reconnect: "1s" }}\n')
    return start_nats(tmp_path, name, conf), port


@pytest.fixture
def linked(make_site, tmp_path):
    """Hub A and spoke B, registered, mirroring each other, one package replicated."""
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    register(a, b)
    upload(a, "first.pkg", write_random(tmp_path / "first.pkg", 2 * MiB + 1, seed=1))
    wait_until(lambda: available_at(b, "first.pkg", site_id(b)), 90, what="first.pkg at B")
    return a, b, leaf


def settle(a, b):
    """Until both mirrors hold every event of the other's log."""
    ida, idb = site_id(a), site_id(b)

    def caught_up():
        sa, sb = streams(a), streams(b)
        return (sa.get(f"PEER_{idb}", (0, 0, -1))[2] == sb["EVENTS"][2]
                and sb.get(f"PEER_{ida}", (0, 0, -1))[2] == sa["EVENTS"][2])
    wait_until(caught_up, 60, what="both mirrors to catch up")
    return streams(a), streams(b)


def assert_nothing_lost(before: dict, after: dict, who: str) -> None:
    for name, (msgs, first, last) in before.items():
        if name in INTERNAL:
            continue
        assert name in after, f"{who}: stream {name} is gone"
        a_msgs, a_first, a_last = after[name]
        assert a_first == first and a_last >= last and a_msgs >= msgs, \
            f"{who}: {name} was {before[name]}, now {after[name]}"
    for name in after:
        assert name in before or name.startswith("PEER_"), f"{who}: a stream {name} appeared"


def assert_internal_untouched(site, who: str) -> None:
    """Nothing an attack aimed at this site (its id in the key) is in its lease bucket, and its
    work queue holds its replicator's own items only."""
    async def check():
        nc = await site_nats(site.data)
        try:
            js = nc.jetstream()
            kv = await js.key_value("ODST_LEASES")
            keys = []
            try:
                keys = await kv.keys()
            except Exception:  # no keys at all
                pass
            sid = json.loads((site.data / "run" / "site.json").read_text())["site"]
            assert not [k for k in keys if sid in k], f"{who}: lease KV written: {keys}"
            work = await js.stream_info("REPLICATION")
            for seq in range(work.state.first_seq, work.state.last_seq + 1):
                try:
                    msg = await js.get_msg("REPLICATION", seq)
                except Exception:
                    continue  # consumed
                item = json.loads(msg.data)  # the replicator's own work items only
                assert set(item) == {"name", "blake3"}, f"{who}: foreign work item {msg.data[:100]!r}"
            for c in await js.consumers_info("EVENTS"):
                # a peer may make consumers on the log (a mirror needs one), but one aimed at
                # another stream's subjects must never have delivered anything there
                if c.name.startswith("evil"):
                    assert c.delivered.stream_seq == 0, \
                        f"{who}: consumer {c.name} delivered the log to {c.config.deliver_subject}"
            names = await js.consumers_info("REPLICATION")
            assert [c.name for c in names] == ["replicators"], f"{who}: REPLICATION consumers {names}"
        finally:
            await nc.close()
    asyncio.run(check())


def test_no_outsider_or_registered_peer_can_erase_or_corrupt_a_site(linked, tmp_path):
    a, b, leaf = linked
    ida, idb = site_id(a), site_id(b)
    before_a, before_b = settle(a, b)
    cfg_a, cfg_b = asyncio.run(events_config(a)), asyncio.run(events_config(b))

    # 1. outsiders on each site's client port: no credentials, or a key nobody registered
    async def knock(port: int, seed: str | None):
        try:
            nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=3, max_reconnect_attempts=0,
                                    allow_reconnect=False, **({"nkeys_seed_str": seed} if seed else {}))
        except Exception as exc:
            return type(exc).__name__ + str(exc)
        await nc.close()
        return "connected"
    for site in (a, b):
        for seed in (None, new_user_seed()):
            got = asyncio.run(knock(nats_port(site), seed))
            assert "Authorization Violation" in got, f"client port of {site.data.name} with {seed and 'a stranger key'}: {got}"

    # 2. stranger leaf nodes on the hub's leaf port: no credentials, a key nobody registered
    for name, seed in (("strangeranon", None), ("strangerkey", new_user_seed())):
        proc, port = stranger_leaf(tmp_path, name, leaf, seed)
        try:
            async def from_stranger():
                nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5)
                try:
                    return await attack(nc, ida, cfg_a, idb)
                finally:
                    await nc.close()
            wait_until(lambda: "Authentication Failure" in (tmp_path / "a-serve.log").read_text(errors="replace")
                       or "authentication error" in (a.data / "run" / "nats.log").read_text(errors="replace"),
                       30, what=f"{name}'s leaf link to be refused")
            seen = asyncio.run(from_stranger())
            assert all(s.endswith(("NoRespondersError", "TimeoutError")) for s in seen), seen
        finally:
            stop(proc)

    # 3. the registered spoke B, using its own broker (every right there) through its leaf link
    async def from_peer(src, target_id, cfg, peer_id):
        # replies under the peer-facing inbox, as its requests to other sites use (odst.bus.peer_request):
        # the target's answers come back, so a granted request would be seen
        nc = await site_nats(src.data, inbox_prefix=authz.inbox_prefix(peer_id))
        try:
            return await attack(nc, target_id, cfg, peer_id)
        finally:
            await nc.close()
    seen = asyncio.run(from_peer(b, ida, cfg_a, idb))
    assert not granted(seen), "\n".join(granted(seen))
    # ... and the hub A the same way towards the spoke
    seen = asyncio.run(from_peer(a, idb, cfg_b, ida))
    assert not granted(seen), "\n".join(granted(seen))

    # afterwards: both logs and both mirrors hold every event; nothing landed internally
    after_a, after_b = settle(a, b)
    assert_nothing_lost(before_a, after_a, "A")
    assert_nothing_lost(before_b, after_b, "B")
    for site, who in ((a, "A"), (b, "B")):
        assert_internal_untouched(site, who)
        assert httpx.get(f"{site.url}/healthz", timeout=5).status_code == 200, who
        with site.client() as c:
            assert c.get("/api/v1/quarantine").json()["count"] == 0, f"{who}: junk reached the log"
    # replication still works, both ways
    upload(a, "after.pkg", write_random(tmp_path / "after.pkg", MiB + 5, seed=2))
    upload(b, "back.pkg", write_random(tmp_path / "back.pkg", MiB + 7, seed=3))
    wait_until(lambda: available_at(b, "after.pkg", idb), 90, what="after.pkg at B")
    wait_until(lambda: available_at(a, "back.pkg", ida), 90, what="back.pkg at A")
    for site in (a, b):
        site.stop()
        audit_clean(site)


def test_a_hostile_hub_cannot_erase_or_corrupt_a_spoke_that_dialled_it(make_site, tmp_path):
    """The spoke cannot trust the permissions a hub announces: its own deny lists hold."""
    hub_leaf, hub_port = free_port(), free_port()
    # the hub's own config gives every leaf every right (no authorization at all)
    hub = start_nats(tmp_path, "evilhub", f'server_name: "evilhub"\nlisten: "127.0.0.1:{hub_port}"\n'
                                          f'max_payload: 8MB\njetstream {{ store_dir: "{tmp_path / "evilhub"}", '
                                          f'domain: "evilhub" }}\nleafnodes {{ listen: "127.0.0.1:{hub_leaf}" }}\n')
    try:
        s = make_site("spoke", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{hub_leaf}"]).start()
        sid = site_id(s)
        upload(s, "keep.pkg", write_random(tmp_path / "keep.pkg", MiB + 3, seed=4))
        wait_until(lambda: "Leafnode connection created" in (s.data / "run" / "nats.log").read_text(errors="replace"),
                   30, what="the spoke's leaf link to the hostile hub")
        before = streams(s)
        cfg = asyncio.run(events_config(s))

        async def from_hub():
            nc = await nats.connect(f"nats://127.0.0.1:{hub_port}", connect_timeout=5)
            try:
                # a mirror of the spoke's log is all it may take (reading is what peers do)
                reply = await attempt(nc, f"$JS.{sid}.API.STREAM.INFO.EVENTS")
                assert '"config"' in reply, reply
                return await attack(nc, sid, cfg, "nobody")
            finally:
                await nc.close()
        seen = asyncio.run(from_hub())
        assert not granted(seen), "\n".join(granted(seen))
        after = streams(s)
        assert_nothing_lost(before, after, "spoke")
        assert after["EVENTS"][2] == before["EVENTS"][2], "the hub wrote into the spoke's log"
        assert_internal_untouched(s, "spoke")
        assert httpx.get(f"{s.url}/healthz", timeout=5).status_code == 200
        s.stop()
        audit_clean(s)
    finally:
        stop(hub)
