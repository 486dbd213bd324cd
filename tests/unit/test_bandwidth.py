"""Bandwidth (issue 14): the bucket, the timetable, parsing, the read side, the download gate.

No processes and no wall clock: time is passed in, the read model is a real SQLite file
folded from signed events, the gate is driven as the ASGI app it is.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest
from hypothesis import given, settings, strategies as st

from harness.wait import until
from odst.events import catalogue as ev
from odst.events.signing import SiteKey
from odst.gateway.bandwidth import LinkLimits, link_event
from odst.gateway.egress import RETRY_AFTER_S, DownloadGate
from odst.projections import apply, db
from odst.replicator import bandwidth as bw
from odst.replicator.puller import Puller
from odst.replicator.transport import SourceThrottled
from tests.sources import MemorySource
from tests.unit.test_projection import Log
from tests.unit.test_puller import want_for

MIB = 1 << 20
MONDAY = datetime(2026, 11, 30)  # a Monday


# ---------------------------------------------------------------- the bucket

@settings(max_examples=200, deadline=None)
@given(rate=st.integers(100_000, 50_000_000), burst=st.integers(0, 8 * MIB),
       sizes=st.lists(st.integers(1, 2 * MIB), min_size=1, max_size=200))
def test_a_bucket_never_lets_more_than_burst_plus_rate_times_time(rate, burst, sizes):
    """Takers that wait as told: by any moment t, at most burst + rate * t + one taker's bytes
    went (the debt rule lets one taker over a too-small burst)."""
    b = bw.TokenBucket(rate, burst, now=0.0)
    now, sent = 0.0, 0
    for n in sizes:
        now += b.delay(n, now)
        b.take(n, now)
        sent += n
        assert sent <= max(burst, bw.MIN_BURST) + rate * now + max(sizes)
    # and the long run holds the rate: the time is at least what the bytes beyond the burst need
    assert now >= (sent - max(burst, bw.MIN_BURST) - max(sizes)) / rate


def test_a_taker_that_does_not_wait_goes_into_debt_and_the_next_waits_for_it():
    b = bw.TokenBucket(1_000_000, MIB, now=0.0)
    assert b.delay(MIB, 0.0) == 0
    b.take(MIB, 0.0)
    b.take(MIB, 0.0)  # the server's way: reserve now, send after the delay it was told
    assert b.delay(MIB, 0.0) == pytest.approx(2 * MIB / 1_000_000)


def test_a_smaller_rate_applies_at_once_and_keeps_no_more_credit_than_the_new_burst():
    b = bw.TokenBucket(50_000_000, 8 * MIB, now=0.0)
    b.configure(1_000_000, MIB)
    assert b.tokens <= MIB
    b.take(MIB, 0.0)
    assert b.delay(MIB, 0.0) == pytest.approx(MIB / 1_000_000)


# ---------------------------------------------------------------- the timetable

def test_a_window_covers_its_days_and_hours_in_local_time():
    w = bw.parse_window("mon-fri 08:00-18:00 2MB")
    assert w.limit == 2_000_000 and not w.paused
    assert w.covers(MONDAY.weekday(), 8 * 60) and w.covers(4, 17 * 60 + 59)
    assert not w.covers(0, 18 * 60) and not w.covers(0, 7 * 60 + 59) and not w.covers(5, 12 * 60)


def test_a_window_past_midnight_covers_the_next_morning():
    w = bw.parse_window({"days": "fri", "start": "22:00", "end": "06:00", "limit": "paused"})
    assert w.paused
    assert w.covers(4, 23 * 60) and w.covers(5, 5 * 60 + 59)  # Friday night, Saturday morning
    assert not w.covers(5, 23 * 60) and not w.covers(4, 5 * 60)


def test_whole_days_and_every_day():
    assert bw.parse_window("daily 00:00-24:00 paused").covers(6, 23 * 60 + 59)
    assert bw.parse_window("sun 00:00-00:00 1MB").covers(6, 0)
    assert bw.parse_days("sat-mon") == frozenset({5, 6, 0})


def test_the_first_window_in_force_replaces_the_link_rates_else_the_rates_hold():
    policy = bw.LinkPolicy(send=5_000_000, receive=20_000_000, windows=(
        bw.parse_window("mon-fri 08:00-18:00 2MB"), bw.parse_window("daily 00:00-24:00 paused")))
    work = MONDAY.replace(hour=9)
    night = MONDAY.replace(hour=20)
    assert bw.limit_in_force(policy, "receive", work) == bw.Limit(2_000_000, False, "limited", policy.windows[0])
    assert bw.limit_in_force(policy, "send", night).paused
    open_policy = bw.LinkPolicy(send=5_000_000, receive=0)
    assert bw.limit_in_force(open_policy, "send", night).rate == 5_000_000
    assert bw.limit_in_force(open_policy, "receive", night).unlimited


@pytest.mark.parametrize("text, expected", [("20MB", 20_000_000), ("2MiB", 2 * MIB), ("500k", 500_000),
                                            ("1.5mb/s", 1_500_000), ("off", 0), ("0", 0), (1234, 1234)])
def test_rates_parse(text, expected):
    assert bw.parse_rate(text) == expected


@pytest.mark.parametrize("bad", ["fast", "-3", "20 parsecs", -1, 10**19, "9999999999G"])
def test_a_bad_rate_is_refused_with_what_to_write(bad):
    with pytest.raises(bw.BandwidthInvalid, match="bytes per second"):
        bw.parse_rate(bad)


@pytest.mark.parametrize("bad", ["mon 8-18 1MB", "funday 08:00-09:00 1MB", "mon 25:00-26:00 1MB",
                                 "mon 08:00-08:00 1MB", {"days": "mon", "start": "08:00"},
                                 {"days": "mon", "start": "08:00", "end": "09:00", "color": "red"}])
def test_a_bad_window_is_refused(bad):
    with pytest.raises(bw.BandwidthInvalid):
        bw.parse_window(bad)


def test_local_networks():
    cidrs = bw.parse_cidrs(["10.0.0.0/8", "192.168.1.7/24"])
    assert cidrs == ["10.0.0.0/8", "192.168.1.0/24"]
    assert bw.host_is_local("10.1.2.3", cidrs) and not bw.host_is_local("8.8.8.8", cidrs)
    assert not bw.host_is_local("branch.example.org", cidrs)  # a name is not guessed at
    with pytest.raises(bw.BandwidthInvalid):
        bw.parse_cidrs(["10.0.0.0/33"])


# ---------------------------------------------------------------- the read side

def fold(tmp_path, events, db_name="m.sqlite"):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    other = SiteKey.load_or_create(tmp_path / "other.key")
    log = Log(key, key)
    log.append(ev.PeerRegistered(site=other.site_id, public_key=other.public_key.hex(), name="branch",
                                 http_url="http://203.0.113.9:8080"))
    for e in events:
        log.append(e)
    conn = db.open_read_model(tmp_path / db_name)
    writer = apply.ReadModelWriter(conn, {key.site_id: key.public_key})
    for m in log.msgs:
        assert writer.fold(m).applied
    return key.site_id, other.site_id, conn


def test_choices_come_from_the_events_and_a_clear_falls_back_to_the_default(tmp_path):
    peer = SiteKey.load_or_create(tmp_path / "other.key").site_id
    me, peer, conn = fold(tmp_path, [
        link_event("*", LinkLimits(receive="1MB")),
        link_event(peer, LinkLimits(receive="20MB", windows=["daily 00:00-24:00 paused"], local="no")),
        ev.LinkBandwidthCleared(link=peer),
        ev.DownloadCapsSet(max_concurrent=50, per_client=2, egress_bps=10),
        ev.PackageUrgencySet(name="hotfix.pkg", urgent=True, reason="CVE"),
    ])
    clock = [0.0]
    b = bw.Bandwidth(site_id=me, reader=conn, clock=lambda: clock[0], wall=lambda: MONDAY.replace(hour=12))
    assert b.policy(peer).source == "default" and b.limit(peer, "receive").rate == 1_000_000
    assert b.download_caps() == bw.DownloadCaps(10, 50, 2)
    assert b.urgent(name="hotfix.pkg") and not b.urgent(name="other.pkg")
    assert conn.execute("SELECT marked_by FROM urgent_packages").fetchone()[0] == "t"  # the envelope's actor


def test_a_peer_on_a_local_network_is_exempt_unless_its_link_says_no(tmp_path):
    peer = SiteKey.load_or_create(tmp_path / "other.key").site_id
    me, peer, conn = fold(tmp_path, [
        ev.LocalNetworksSet(exempt=True, cidrs=["203.0.113.0/24"]),
        link_event(peer, LinkLimits(receive="1MB")),
    ])
    b = bw.Bandwidth(site_id=me, reader=conn, wall=lambda: MONDAY)
    assert b.limit(peer, "receive").state == "local"
    conn2 = fold(tmp_path, [
        ev.LocalNetworksSet(exempt=True, cidrs=["203.0.113.0/24"]),
        link_event(peer, LinkLimits(receive="1MB", local="no")),
    ], db_name="m2.sqlite")[2]
    b2 = bw.Bandwidth(site_id=me, reader=conn2, wall=lambda: MONDAY)
    assert b2.limit(peer, "receive").rate == 1_000_000


def test_a_paused_receive_waits_until_urgent_without_taking_tokens(tmp_path):
    """The puller's wait: paused holds it; the package becoming urgent lets it go."""
    peer = SiteKey.load_or_create(tmp_path / "other.key").site_id
    me, peer, conn = fold(tmp_path, [
        link_event(peer, LinkLimits(receive="1MB", windows=["daily 00:00-24:00 paused"], local="no"))])
    b = bw.Bandwidth(site_id=me, reader=conn, wall=lambda: MONDAY)
    urgent = asyncio.Event()
    reasons: list[str] = []

    async def scenario():
        waiter = asyncio.create_task(b.receive(peer, MIB, urgent=urgent.is_set, waiting=reasons.append))
        await until(lambda: reasons, 30, "the receive to say why it waits")
        assert not waiter.done() and b.waiting[(peer, "receive")] == 1
        urgent.set()
        await asyncio.wait_for(waiter, 30)
    asyncio.run(scenario())
    assert "paused" in reasons[0] and reasons[-1] == ""
    assert b.waiting[(peer, "receive")] == 0 and b.meters[(peer, "receive")].total == MIB


def test_the_server_refuses_rather_than_letting_a_paused_or_far_behind_peer_time_out(tmp_path):
    peer = SiteKey.load_or_create(tmp_path / "other.key").site_id
    me, peer, conn = fold(tmp_path, [link_event(peer, LinkLimits(send="1MB", local="no"))])
    clock = [0.0]
    b = bw.Bandwidth(site_id=me, reader=conn, clock=lambda: clock[0], wall=lambda: MONDAY)

    async def scenario():
        await b.send(peer, MIB)  # within the burst: at once
        await b.send(peer, MIB // 2)  # about half a second behind (the fake clock stands still)
        with pytest.raises(bw.LinkThrottled) as exc:
            for _ in range(4):
                await b.send(peer, MIB)
        return exc.value
    refused = asyncio.run(scenario())
    assert refused.retry_after > bw.SERVER_MAX_WAIT_S


# ---------------------------------------------------------------- the download gate

async def asgi_get(app, client="10.0.0.1"):
    sent: list[dict] = []

    async def send(message):
        sent.append(message)
    await app({"type": "http", "method": "GET", "path": "/x", "headers": [], "client": (client, 1234)},
              None, send)
    return sent


def test_the_gate_answers_503_with_retry_after_beyond_its_caps_and_frees_slots():
    caps = bw.DownloadCaps(max_concurrent=2, per_client=1)
    gate = DownloadGate(lambda: caps)
    release = asyncio.Event()

    async def slow(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await release.wait()
        await send({"type": "http.response.body", "body": b"x" * 10})

    app = gate.wrap(slow)

    async def scenario():
        first = asyncio.create_task(asgi_get(app, "10.0.0.1"))
        second = asyncio.create_task(asgi_get(app, "10.0.0.2"))
        await until(lambda: gate.active >= 2, 30, "both downloads to be active")
        over_total = await asgi_get(app, "10.0.0.3")
        release.clear()
        release.set()
        await asyncio.gather(first, second)
        again = await asgi_get(app, "10.0.0.3")
        return over_total, again
    over_total, again = asyncio.run(scenario())
    assert over_total[0]["status"] == 503
    assert (b"retry-after", str(RETRY_AFTER_S).encode()) in over_total[0]["headers"]
    assert again[0]["status"] == 200 and gate.active == 0 and gate.peak == 2 and gate.refused == 1


def test_the_gate_caps_each_client_and_lets_head_through():
    gate = DownloadGate(lambda: bw.DownloadCaps(per_client=1))
    release = asyncio.Event()

    async def slow(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if scope["method"] == "GET":
            await release.wait()
        await send({"type": "http.response.body", "body": b""})

    app = gate.wrap(slow)

    async def scenario():
        first = asyncio.create_task(asgi_get(app, "10.0.0.1"))
        await until(lambda: gate.active >= 1, 30, "the first download to be active")
        same = await asgi_get(app, "10.0.0.1")
        other = asyncio.create_task(asgi_get(app, "10.0.0.2"))
        head: list[dict] = []

        async def send(m):
            head.append(m)
        await app({"type": "http", "method": "HEAD", "headers": [], "client": ("10.0.0.1", 1)}, None, send)
        release.set()
        await asyncio.gather(first, other)
        return same, head
    same, head = asyncio.run(scenario())
    assert same[0]["status"] == 503 and head[0]["status"] == 200


# ---------------------------------------------------------------- the puller's hooks

class ThrottlingSource(MemorySource):
    """Holds every chunk back once (as a paused or busy server does), then serves it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.held: set[int] = set()

    async def fetch(self, blake3: str, index: int) -> bytes:
        if index not in self.held:
            self.held.add(index)
            raise SourceThrottled("held back", 0.01)
        return await super().fetch(blake3, index)


def test_the_puller_pays_the_receive_limit_once_per_chunk_and_waits_out_a_throttling_source(tmp_path):
    import random

    data = random.Random(3).randbytes(10 * 1024 + 5)
    source = ThrottlingSource("sa", data, 1024)
    paid: list[tuple[str, int]] = []

    async def throttle(peer: str, n: int) -> None:
        paid.append((peer, n))

    bad: list[str] = []
    p = Puller(want_for(data), [(source, 0.0)], tmp_path, streams=4, throttle=throttle,
               on_bad_source=lambda site, reason: bad.append(site))
    path = asyncio.run(p.run())
    assert path.read_bytes() == data and not bad  # held back is not the source's fault
    assert len(paid) == 11 and {peer for peer, _ in paid} == {"sa"} and sum(n for _, n in paid) == len(data)
    assert sorted(source.fetched) == list(range(11)) and source.held == set(range(11))


def test_the_clock_entering_and_leaving_a_paused_window_holds_and_releases_a_transfer(tmp_path):
    """A timetable acts by the (site-local) clock alone: no event at 08:00 or 09:00."""
    peer = SiteKey.load_or_create(tmp_path / "other.key").site_id
    me, peer, conn = fold(tmp_path, [
        link_event(peer, LinkLimits(windows=["mon 08:00-09:00 paused"], local="no"))])
    now = [MONDAY.replace(hour=7, minute=59)]
    b = bw.Bandwidth(site_id=me, reader=conn, wall=lambda: now[0])
    reasons: list[str] = []

    async def scenario():
        await b.receive(peer, MIB)  # 07:59: open, unlimited
        now[0] = MONDAY.replace(hour=8)
        waiter = asyncio.create_task(b.receive(peer, MIB, waiting=reasons.append))
        await until(lambda: reasons, 30, "the receive to say why it waits")
        assert not waiter.done() and b.link_status(peer)["receive"]["state"] == "paused"
        now[0] = MONDAY.replace(hour=9)
        await asyncio.wait_for(waiter, 30)
    asyncio.run(scenario())
    assert b.meters[(peer, "receive")].total == 2 * MIB and b.link_status(peer)["receive"]["state"] == "open"


def test_the_timezone_setting_is_checked():
    from odst.config import ConfigError, load

    assert str(bw.site_timezone(load({"timezone": "Europe/Berlin"}, env={}))) == "Europe/Berlin"
    assert bw.site_timezone(load({}, env={})) is None
    with pytest.raises(ConfigError, match="IANA"):
        load({"timezone": "Mars/Olympus_Mons"}, env={})
