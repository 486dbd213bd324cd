"""A live projector on a real nats-server: its folds reach the read model's database file by
the projector's own checkpoint thread (its connection no longer checkpoints inside a COMMIT
on the event loop), and nothing folded is lost when it stops."""

from __future__ import annotations

import asyncio
import sqlite3

from harness.wait import until
from odst.events import catalogue as ev
from odst.events.log import EVENTS_STREAM
from odst.events.signing import SiteKey
from odst.projections.projector import Projector
from tests.conftest import open_log


def folded_in_file(db) -> int:
    """The checkpoint as the database file alone has it (immutable: the WAL is not read)."""
    conn = sqlite3.connect(f"file:{db}?immutable=1", uri=True)
    try:
        row = conn.execute("SELECT seq FROM checkpoints WHERE stream=?", (EVENTS_STREAM,)).fetchone()
        return row[0] if row else 0
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def test_folds_reach_the_database_file_through_the_checkpoint_thread(nats_server, tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    db = tmp_path / "read.sqlite"
    n = 400

    async def run():
        nc, js, log = await open_log(nats_server.url, key)
        projector = Projector(js, db, {key.site_id: key.public_key}, [EVENTS_STREAM])
        projector.start()
        try:
            assert projector.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
            last = await log.append(ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex(), name="hq"),
                                    actor="t")
            for i in range(n):
                last = await log.append(ev.PackageStaged(name=f"p{i}.pkg", stage="test"), actor="t")
            assert await projector.wait_for(EVENTS_STREAM, last.seq, 30)
            # copied into the database file by the thread, while the projector runs on
            await until(lambda: folded_in_file(db) == last.seq, 30, "the folds to be checkpointed")
            applied = projector.conn.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            await projector.stop()
            projector.conn.close()
            await nc.close()
        return last.seq, applied

    last, applied = asyncio.run(run())
    assert applied == n + 1 == last
    assert folded_in_file(db) == last
