"""Catching up with a big log on a real nats-server: every message, once, in order, however
slow the reader; a chain gap left by a reader that skipped messages heals; a new site folds
a peer's whole log with nothing quarantined."""

from __future__ import annotations

import asyncio
import sqlite3

import nats
from nats.js import api

from harness.network import Network
from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import EventLog, read_stream
from odst.events.signing import SiteKey
from odst.projections.apply import ReadModelWriter
from odst.projections.db import open_read_model
from odst.projections.projector import Projector
from harness.wait import until
from tests.conftest import ADMIN_TOKEN, open_log, site_nats, wait_until


async def fill(js, stream: str, subject: str, n: int, **config) -> None:
    await js.add_stream(api.StreamConfig(name=stream, subjects=[subject.rsplit(".", 1)[0] + ".>"], **config))
    for start in range(0, n, 2000):
        acks = [await js.publish_async(subject, b"%d" % i) for i in range(start, min(n, start + 2000))]
        await asyncio.gather(*acks)


def test_a_slow_reader_gets_every_message_of_a_big_stream_once_in_order(nats_server):
    """The 4,096-message client buffer of the old push reader dropped the rest of a big stream
    when its caller yielded to the event loop between messages (as the projector does)."""
    n = 20_000

    async def run():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await fill(js, "BIG", "odst.a.ev.X", n)
        seqs = []
        async for m in read_stream(js, "BIG", 1, until_seq=n, idle_timeout=30):
            seqs.append(m.seq)
            for _ in range(3):  # a slow fold that lets the network run meanwhile
                await asyncio.sleep(0)
        # the reader asked the broker to remove its consumer when it finished (TimedOut fails the test)
        await until(lambda: _none_left(js, "BIG"), 10, "the reader's consumer to be removed")
        await nc.close()
        return seqs

    seqs = asyncio.run(run())
    assert seqs == list(range(1, n + 1))


def test_a_reader_whose_consumer_is_deleted_carries_on_after_its_last_message(nats_server):
    async def run():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await fill(js, "GONE", "odst.a.ev.X", 3000)
        seqs = []
        async for m in read_stream(js, "GONE", 1, until_seq=3000, idle_timeout=30):
            seqs.append(m.seq)
            if m.seq in (700, 2100):  # mid-batch: the broker forgets the reader's consumer
                for c in await js.consumers_info("GONE"):
                    await js.delete_consumer("GONE", c.name)
        await nc.close()
        return seqs

    assert asyncio.run(run()) == list(range(1, 3001))


def test_tailing_a_stream_that_starts_after_seq_1_yields_old_and_live_messages(nats_server):
    """A mirror keeps its origin's numbers, and a stream may start after seq 1 (first_seq)."""
    async def run():
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await fill(js, "LATE", "odst.a.ev.X", 10, first_seq=500)
        seqs = []

        async def tail():
            async for m in read_stream(js, "LATE", 1):
                seqs.append(m.seq)
                if len(seqs) == 13:
                    return
        task = asyncio.create_task(tail())
        await until(lambda: len(seqs) == 10, 30, "10 messages")
        for _ in range(3):  # live events reach the tail without waiting out a poll
            await js.publish("odst.a.ev.X", b"live")
        await asyncio.wait_for(task, 10)
        await nc.close()
        return seqs

    assert asyncio.run(run()) == list(range(500, 513))




async def consumers(js, stream: str) -> list[str]:
    return [c.name for c in await js.consumers_info(stream)]


async def _none_left(js, stream: str) -> bool:
    return await consumers(js, stream) == []


def staged(i: int) -> ev.PackageStaged:
    return ev.PackageStaged(name=f"p{i}.pkg", stage="test")


def chain_of(conn: sqlite3.Connection, site: str) -> int:
    row = conn.execute("SELECT last_seq FROM sites WHERE site=?", (site,)).fetchone()
    return row[0] if row else 0


def test_the_projector_heals_gaps_a_skipping_reader_left_and_keeps_true_ones(nats_server, tmp_path):
    """A read model damaged by the old reader: stream seqs 21-40 never folded, so 41-60 were
    quarantined as chain gaps with the checkpoint past them. The projector folds them again."""
    key = SiteKey.load_or_create(tmp_path / "site.key")
    db = tmp_path / "read-model.sqlite"

    async def run():
        nc, js, log = await open_log(nats_server.url, key)
        await log.append(ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex(), name="hq"),
                         actor="t")
        for i in range(2, 61):
            await log.append(staged(i), actor="t")
        damaged = ReadModelWriter(open_read_model(db), {key.site_id: key.public_key})
        async for m in read_stream(js, "EVENTS", 1, until_seq=60, idle_timeout=30):
            if not 21 <= m.seq <= 40:
                damaged.fold(m)
        gaps = damaged.conn.execute("SELECT count(*) FROM quarantine WHERE reason LIKE 'gap in %'").fetchone()[0]
        damaged.conn.close()

        projector = Projector(js, db, {key.site_id: key.public_key}, ["EVENTS"])
        projector.start()
        conn = projector.conn
        await until(lambda: chain_of(conn, key.site_id) == 60, 30, "the chain to reach 60")
        healed = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
        applied = conn.execute("SELECT count(*) FROM events").fetchone()[0]

        # A true gap: signed by the site, but seq 62 follows 60 and nothing in the stream fills
        # it. It stays quarantined, the projector moves on (no endless re-reading).
        head = await log.head()
        forged = codec.Envelope(id=codec.new_event_id(), origin=key.site_id, seq=62, prev=head[2],
                                ts=codec.now_ms(), actor="t", event=staged(62))
        await js.publish(f"odst.{key.site_id}.ev.PackageStaged", codec.seal(forged, key), stream="EVENTS")
        await until(lambda: projector.checkpoint("EVENTS") == 61, 30, "the checkpoint to reach 61")
        true_gap = conn.execute("SELECT stream_seq, reason FROM quarantine").fetchall()
        rewound = set(projector._rewound)
        await projector.stop()
        await nc.close()
        return gaps, healed, applied, true_gap, rewound

    gaps, healed, applied, true_gap, rewound = asyncio.run(run())
    assert gaps == 20  # the damage as the old reader left it
    assert healed == 0 and applied == 60
    assert [seq for seq, _ in true_gap] == [61] and "expected seq 61, got 62" in true_gap[0][1]
    assert rewound == {("EVENTS", 41)}  # the filled gap once; the true one never


def test_a_new_site_folds_a_peers_log_of_thousands_with_nothing_quarantined(tmp_path):
    n = 3000
    net = Network(tmp_path / "net", title="catch-up", admin_token=ADMIN_TOKEN)
    try:
        hq = net.add("hq", listen=True, env={"ODST_LOG_LEVEL": "warning"})
        net.start(hq)

        async def append_many() -> int:
            nc = await site_nats(hq.data)
            log = EventLog(nc.jetstream(), SiteKey.load_or_create(hq.data / "site.key"))
            last = None
            for i in range(n):  # straight into hq's log, as hq itself: thousands in seconds
                last = await log.append(staged(i), actor="test")
            await nc.close()
            return last.envelope.seq

        last = asyncio.run(append_many())
        hq_id = SiteKey.load_or_create(hq.data / "site.key").site_id
        branch = net.add("branch", dial=["hq"], env={"ODST_LOG_LEVEL": "warning"})
        net.start(branch)
        net.register("hq", branch)
        conn = sqlite3.connect(branch.data / "read-model.sqlite")
        wait_until(lambda: chain_of(conn, hq_id) >= last, 90,
                   what=f"branch to fold hq's {last} events")
        with branch.client() as c:
            r = c.get("/api/v1/quarantine")
        assert r.status_code == 200 and r.json()["count"] == 0, r.text
        conn.close()
    finally:
        net.close()
