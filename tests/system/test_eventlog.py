"""The event log on a real nats-server: chaining, concurrent writers, forged messages."""

from __future__ import annotations

import asyncio

import nats
import pytest

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import EventLog, read_stream
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


def test_appends_form_one_chain_even_with_concurrent_writers(nats_server, tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")

    async def run():
        nc1 = await nats.connect(nats_server.url)
        nc2 = await nats.connect(nats_server.url)
        a, b = EventLog(nc1.jetstream(), key), EventLog(nc2.jetstream(), key)
        await a.ensure_stream()
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
