"""A peer's mirror of our log is evidence: when the peer's own log is destroyed, ODST keeps the
mirror, says so loudly, and the mirror is what brings the peer back."""

from __future__ import annotations

import asyncio
import json
import re

import httpx

from tests.conftest import free_port, run_odst, site_nats, wait_until, write_random
from tests.system.test_notifications import receiver, subscribe  # noqa: F401  (receiver: a fixture)
from tests.system.test_replication import available_at, register, site_id, upload

MiB = 1 << 20


async def _stream_state(data, stream: str):
    nc = await site_nats(data)
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.state.messages, info.state.last_seq
    finally:
        await nc.close()


def stream_state(site, stream: str) -> tuple[int, int]:
    return asyncio.run(_stream_state(site.data, stream))


async def _delete_events(data) -> None:
    """What the open NATS port allowed anyone to do; here B's own insider (or disk) does it."""
    nc = await site_nats(data)
    try:
        await nc.jetstream().delete_stream("EVENTS")
    finally:
        await nc.close()


def health(site) -> tuple[int, str]:
    r = httpx.get(f"{site.url}/healthz", timeout=5)
    return r.status_code, r.json().get("reason", "")


def events_of(site, type_: str) -> list[dict]:
    with site.client() as c:
        r = c.get("/api/v1/events", params={"type": type_, "limit": 100})
        assert r.status_code == 200, r.text
        return r.json()["events"]


def diverged_metric(site, peer: str) -> float | None:
    with site.client() as c:
        text = c.get("/metrics").text
    m = re.search(rf'^odst_peer_log_diverged{{peer="{peer}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


def test_a_peer_whose_log_is_destroyed_keeps_its_mirror_here_and_comes_back_from_it(make_site, tmp_path,
                                                                                     receiver):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    register(a, b)
    a_id, b_id = site_id(a), site_id(b)
    upload(b, "FromB.pkg", write_random(tmp_path / "b.pkg", 2 * MiB + 1, seed=21))
    wait_until(lambda: available_at(a, "FromB.pkg", a_id), 60, what="FromB.pkg at A")
    b_len = stream_state(b, "EVENTS")[1]
    wait_until(lambda: stream_state(a, f"PEER_{b_id}")[1] == b_len, 60, what="A's mirror of B to catch up")
    with a.client() as c:
        subscribe(c, receiver.url(), ["PeerLogDiverged", "PeerLogRestored"])
    assert diverged_metric(a, b_id) == 0

    asyncio.run(_delete_events(b.data))

    # A: the mirror stays whole, the divergence is a signed event in A's own log, healthz says why
    wait_until(lambda: health(a)[0] == 503, 60, what="A to notice that B's log is gone")
    assert "has no event log" in health(a)[1] and b_id in health(a)[1], health(a)
    assert stream_state(a, f"PEER_{b_id}") == (b_len, b_len)
    (diverged,) = events_of(a, "PeerLogDiverged")
    assert diverged["envelope"]["event"]["site"] == b_id
    assert diverged["envelope"]["event"]["mirror_last_seq"] == b_len
    assert diverged["origin"] == a_id and diverged["actor"] == "system"
    assert diverged_metric(a, b_id) == 1
    hooked = wait_until(lambda: receiver.got(ok=True), 30, what="the PeerLogDiverged webhook")
    assert json.loads(hooked[0]["body"])["envelope"]["event"]["site"] == b_id

    # B comes back from A's mirror: stopped, recovered, restarted
    b.stop()
    out = run_odst("recover", "--data", str(b.data), "--from", a.url, "--force")
    assert out.returncode == 0, out.stdout + out.stderr
    b.start()
    assert stream_state(b, "EVENTS")[1] >= b_len

    # A sees B's log whole again: PeerLogRestored, healthy, and the mirror goes on
    wait_until(lambda: health(a)[0] == 200, 90, what="A to see B's log whole again")
    assert [e["envelope"]["event"]["site"] for e in events_of(a, "PeerLogRestored")] == [b_id]
    assert diverged_metric(a, b_id) == 0
    wait_until(lambda: len(receiver.got(ok=True)) == 2, 30, what="the PeerLogRestored webhook")
    upload(b, "After.pkg", write_random(tmp_path / "after.pkg", MiB + 3, seed=22))
    wait_until(lambda: available_at(a, "After.pkg", a_id), 60, what="a new upload at B to reach A")
    assert stream_state(a, f"PEER_{b_id}")[0] > b_len
