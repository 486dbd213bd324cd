"""The event log on a real nats-server: chaining, concurrent writers, forged messages."""

from __future__ import annotations

import asyncio

import nats
import pytest

from odst.events import catalogue as ev
from odst.events import codec
from odst.events import log as log_module
from odst.events.log import AppendFailed, Appended, AppendUnconfirmed, EventLog, read_stream
from odst.events.signing import SiteKey
from tests.conftest import open_log


def staged(i: int) -> ev.PackageStaged:
    return ev.PackageStaged(name=f"p{i}.pkg", stage="test")


async def messages(js, until: int):
    return [m async for m in read_stream(js, "EVENTS", 1, until_seq=until, idle_timeout=10)]


def assert_one_chain(msgs, key):
    prev, seq = codec.GENESIS, 0
    for m in msgs:
        env = codec.open_signed(m.payload, key.public_key)
        assert env.seq == seq + 1 and env.prev == prev, f"chain broken at stream seq {m.seq}"
        prev, seq = codec.chain_hash(m.payload), env.seq
    return seq


async def two_writers(url: str, key: SiteKey):
    """Two connections, each with its own EventLog of one site (as two processes would have),
    the stream made: (nc1, nc2, a, b)."""
    nc1 = await nats.connect(url)
    nc2 = await nats.connect(url)
    a, b = EventLog(nc1.jetstream(), key), EventLog(nc2.jetstream(), key)
    await a.ensure_stream()
    return nc1, nc2, a, b


def test_appends_form_one_chain_even_with_concurrent_writers(nats_server, tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")

    async def run():
        nc1, nc2, a, b = await two_writers(nats_server.url, key)
        # two writers (as two gateway processes would be) racing on the same stream
        await asyncio.gather(*[w.append(staged(i), actor="t") for i in range(40)
                               for w in (a, b)])
        msgs = await messages(nc1.jetstream(), 80)
        await nc1.close()
        await nc2.close()
        return msgs

    msgs = asyncio.run(run())
    assert len(msgs) == 80
    assert assert_one_chain(msgs, key) == 80


def test_batched_appends_form_one_chain_while_another_writer_races(nats_server, tmp_path):
    """append_many publishes a run of chained events before awaiting their acks: a writer that
    gets in between must make the rest of the run be refused and re-chained, never stored
    after the wrong predecessor (a fork the projector would quarantine)."""
    key = SiteKey.load_or_create(tmp_path / "site.key")

    async def run():
        nc1, nc2, a, b = await two_writers(nats_server.url, key)
        batches = [[staged(100 * k + i) for i in range(20)] for k in range(6)]
        results, _ = await asyncio.gather(
            asyncio.gather(*(a.append_many(batch, actor="t") for batch in batches)),
            asyncio.gather(*(b.append(staged(9000 + i), actor="t") for i in range(60))))
        msgs = await messages(nc1.jetstream(), 180)
        await nc1.close()
        await nc2.close()
        return [r for batch in results for r in batch], msgs

    appended, msgs = asyncio.run(run())
    assert all(r.envelope.seq > 0 for r in appended) and len(appended) == 120  # every one Appended
    assert len(msgs) == 180
    assert assert_one_chain(msgs, key) == 180
    names = {codec.open_signed(m.payload, key.public_key).event.name for m in msgs}
    assert names == {f"p{100 * k + i}.pkg" for k in range(6) for i in range(20)} | {
        f"p{9000 + i}.pkg" for i in range(60)}  # each event stored once


def test_a_run_sent_behind_a_run_on_a_stale_head_is_refused_and_rechained_too(nats_server, tmp_path):
    """append_many hands a run to the broker and moves the head on before its acks
    (``on_sent``), so the next run goes out chained behind it. When the first run was chained
    on a stale head (another writer got in), the broker refuses it and the run sent behind it
    alike (never stored after the wrong predecessor); both are re-chained: every event
    Appended, each stored once, one unbroken chain."""
    key = SiteKey.load_or_create(tmp_path / "site.key")

    async def run():
        nc1, nc2, a, b = await two_writers(nats_server.url, key)
        await a.append(staged(0), actor="t")  # a keeps this head
        await b.append(staged(1), actor="t")  # ... which is stale from here on
        behind: list[asyncio.Future] = []

        def sent() -> None:  # the first run is on the connection: the second goes out behind it
            behind.append(asyncio.ensure_future(a.append_many([staged(20 + i) for i in range(4)], actor="t",
                                                              on_sent=lambda: None)))
        first = await a.append_many([staged(10 + i) for i in range(4)], actor="t", on_sent=sent)
        second = await behind[0]
        msgs = await messages(nc1.jetstream(), 10)
        await nc1.close()
        await nc2.close()
        return first + second, dict(a.contention), msgs

    appended, contention, msgs = asyncio.run(run())
    assert all(isinstance(r, Appended) for r in appended), appended
    assert contention["rechained"] == 8  # the second run was chained behind the first, not on a fresh head
    assert len(msgs) == 10 and assert_one_chain(msgs, key) == 10
    names = [codec.open_signed(m.payload, key.public_key).event.name for m in msgs]
    assert sorted(names) == sorted(f"p{i}.pkg" for i in (0, 1, *range(10, 14), *range(20, 24)))


def test_an_event_chained_behind_a_run_never_stored_is_refused_even_when_the_sequence_fits(nats_server, tmp_path):
    """A run is refused (another writer got in) after the head moved on past it; other writers'
    events then fill the stream up to the sequence the head expected. The next event, chained
    onto the run's never-stored last event, names it (Nats-Expected-Last-Msg-Id): the broker
    refuses it, and it is re-chained onto what is really there. One unbroken chain.

    The interleave (the run's refusal not yet seen when the next event goes out, the other
    writer's events landing in between) depends on the event loop's order, so the state it
    leaves is taken as the run left it (on_sent) and put back before the next append."""
    key = SiteKey.load_or_create(tmp_path / "site.key")

    async def run():
        nc1, nc2, a, b = await two_writers(nats_server.url, key)
        await a.append(staged(0), actor="t")
        await b.append(staged(1), actor="t")  # a's head is stale from here on
        left: list = []
        refused = await a.append_many([staged(10), staged(11)], actor="t",
                                      on_sent=lambda: left.append((a._head, a._unacked_id)))
        (_, env_seq, never_stored_hash), never_stored_id = left[0]  # the run's last event, as first sent
        other = await b.append(staged(2), actor="t")
        # as if other writers' events had made the stream as long as the run would have
        a._head, a._unacked_id = (other.seq, env_seq, never_stored_hash), never_stored_id
        landed = await a.append(staged(3), actor="t")
        msgs = await messages(nc1.jetstream(), 6)
        await nc1.close()
        await nc2.close()
        return refused, landed, msgs

    refused, landed, msgs = asyncio.run(run())
    assert all(isinstance(r, Appended) for r in refused)  # re-chained one by one after their refusal
    assert isinstance(landed, Appended) and landed.seq == 6
    assert len(msgs) == 6 and assert_one_chain(msgs, key) == 6


class LostAnswers:
    """A JetStream context whose next publishes reach the broker (``sent``) or not, but whose
    answers never come back: the caller sees a timeout, as when a broker stalls or a cluster
    loses its leader mid-publish."""

    def __init__(self, js, lose: int, sent: bool):
        self._js, self.lose, self.sent = js, lose, sent

    def __getattr__(self, name):
        return getattr(self._js, name)

    async def publish(self, *args, **kw):
        if self.lose <= 0:
            return await self._js.publish(*args, **kw)
        self.lose -= 1
        if self.sent:
            await self._js.publish(*args, **kw)
        raise nats.errors.TimeoutError


def test_an_event_whose_answer_is_lost_is_settled_by_reading_its_place(nats_server, tmp_path, monkeypatch):
    """A publish with no answer is not taken for a failure: the log reads the place the event
    was chained to take. Its own event there: Appended (the caller's file stays, its 201
    given). Another writer's there: not stored (AppendFailed: undo is safe). Nothing there
    after the settle time: AppendUnconfirmed (kept as if stored)."""
    monkeypatch.setattr(log_module, "SETTLE_S", 1.0)
    key = SiteKey.load_or_create(tmp_path / "site.key")

    async def run():
        nc1, nc2, a, b = await two_writers(nats_server.url, key)
        await a.append(staged(0), actor="t")
        a.js = LostAnswers(a.js, lose=1, sent=True)
        stored = await a.append(staged(1), actor="t")  # stored, its answer lost
        a.js = LostAnswers(a.js._js, lose=1, sent=False)
        await b.append(staged(2), actor="t")  # b's head is stale: it re-reads; a's is not
        with pytest.raises(AppendFailed) as taken:  # a's event was never sent; b's holds its place
            await a.append(staged(3), actor="t")
        a.js = LostAnswers(a.js._js, lose=1, sent=False)
        with pytest.raises(AppendUnconfirmed):  # never sent, nothing took its place
            await a.append(staged(4), actor="t")
        a.js = LostAnswers(a.js._js, lose=3, sent=False)
        settles = []
        settle = a._settle
        a._settle = lambda *args: settles.append(args[0]) or settle(*args)
        lost_run = await a.append_many([staged(40), staged(41), staged(42)], actor="t")
        a._settle = settle
        a.js = a.js._js
        after = await a.append(staged(5), actor="t")
        many = await a.append_many([staged(6), staged(7)], actor="t")
        msgs = await messages(nc1.jetstream(), 5)
        await nc1.close()
        await nc2.close()
        return stored, taken.value, after, many, msgs, lost_run, settles

    stored, taken, after, many, msgs, lost_run, settles = asyncio.run(run())
    # a run none of which is there is waited for once: the others could only follow the first
    assert all(isinstance(r, AppendUnconfirmed) for r in lost_run) and settles == [4]
    assert isinstance(stored, Appended) and stored.seq == 2
    assert not isinstance(taken, AppendUnconfirmed) and "holds another" in str(taken)
    assert after.seq == 4 and [m.seq for m in many] == [5, 6]
    assert assert_one_chain(msgs, key) == 5
    names = [codec.open_signed(m.payload, key.public_key).event.name for m in msgs]
    assert names == ["p0.pkg", "p1.pkg", "p2.pkg", "p5.pkg", "p6.pkg"]


def test_a_forged_message_in_the_stream_is_never_chained_onto(nats_server, tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    mallory = SiteKey.load_or_create(tmp_path / "mallory.key")

    async def run():
        nc, js, log = await open_log(nats_server.url, key)
        first = await log.append(staged(1), actor="t")
        forged = codec.Envelope(id=codec.new_event_id(), origin=key.site_id, seq=2,
                                prev=codec.chain_hash(first.payload), ts=codec.now_ms(), actor="x",
                                event=staged(99))
        await js.publish(f"odst.{key.site_id}.ev.PackageStaged", codec.seal(forged, mallory))
        fresh = EventLog(js, key)  # a restarted writer reads the head from the broker
        second = await fresh.append(staged(2), actor="t")
        await nc.close()
        return first, second

    first, second = asyncio.run(run())
    assert second.seq == 3  # stream position after the forged message
    assert second.envelope.seq == 2
    assert second.envelope.prev == codec.chain_hash(first.payload)


def test_stream_refuses_deletes(nats_server, tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")

    async def run():
        nc, js, log = await open_log(nats_server.url, key)
        await log.append(staged(1), actor="t")
        try:
            with pytest.raises(Exception):
                await js.delete_msg("EVENTS", 1)
            with pytest.raises(Exception):
                await js.purge_stream("EVENTS")
            info = await js.stream_info("EVENTS")
            return info.state.messages
        finally:
            await nc.close()

    assert asyncio.run(run()) == 1


def test_a_first_start_asks_again_until_the_broker_takes_the_founding_event(nats_server, tmp_path):
    """A cluster just formed answers no append until its stream has a leader: the site's first
    event is sent again, once the head says the log is still empty, not given up on at once
    (fresh-clone CI: a cluster site exited with 1). Here the stream only comes a moment later."""
    from odst.bootstrap import _found

    async def run():
        nc = await nats.connect(nats_server.url)
        try:
            key = SiteKey.load_or_create(tmp_path / "site.key")
            events = EventLog(nc.jetstream(), key)
            founded = ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex())
            with pytest.raises(AppendFailed):  # no stream yet: nothing takes it
                await events.append(founded, actor="system")
            later = asyncio.get_running_loop().call_later(1.5, lambda: asyncio.ensure_future(events.ensure_stream()))
            await asyncio.wait_for(_found(events, founded), 60)
            later.cancel()
            await _found(events, founded)  # founded already: nothing more
            return [m for m in await read_all(nc.jetstream())]
        finally:
            await nc.close()

    async def read_all(js):
        info = await js.stream_info("EVENTS")
        return [await js.get_msg("EVENTS", seq) for seq in range(1, info.state.last_seq + 1)]

    stored = asyncio.run(run())
    assert len(stored) == 1 and b'"SiteFounded"' in stored[0].data


def test_a_founding_try_stored_after_it_went_unanswered_is_not_founded_twice(nats_server, tmp_path, monkeypatch):
    """The broker takes the first try of SiteFounded but answers nothing, and stores it only
    after the next try has read an empty head (a leader lost mid-publish): that next try
    carries the same event id, so the broker answers it as a duplicate. (With a new id each
    try, append re-chained onto the late one and the log held two SiteFounded.)"""
    from odst.bootstrap import _found
    monkeypatch.setattr(log_module, "SETTLE_S", 0.3)  # how long an unanswered append is looked for (10 s)

    async def run():
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            key = SiteKey.load_or_create(tmp_path / "site.key")
            events = EventLog(js, key)
            await events.ensure_stream()
            real, held, calls = js.publish, [], [0]

            async def publish(*args, **kw):
                calls[0] += 1
                if calls[0] == 1:  # proposed, not answered
                    held.append((args, kw))
                    raise nats.errors.TimeoutError
                if held:  # ... and stored just after the head was read again
                    late_args, late_kw = held.pop()
                    await real(*late_args, **late_kw)
                return await real(*args, **kw)

            js.publish = publish
            await asyncio.wait_for(_found(events, ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex())), 60)
            info = await js.stream_info("EVENTS")
            return calls[0], [await js.get_msg("EVENTS", seq) for seq in range(1, info.state.last_seq + 1)]
        finally:
            await nc.close()

    tries, stored = asyncio.run(run())
    assert tries >= 2  # the late store did happen before a second try
    assert len(stored) == 1 and b'"SiteFounded"' in stored[0].data
