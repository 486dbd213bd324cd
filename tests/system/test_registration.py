"""Registration that cannot be hijacked: the joiner's request is sealed to the inviting
site, the answer is signed by it and bound to that very request; anyone who sees or
answers the traffic gets nothing. Real sites, real NATS, real HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import httpx
import msgspec
import nacl.exceptions
import nacl.public
import pytest

from odst.events.signing import SiteKey
from odst.peering import registration
from tests.conftest import all_events, free_port, site_nats, wait_until


# --- helpers ---------------------------------------------------------------------------------

def site_id(site) -> str:
    with site.client() as c:
        return c.get("/api/v1/site").json()["site"]


def invite(site) -> str:
    with site.client() as c:
        r = c.post("/api/v1/peers/invites", json={})
        assert r.status_code == 201, r.text
        return r.json()["token"]


def without_address(token: str) -> str:
    """The same invitation with no HTTP address: the joiner can only use NATS."""
    inv = registration.decode_token(token)
    return registration.encode_token(msgspec.structs.replace(inv, http_url=""))


def peer_registered(site, peer: str) -> list[dict]:
    with site.client() as c:
        return [e for e in all_events(c) if e["type"] == "PeerRegistered" and peer in json.dumps(e["envelope"])]


async def join(site, token: str) -> httpx.Response:
    """B's admin runs ``odst peer join`` (async, so the attacker's subscriptions keep running)."""
    async with httpx.AsyncClient(base_url=site.url, timeout=90,
                                 headers={"Authorization": f"Bearer {site.token}"}) as c:
        return await c.post("/api/v1/peers/join", json={"token": token})


async def nats_register(nc, subject: str, body: bytes) -> tuple[str, str, bytes]:
    msg = await nc.request(subject, body, timeout=10)
    h = msg.headers or {}
    return h.get("odst-status", ""), h.get("odst-error", ""), msg.data


def attacker_key(tmp_path) -> SiteKey:
    return SiteKey.load_or_create(tmp_path / "attacker.key")


@pytest.fixture
def linked(make_site):
    """A and B leaf-linked and registered (over HTTP: before registration the link may not
    be trusted); B then joins A's new invitations over NATS."""
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    first = asyncio.run(join(b, invite(a)))
    assert first.status_code == 201, first.text
    return a, b


async def join_until(site, token: str, accept, timeout: float = 120.0) -> httpx.Response:
    """Join again until ``accept(response)`` (the leaf link comes up after registration,
    queue groups pick at random): a deadline, never a sleep."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await join(site, token)
        if accept(r):
            return r
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"join never gave what the test waits for; last: {r.status_code} {r.text}")
        await asyncio.sleep(0.2)  # poll interval, not synchronisation


# --- (1) the genuine joiner succeeds over HTTP and over NATS ---------------------------------

def test_genuine_joiner_registers_over_http(make_site):
    a = make_site("a", extra_args=["--site-name", "A"]).start()
    b = make_site("b", extra_args=["--site-name", "B"]).start()  # not linked: HTTP only
    r = asyncio.run(join(b, invite(a)))
    assert r.status_code == 201, r.text
    assert r.json()["via"] == "http" and r.json()["site"] == site_id(a) and r.json()["name"] == "A"
    a_id, b_id = site_id(a), site_id(b)
    wait_until(lambda: peer_registered(a, b_id), 30, what="A to register B")
    assert peer_registered(b, a_id)


def test_genuine_joiner_registers_over_nats(linked):
    a, b = linked
    token = without_address(invite(a))
    r = asyncio.run(join_until(b, token, lambda r: r.status_code == 201))
    assert r.json()["via"] == "nats" and r.json()["site"] == site_id(a)


# --- (2) the hijack sequence fails ------------------------------------------------------------

def test_the_hijack_sequence_fails(linked, tmp_path):
    """An attacker on the inviter's broker sees B's request (plain subscription and the
    'register' queue group), and A's answer; it can neither read the secret, nor register
    its own key with what it saw, nor replay it, nor make B accept a forged answer."""
    a, b = linked
    a_id, b_id = site_id(a), site_id(b)
    # the leaf link comes up once A trusts B: wait for it with an invitation of its own
    asyncio.run(join_until(b, without_address(invite(a)), lambda r: r.status_code == 201))
    token = invite(a)  # the one under attack: its first use is watched
    inv = registration.decode_token(token)
    evil = attacker_key(tmp_path)
    subject = registration.register_subject(a_id)

    async def run():
        nc = await site_nats(a.data)
        seen, stolen, replay_sent = [], [], []
        answered: set[str] = set()  # reply subjects A answered with 200
        genuine_answer: list[bytes] = []

        async def plain(msg):
            seen.append(msg)
            if msg.reply:  # (d) answer first, with everything an attacker could forge
                forged = [
                    json.dumps({"site": a_id, "public_key": inv.public_key, "name": "A"}).encode(),
                    registration.make_answer(evil, peer=b_id, request_digest="0" * 64),
                    *genuine_answer,  # A's real answer to an earlier request
                ]
                for body in forged:
                    await nc.publish(msg.reply, body)
                replay_sent.append(bool(genuine_answer))

        async def queued(msg):
            stolen.append(msg)  # its queue group gets a copy (A's has a secret name): it answers falsely
            await nc.publish(msg.reply, registration.make_answer(evil, peer=b_id, request_digest="0" * 64))

        async def replies(msg):  # A's answers, as they pass through its broker
            if (msg.headers or {}).get("odst-status") == "200":
                answered.add(msg.subject)
                if not genuine_answer:
                    genuine_answer.append(msg.data)

        subs = [await nc.subscribe(subject, cb=plain), await nc.subscribe(subject, queue="register", cb=queued),
                await nc.subscribe("_INBOX.>", cb=replies)]
        await nc.flush()

        # B joins (only over NATS) until it has registered, the queue-group subscriber has had
        # its copy, and B has been sent A's earlier answer as a replay and judged it (whether a
        # forged answer or A's real one reaches B first is a race: join again until both did)
        token_nats = without_address(token)
        results = []
        deadline = asyncio.get_running_loop().time() + 150

        def b_refused_a_replay() -> bool:
            return "given to another request" in b.log_path.read_text()
        while not (stolen and any(replay_sent) and any(r.status_code == 201 for r in results)
                   and b_refused_a_replay()):
            assert asyncio.get_running_loop().time() < deadline, [r.text for r in results]
            results.append(await join(b, token_nats))
        for sub in subs:
            await sub.unsubscribe()
        ok = [r for r in results if r.status_code == 201]
        assert ok and all(r.json()["via"] == "nats" for r in ok)
        # a join that got no valid answer in time: B refused every answer it got and said so
        for r in results:
            if r.status_code != 201:
                assert r.status_code == 502 and "answer refused" in r.json()["detail"], r.text
        assert seen and stolen

        # (a) the secret cannot be read from what was captured
        for msg in seen + stolen:
            assert inv.invite_secret.encode() not in msg.data and inv.invite_id.encode() not in msg.data
            assert inv.invite_secret not in json.dumps(dict(msg.headers or {}))
            body = json.loads(msg.data)
            assert set(body) == {"v", "sealed"}
            with pytest.raises(nacl.exceptions.CryptoError):  # the attacker's own key opens nothing
                nacl.public.SealedBox(nacl.public.PrivateKey(evil.derive(b"x"))).decrypt(
                    base64.b64decode(body["sealed"]))

        # (b) its own key with what it captured: it has no secret; guesses, the clear form,
        # B's sealed bytes under its own name, a tampered ciphertext: all refused
        captured = seen[-1].data
        guess = msgspec.structs.replace(inv, invite_secret="guessed-" + "x" * 20)
        own, _ = registration.make_request(evil, guess)
        clear = json.dumps({"site": evil.site_id, "public_key": evil.public_key.hex(), "invite_id": inv.invite_id,
                            "secret": "guessed", "name": "evil", "http_url": ""}).encode()
        sealed = bytearray(base64.b64decode(json.loads(captured)["sealed"]))
        sealed[-1] ^= 1
        tampered = json.dumps({"v": 2, "sealed": base64.b64encode(bytes(sealed)).decode()}).encode()
        for body, reason in [(own, "wrong secret"), (clear, "in clear"), (tampered, "not sealed to this site")]:
            status, error, _ = await nats_register(nc, subject, body)
            assert status == "400" and reason in error, (status, error)
            r = httpx.post(f"{a.url}/peer/v1/register", content=body,
                           headers={"x-odst-signature": base64.b64encode(evil.sign_detached(body)).decode()})
            assert r.status_code == 400 and reason in r.json()["detail"], r.text

        # (c) replaying B's captured requests that A answered, over both transports
        replayable = {m.data for m in seen if m.reply in answered}
        assert replayable
        for body in replayable:
            status, error, answer = await nats_register(nc, subject, body)
            assert status == "400" and "replayed" in error, (status, error)
            r = httpx.post(f"{a.url}/peer/v1/register", content=body)
            assert r.status_code == 400 and "replayed" in r.json()["detail"], r.text
        await nc.close()

    asyncio.run(run())
    assert not peer_registered(a, evil.site_id)
    assert not peer_registered(b, evil.site_id)
    # (d) B refused every forged answer, each for its reason, and trusts A's real key only
    log = b.log_path.read_text()
    for reason in ["not a signed registration answer", "not signed by the inviting site's key",
                   "given to another request"]:
        assert reason in log, reason
    with b.client() as cb:
        peers = {p["site"]: p for p in cb.get("/api/v1/peers").json()["peers"]}
    assert set(peers) == {a_id}


def test_a_joiner_accepts_no_answer_but_the_inviters_own_for_its_request(make_site, tmp_path):
    """Only forgers answer (the inviting site X is not there; the test holds X's key):
    B refuses each forged or replayed answer and registers nothing; then X's real answer
    is accepted."""
    b = make_site("b", extra_args=["--site-name", "B"]).start()
    b_id = site_id(b)
    x = SiteKey.load_or_create(tmp_path / "x.key")
    evil = attacker_key(tmp_path)
    inv = registration.Invitation(v=registration.PROTOCOL, site=x.site_id, public_key=x.public_key.hex(),
                                  seal_key=registration.seal_public_key(x).hex(), name="X",
                                  invite_id=os.urandom(8).hex(), invite_secret="s" * 32, expires_ts=int(1e13))
    token = registration.encode_token(inv)
    earlier_req, earlier_digest = registration.make_request(SiteKey.load_or_create(b.data / "site.key"), inv)
    replayed = registration.make_answer(x, peer=b_id, request_digest=earlier_digest, name="X")

    async def run(honest: bool):
        nc = await site_nats(b.data)
        got = []

        async def answer(msg):
            opened = registration.open_request(x, msg.data)  # only X can open it
            got.append(opened.request)
            for body in [b"{}", b"garbage", replayed,
                         registration.make_answer(evil, peer=b_id, request_digest=opened.digest),
                         registration.make_answer(x, peer=evil.site_id, request_digest=opened.digest)]:
                await nc.publish(msg.reply, body)
            if honest:
                await nc.publish(msg.reply, registration.make_answer(x, peer=b_id, request_digest=opened.digest,
                                                                 name="X"))
        await nc.subscribe(registration.register_subject(x.site_id), cb=answer)
        await nc.flush()
        r = await join(b, token)
        await nc.close()
        assert got and all(req.site == b_id and req.secret == inv.invite_secret for req in got)
        return r

    r = asyncio.run(run(honest=False))
    assert r.status_code == 502 and "5 ignored" in r.json()["detail"], r.text
    assert not peer_registered(b, x.site_id)
    r = asyncio.run(run(honest=True))
    assert r.status_code == 201 and r.json()["via"] == "nats" and r.json()["name"] == "X", r.text
    assert peer_registered(b, x.site_id)


def test_invitations_from_older_versions_are_refused_before_anything_is_sent(make_site):
    a = make_site("a").start()
    b = make_site("b").start()
    inv = registration.decode_token(invite(a))
    old = "odst-invite-" + base64.urlsafe_b64encode(json.dumps(
        {"v": 1, "site": inv.site, "public_key": inv.public_key, "name": "", "http_url": a.url,
         "invite_id": inv.invite_id, "secret": inv.invite_secret, "expires_ts": inv.expires_ts}).encode()
    ).decode().rstrip("=")
    r = asyncio.run(join(b, old))
    assert r.status_code == 400 and "older ODST version" in r.json()["detail"], r.text
    assert "registration refused" not in a.log_path.read_text()  # nothing reached A


# --- (3) malformed, oversized, truncated requests: a clear 4xx, never a 500 -------------------

def test_bad_requests_get_a_clear_refusal_on_both_transports(make_site, tmp_path):
    a = make_site("a").start()
    a_id = site_id(a)
    inv = registration.decode_token(invite(a))
    me = SiteKey.load_or_create(tmp_path / "me.key")
    good, _ = registration.make_request(me, inv)
    stale, _ = registration.make_request(me, inv, ts=1_000_000)
    other_site = SiteKey.load_or_create(tmp_path / "other.key")
    to_other, _ = registration.make_request(me, msgspec.structs.replace(
        inv, seal_key=registration.seal_public_key(other_site).hex()))
    junk_inside = json.dumps({"v": 2, "sealed": base64.b64encode(nacl.public.SealedBox(
        nacl.public.PublicKey(bytes.fromhex(inv.seal_key))).encrypt(b"x" * 80)).decode()}).encode()
    cases = [
        (b"", 400), (b"\xff\xfe", 400), (b"null", 400), (b"[]", 400), (b"{}", 400), (b'{"v":2}', 400),
        (b'{"v":3,"sealed":""}', 400), (b'{"v":2,"sealed":12}', 400), (b'{"v":2,"sealed":"!!!"}', 400),
        (b'{"v":2,"sealed":"AAAA"}', 400), (good[: len(good) // 2], 400), (good[:-3] + b'"}', 400),
        (junk_inside, 400), (to_other, 400), (stale, 400),
        (json.dumps({"v": 2, "sealed": "A" * 20000}).encode(), 413), (b"x" * (1 << 20), 413),
    ]

    for body, status in cases:
        r = httpx.post(f"{a.url}/peer/v1/register", content=body, timeout=30)
        assert r.status_code == status, (body[:60], r.status_code, r.text)
        assert r.json()["detail"], r.text

    async def over_nats():
        nc = await site_nats(a.data)
        for body, status in cases:
            got, error, _ = await nats_register(nc, registration.register_subject(a_id), body)
            assert got == str(status) and error, (body[:60], got, error)
        await nc.close()
    asyncio.run(over_nats())
    text = a.log_path.read_text()
    assert "registration failed" not in text and "unhandled error" not in text
    assert "clock" in httpx.post(f"{a.url}/peer/v1/register", content=stale).json()["detail"]
    # the valid request from these tests still works afterwards
    r = httpx.post(f"{a.url}/peer/v1/register", content=good)
    assert r.status_code == 200, r.text


# --- the pure core ---------------------------------------------------------------------------

def test_answers_are_checked_signature_then_binding(tmp_path):
    a, b, evil = (SiteKey.load_or_create(tmp_path / f"{n}.key") for n in "abe")
    inv = registration.Invitation(v=2, site=a.site_id, public_key=a.public_key.hex(),
                             seal_key=registration.seal_public_key(a).hex(), invite_id="0" * 16,
                             invite_secret="s" * 32, expires_ts=0)
    wire, digest = registration.make_request(b, inv)
    opened = registration.open_request(a, wire)
    assert opened.digest == digest and opened.request.secret == inv.invite_secret
    good = registration.make_answer(a, peer=b.site_id, request_digest=digest)
    assert registration.check_answer(inv, b.site_id, digest, good).peer == b.site_id
    _, other_digest = registration.make_request(b, inv)
    for forged, reason in [
        (registration.make_answer(evil, peer=b.site_id, request_digest=digest), "not signed"),
        (registration.make_answer(a, peer=b.site_id, request_digest=other_digest), "another request"),
        (registration.make_answer(a, peer=evil.site_id, request_digest=digest), "another request"),
        (b'{"v":2,"signed":""}', "not signed"), (b"", "not a signed"), (b"x" * 20000, "too large"),
    ]:
        with pytest.raises(registration.AnswerInvalid, match=reason):
            registration.check_answer(inv, b.site_id, digest, forged)
    with pytest.raises(registration.InviteInvalid, match="not sealed"):
        registration.open_request(evil, wire)
