"""Recovery from peers: a site that lost its data directory, key file kept, comes back from
its peer's mirror of its log (real processes), and the checks that make a peer's copy safe
to restore (the chain check, pure)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import time

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import subject_for
from odst.events.signing import SiteKey
from odst.recovery import ChainCheck, LogInvalid, MirrorMessage, MirrorPage, mirror_target
from odst.peering.requests import sign_request
from tests.conftest import free_port, run_odst, site_nats, wait_until, write_random
from tests.system.test_accounts import sign_in
from tests.system.test_replication import available_at, register, site_id, upload

MiB = 1 << 20


async def _publish_junk(data, subject: str, payload: bytes) -> int:
    nc = await site_nats(data)
    try:
        return (await nc.jetstream().publish(subject, payload, headers={"X-Junk": "kept"})).seq
    finally:
        await nc.close()


async def _stored(data, seq: int):
    nc = await site_nats(data)
    try:
        return await nc.jetstream().get_msg("EVENTS", seq)
    finally:
        await nc.close()


async def _events_last_seq(data) -> int:
    nc = await site_nats(data)
    try:
        return (await nc.jetstream().stream_info("EVENTS")).state.last_seq
    finally:
        await nc.close()


def events_last_seq(site) -> int:
    return asyncio.run(_events_last_seq(site.data))


def mirror_messages(site, peer_id: str) -> int:
    with site.client() as c:
        peers = c.get("/api/v1/peers").json()["peers"]
    return next(p["link"].get("messages") or 0 for p in peers if p["site"] == peer_id)


def served_sha1(site, name: str) -> str | None:
    r = httpx.get(f"{site.url}/CasperShare/Packages/{name}", timeout=60)
    return hashlib.sha1(r.content).hexdigest() if r.status_code == 200 else None


def wipe_all_but_key(data) -> None:
    for p in data.iterdir():
        if p.name != "site.key":
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def audit(data) -> tuple[int, int, str]:
    out = run_odst("audit", "--data", str(data))
    m = re.search(r"^events\s+(\d+)$", out.stdout, re.M)
    return out.returncode, int(m.group(1)) if m else -1, out.stdout + out.stderr


def test_a_site_that_lost_its_data_directory_is_recovered_from_its_peer(make_site, tmp_path):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b_args = ["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]
    b = make_site("b", extra_args=b_args).start()
    register(a, b)
    a_id, b_id = site_id(a), site_id(b)

    # B's history: a package uploaded there, one pulled from A, a token and a user of its own
    from_b = upload(b, "FromB.pkg", write_random(tmp_path / "b.pkg", 3 * MiB + 7, seed=11))
    from_a = upload(a, "FromA.pkg", write_random(tmp_path / "a.pkg", 2 * MiB + 3, seed=12))
    wait_until(lambda: available_at(b, "FromA.pkg", b_id), 60, what="FromA.pkg at B")
    wait_until(lambda: available_at(a, "FromB.pkg", a_id), 60, what="FromB.pkg at A")
    with b.client() as c:
        r = c.post("/api/v1/tokens", json={"name": "jamf", "role": "auditor"})
        assert r.status_code == 201, r.text
        jamf_token = r.json()["token"]
        r = c.post("/api/v1/users", json={"username": "alice", "password": "correct horse battery",
                                          "role": "operator"})
        assert r.status_code in (200, 201), r.text
    # junk that reached B's log before NATS had authentication: restored as it was, at its place
    junk = b"\0" * 64 + b'{"not":"an event"}'
    junk_seq = asyncio.run(_publish_junk(b.data, f"odst.{b_id}.ev.Junk", junk))
    with b.client() as c:  # one more event after the junk
        assert c.post("/api/v1/tokens", json={"name": "after junk", "role": "auditor"}).status_code == 201
    n = events_last_seq(b)
    wait_until(lambda: mirror_messages(a, b_id) == n, 60, what="A's mirror of B to hold all of B's log")

    # the door: only B, signing with its own key, reads A's mirror of B's log, and only that
    b_key = SiteKey.load_or_create(b.data / "site.key")
    target = mirror_target(1)
    assert httpx.get(a.url + target).status_code == 403  # unsigned
    stranger = SiteKey.load_or_create(tmp_path / "stranger.key")
    assert httpx.get(a.url + target, headers=sign_request(stranger, "GET", target)).status_code == 403
    a_key = SiteKey.load_or_create(a.data / "site.key")  # a site has no mirror of itself to ask for
    assert httpx.get(a.url + target, headers=sign_request(a_key, "GET", target)).status_code == 403
    headers = sign_request(b_key, "GET", target)
    r = httpx.get(a.url + target, headers=headers)
    assert r.status_code == 200, r.text
    page = msgspec.json.decode(r.content, type=MirrorPage)
    assert page.site == b_id and page.served_by == a_id and page.last_seq == n
    assert [m.seq for m in page.messages] == list(range(1, n + 1))
    assert all(m.subject.startswith(f"odst.{b_id}.ev.") for m in page.messages)
    assert httpx.get(a.url + target, headers=headers).status_code == 403  # replayed
    other = sign_request(b_key, "GET", mirror_target(2))
    assert httpx.get(a.url + target, headers=other).status_code == 403  # signed for another page

    # recovery needs the key, and a stopped site
    assert run_odst("recover", "--data", str(tmp_path / "nothing"), "--from", a.url).returncode == 1
    out = run_odst("recover", "--data", str(b.data), "--from", a.url)
    assert out.returncode == 1 and "stop it" in out.stderr, out.stderr

    # B loses everything but its key file
    b.stop()
    wipe_all_but_key(b.data)
    t0 = time.monotonic()
    out = run_odst("recover", "--data", str(b.data), "--from", a.url)
    recover_s = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"log now 1..{n}" in out.stdout and f"message {junk_seq}: not signed" in out.stdout, out.stdout
    print(f"\nrecovered {n} messages in {recover_s:.2f}s (whole command)\n{out.stdout}")
    code, events, text = audit(b.data)
    assert code == 0 and events == n - 1, text  # every message but the junk is one of B's events
    again = run_odst("recover", "--data", str(b.data), "--from", a.url)
    assert again.returncode == 1 and "nothing to recover" in again.stderr, again.stderr

    # B comes back with its identity, tokens and users, and pulls its packages again
    b.start()
    assert site_id(b) == b_id
    with b.client(token=jamf_token) as c:
        assert c.get("/api/v1/packages").status_code == 200
    assert sign_in(b, "alice", "correct horse battery").status_code == 200
    for name, pkg in (("FromB.pkg", from_b), ("FromA.pkg", from_a)):
        wait_until(lambda: served_sha1(b, name) == pkg["sha1"], 90, what=f"{name} served again by B")
        assert hashlib.sha1((b.data / "store" / "packages" / name.lower()).read_bytes()).hexdigest() == pkg["sha1"]
    assert events_last_seq(b) > n  # new events follow the restored ones
    stored = asyncio.run(_stored(b.data, junk_seq))
    assert stored.data == junk and stored.headers.get("X-Junk") == "kept"

    # A's mirror of B simply continued: B's next upload reaches A
    upload(b, "After.pkg", write_random(tmp_path / "after.pkg", MiB + 1, seed=13))
    wait_until(lambda: available_at(a, "After.pkg", a_id), 60, what="an upload at recovered B to reach A")
    wait_until(lambda: mirror_messages(a, b_id) == events_last_seq(b), 60, what="A's mirror of B to catch up")
    for s in (a, b):
        code, _, text = audit(s.data)
        assert code == 0, text


def test_a_log_that_is_not_a_prefix_of_the_peers_copy_is_replaced_only_with_force(make_site):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}"]).start()
    register(a, b)
    b_id = site_id(b)
    n = events_last_seq(b)
    wait_until(lambda: mirror_messages(a, b_id) == n, 60, what="A's mirror of B")
    b.stop()
    wipe_all_but_key(b.data)
    b.extra_args = []  # started by mistake with no link to its peer: a new, different log
    b.start()
    b.stop()
    out = run_odst("recover", "--data", str(b.data), "--from", a.url)
    assert out.returncode == 1 and "--force" in out.stderr, out.stderr
    out = run_odst("recover", "--data", str(b.data), "--from", a.url, "--force")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"log now 1..{n}" in out.stdout and "saved to" in out.stdout, out.stdout
    code, events, text = audit(b.data)
    assert code == 0 and events == n, text


# --- the chain check, pure -------------------------------------------------------------------

def chain(key: SiteKey, n: int) -> list[MirrorMessage]:
    out, prev = [], codec.GENESIS
    for i in range(1, n + 1):
        event = ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex(), name="x") if i == 1 else \
            ev.TokenRevoked(token_id=f"t{i}")
        payload = codec.seal(codec.Envelope(id=codec.new_event_id(), origin=key.site_id, seq=i, prev=prev,
                                            ts=codec.now_ms(), actor="test", event=event), key)
        out.append(MirrorMessage(seq=i, subject=subject_for(key.site_id, event), data=payload))
        prev = codec.chain_hash(payload)
    return out


KEY = SiteKey(__import__("nacl.signing").signing.SigningKey(b"\x01" * 32))
CHAIN = chain(KEY, 8)


def checked(messages: list[MirrorMessage]) -> ChainCheck:
    check = ChainCheck(KEY.site_id, KEY.public_key)
    for m in messages:
        check.add(m)
    check.finish()
    return check


def renumbered(messages: list[MirrorMessage]) -> list[MirrorMessage]:
    """What a peer that hides a change would serve: sequence numbers without a hole."""
    return [msgspec.structs.replace(m, seq=i) for i, m in enumerate(messages, 1)]


def test_an_intact_copy_verifies_and_junk_is_kept_and_reported():
    assert checked(CHAIN).events == 8
    stranger = chain(SiteKey(__import__("nacl.signing").signing.SigningKey(b"\x02" * 32)), 2)
    junk = MirrorMessage(seq=0, subject=CHAIN[3].subject, data=stranger[1].data)
    replay = CHAIN[2]
    check = checked(renumbered(CHAIN[:4] + [junk, replay] + CHAIN[4:]))
    assert check.events == 8 and check.messages == 10
    assert [why for _, why in check.junk] == ["not signed by this site's key", "replayed copy of event 3"]


@settings(max_examples=60, deadline=None)
@given(i=st.integers(0, 6), how=st.sampled_from(["drop", "flip", "swap", "hole"]), byte=st.integers(0, 10_000))
def test_a_copy_with_an_event_dropped_altered_or_reordered_is_refused(i, how, byte):
    """Any change before the last event is caught (the last one could as well be lagging)."""
    msgs = list(CHAIN)
    if how == "drop":
        del msgs[i]
    elif how == "flip":
        data = bytearray(msgs[i].data)
        data[byte % len(data)] ^= 0x40
        msgs[i] = msgspec.structs.replace(msgs[i], data=bytes(data))
    elif how == "swap":
        msgs[i], msgs[i + 1] = msgs[i + 1], msgs[i]
    if how != "hole":
        msgs = renumbered(msgs)
    else:
        del msgs[i]  # a hole in the stream sequence
    with pytest.raises(LogInvalid):
        checked(msgs)


def test_a_copy_of_another_sites_log_is_refused():
    with pytest.raises(LogInvalid, match="not of"):
        checked([msgspec.structs.replace(CHAIN[0], subject="odst.sother.ev.SiteFounded")])
