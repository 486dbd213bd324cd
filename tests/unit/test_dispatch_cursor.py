"""The notification dispatcher's events cursor: past every event it looked at, written once per
batch for events that queued nothing (real read model, real ledger and alert files)."""

from __future__ import annotations

import asyncio

from odst.events import catalogue as ev
from odst.events.signing import SiteKey
from odst.events.watch import AlertBook
from odst.notify.dispatcher import Dispatcher
from odst.notify.ledger import Ledger
from odst.projections import apply, db
from tests.unit.test_projection import Log


def test_events_that_queue_nothing_move_the_cursor_with_one_write_per_batch(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, SiteKey.load_or_create(tmp_path / "mallory.key"))
    for i in range(20):
        log.append(ev.PackageUploaded(name=f"P{i}.pkg", size=1, sha1="s", sha512="x", blake3=f"b{i}",
                                      chunk_size=1 << 20, chunks=["c"]))
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    assert all(o.applied for o in apply.ReadModelWriter(conn, {key.site_id: key.public_key}).fold_many(log.msgs))
    last = conn.execute("SELECT max(position) FROM events").fetchone()[0]
    ledger = Ledger(tmp_path)
    ledger.set_cursor("events", 0)
    ledger.set_cursor("quarantine", 0)
    dispatcher = Dispatcher(site_id=key.site_id, js=None, reader=conn, projection=None, replicas=1,
                            ledger=ledger, alerts=AlertBook(tmp_path))
    writes = ledger.conn.total_changes

    assert asyncio.run(dispatcher.dispatch_once()) == len(log.msgs)  # no subscription: nothing queued
    assert ledger.cursor("events") == last
    assert ledger.conn.total_changes - writes == 1  # one cursor write for the batch, not one per event
    assert asyncio.run(dispatcher.dispatch_once()) == 0


def test_several_packages_available_at_once_reach_who_asked_for_package_available(tmp_path):
    """A PackagesAvailable (small packages pulled together) is mailed to a subscription to
    PackageAvailable, as it is (its type), its line naming the packages; one to other types
    gets nothing."""
    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, key)
    log.append(ev.EmailSubscribed(subscription_id="s1", recipient="ops@example.com", event_types=["PackageAvailable"]))
    log.append(ev.EmailSubscribed(subscription_id="s2", recipient="jamf@example.com", event_types=["PackageDeleted"]))
    names = [f"P{i}.pkg" for i in range(7)]
    log.append(ev.PackagesAvailable(items=[ev.PackageAvailable(
        name=n, size=1, sha1="s", sha512="x", blake3=f"b{i}", chunk_size=1 << 20, chunks=["c"], stage="prod",
        origin="sother", uploaded_ts=1) for i, n in enumerate(names)]))
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    assert all(o.applied for o in apply.ReadModelWriter(conn, {key.site_id: key.public_key}).fold_many(log.msgs))
    ledger = Ledger(tmp_path)
    ledger.set_cursor("events", 0)
    ledger.set_cursor("quarantine", 0)
    dispatcher = Dispatcher(site_id=key.site_id, js=None, reader=conn, projection=None, replicas=1,
                            ledger=ledger, alerts=AlertBook(tmp_path))

    assert asyncio.run(dispatcher.dispatch_once()) == len(log.msgs)
    [mail] = ledger.pending_mail("ops@example.com")
    assert mail["type"] == "PackagesAvailable" and mail["summary"]["origin"] == key.site_id
    assert mail["summary"]["name"] == "P0.pkg, P1.pkg, P2.pkg, P3.pkg, P4.pkg and 2 more"
    assert ledger.pending_mail("jamf@example.com") == []
