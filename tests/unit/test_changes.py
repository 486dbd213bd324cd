"""What changed since a cursor, read from a real read model folded from signed events (no
server): the replicator's views.changed_keys names the packages the folded events touched
(by name_key, any spelling), says when an event concerns every package, and the keyed forms
of wanted / live_keys / unaccepted_held answer for those packages only."""

from __future__ import annotations

from odst.events import catalogue as ev
from odst.events.signing import SiteKey
from odst.projections import apply, db, views
from tests.unit.test_projection import Log


def upload(log: Log, name: str, i: int, stage: str = "prod") -> None:
    log.append(ev.PackageUploaded(name=name, size=10, sha1=f"s{i}", sha512=f"x{i}", blake3=f"b{i}",
                                  chunk_size=1 << 20, chunks=[f"c{i}"], stage=stage))


def test_changed_keys_names_what_was_folded_after_the_cursor(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    peer = SiteKey.load_or_create(tmp_path / "peer.key")
    log = Log(peer, SiteKey.load_or_create(tmp_path / "mallory.key"))
    upload(log, "Old.pkg", 0)
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    writer = apply.ReadModelWriter(conn, {key.site_id: key.public_key, peer.site_id: peer.public_key})
    here = key.site_id

    def fold_all():
        for m in log.msgs[fold_all.done:]:
            assert writer.fold(m).applied
        fold_all.done = len(log.msgs)
    fold_all.done = 0

    fold_all()
    start, keys, everything, _ = views.changed_keys(conn, 0)
    assert keys == {"old.pkg"} and everything  # SiteFounded: a new site's log concerns every package
    assert views.changed_keys(conn, start) == (start, set(), False, set())  # nothing since

    upload(log, "New.PKG", 1)
    log.append(ev.PackageStaged(name="old.pkg", stage="test"))  # another spelling of Old.pkg
    log.append(ev.TokenCreated(token_id="t1", name="ci", role="uploader", token_sha256="0" * 64))
    fold_all()
    upto, keys, everything, types = views.changed_keys(conn, start)
    assert upto > start and keys == {"new.pkg", "old.pkg"} and not everything
    assert types == {"PackageUploaded", "PackageStaged"}  # TokenCreated concerns no package

    # the keyed views answer for the changed packages only
    wanted = views.wanted(conn, here, ["prod"], keys=sorted(keys))
    assert [(r["key"], r["blake3"]) for r in wanted] == [("new.pkg", "b1")]  # old.pkg is in test now
    assert views.wanted(conn, here, ["prod"], keys=["nothing.pkg"]) == []
    assert {r["key"] for r in views.wanted(conn, here, ["prod", "test"])} == {"old.pkg", "new.pkg"}
    assert views.live_keys(conn, ["old.pkg", "gone.pkg"]) == {"old.pkg"}
    assert views.current_contents(conn, ["OLD.pkg", "nothing.pkg"]) == {"old.pkg": "b0"}

    log.append(ev.PackageDeleted(name="Old.pkg", blake3="b0"))
    log.append(ev.StagesAccepted(stages=["prod"]))
    fold_all()
    after, keys, everything, _ = views.changed_keys(conn, upto)
    assert keys == {"old.pkg"} and everything
    assert views.live_keys(conn, ["old.pkg", "new.pkg"]) == {"new.pkg"}
    assert views.changed_keys(conn, after + 100)[0] == after  # a cursor past the end: rebuilt


def test_held_files_come_in_pages_in_key_order(tmp_path):
    """The replicator's missing-file check looks at one page of held files at a time."""
    peer = SiteKey.load_or_create(tmp_path / "peer.key")
    log = Log(peer, SiteKey.load_or_create(tmp_path / "mallory.key"))
    for i, name in enumerate(["c.pkg", "A.pkg", "b.pkg"]):
        upload(log, name, i)
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    writer = apply.ReadModelWriter(conn, {peer.site_id: peer.public_key})
    for m in log.msgs:
        assert writer.fold(m).applied
    site = peer.site_id
    assert views.file_holders(conn, site) == {"a.pkg": "b1", "b.pkg": "b2", "c.pkg": "b0"}
    assert views.file_holders(conn, site, after="", limit=2) == {"a.pkg": "b1", "b.pkg": "b2"}
    assert views.file_holders(conn, site, after="b.pkg", limit=2) == {"c.pkg": "b0"}
    assert views.file_holders(conn, site, after="c.pkg", limit=2) == {}
