"""A stream's folding error stays until that stream folds again: a failing peer mirror is not
hidden by this site's own events, neither from the projector nor from a process that only
reads the read model (ReadModelWatcher: a gateway- or replicator-only process)."""

from __future__ import annotations

import asyncio

from nats.js import api

from odst.events import catalogue as ev
from odst.events.log import EVENTS_STREAM
from odst.events.signing import SiteKey
from odst.projections.projector import Projector
from odst.projections.watcher import ReadModelWatcher
from harness.wait import until
from tests.conftest import open_log

MIRROR = "PEER_GONE"  # a peer's mirror this broker does not hold (deleted, or not made yet)


def test_a_failing_mirror_stays_reported_while_events_fold(nats_server, tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    db = tmp_path / "read.sqlite"

    async def run():
        nc, js, log = await open_log(nats_server.url, key)
        projector = Projector(js, db, {key.site_id: key.public_key}, [EVENTS_STREAM])
        projector.start()
        watcher = ReadModelWatcher(js, db)
        try:
            founded = await log.append(ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex(),
                                                      name="C"), actor="system")
            assert await projector.wait_for(EVENTS_STREAM, founded.seq, 30)
            await watcher.wait_ready(key.site_id, timeout=30, bootstrap_s=0)
            assert projector.error is None and watcher.error is None

            projector.add_stream(MIRROR)
            await until(lambda: watcher.error is not None, 10, "the failing mirror to be reported")
            for i in range(3):  # this site's own events fold meanwhile
                last = await log.append(ev.PackageStaged(name=f"p{i}.pkg", stage="test"), actor="t")
                assert await projector.wait_for(EVENTS_STREAM, last.seq, 30)
            still = projector.error, watcher.error

            # the mirror appears and folds a message (junk: quarantined, but folded): cleared
            await js.add_stream(api.StreamConfig(name=MIRROR, subjects=["odst.gone.ev.>"]))
            await js.publish("odst.gone.ev.x", b"not an event")
            assert await projector.wait_for(MIRROR, 1, 30)
            await until(lambda: watcher.error is None, 10, "the folded mirror's error to clear")
            return still, projector.error
        finally:
            await watcher.stop()
            await projector.stop()
            projector.conn.close()
            await nc.close()

    (by_projector, by_watcher), after = asyncio.run(run())
    assert by_projector == by_watcher
    assert by_watcher.startswith(f"{MIRROR}: ") and "NotFound" in by_watcher
    assert after is None
