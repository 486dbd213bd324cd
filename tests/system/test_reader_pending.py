"""A stream reader says how many messages it already holds after the one it hands on
(``StoredMessage.pending``), so the projector folds a burst that arrived together in one
transaction even when the broker's count, taken as each was delivered, said nothing followed
(events appended in one round trip while the projector tails the log). On a real
nats-server."""

from __future__ import annotations

import asyncio

import nats
from nats.js import api

from harness.wait import until
from odst.events.log import _PullReader, read_stream


def test_messages_received_after_the_one_handed_on_count_as_pending(nats_server):
    async def run():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name="BURST", subjects=["odst.a.ev.>"]))
        await js.publish("odst.a.ev.X", b"1")
        reader = _PullReader(js, "BURST", 1)
        await reader.open()
        try:
            first = await reader.next(10)
            seen = [(first.metadata.sequence.stream, first.metadata.num_pending, reader.queued)]
            for i in range(2, 21):  # the burst: stored after the reader's pull was answered
                await js.publish("odst.a.ev.X", b"%d" % i)
            await until(lambda: reader.queued == 19, 10, lambda: f"19 received, {reader.queued} so far")
            for _ in range(19):
                m = await reader.next(10)
                seen.append((m.metadata.sequence.stream, m.metadata.num_pending, reader.queued))
        finally:
            await reader.close()
        await nc.close()
        return seen

    seen = asyncio.run(run())
    assert [s for s, _, _ in seen] == list(range(1, 21))
    assert seen[0][1:] == (0, 0)
    # each one handed on knows the rest of the burst is here, whatever the broker counted
    assert [q for _, _, q in seen[1:]] == list(range(18, -1, -1))


def test_read_stream_reports_the_larger_of_the_two_counts(nats_server):
    async def run():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.add_stream(api.StreamConfig(name="CATCH", subjects=["odst.b.ev.>"]))
        for i in range(50):
            await js.publish("odst.b.ev.X", b"%d" % i)
        out = [(m.seq, m.pending) async for m in read_stream(js, "CATCH", 1, until_seq=50, idle_timeout=10)]
        await nc.close()
        return out

    out = asyncio.run(run())
    # a catch-up: the broker's count (what is stored after each) is never understated
    assert [s for s, _ in out] == list(range(1, 51))
    assert all(p >= 50 - s for s, p in out) and out[-1][1] == 0
