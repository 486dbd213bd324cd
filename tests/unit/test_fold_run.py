"""One transaction folding a run of events keeps what every check reads current as it goes:
a peer removed, a copy reported damaged, or a chain head moved by an event earlier in the
same run counts for the events after it exactly as folding them one by one would (real
SQLite read models, real signed events)."""

from __future__ import annotations

import sqlite3

import pytest

from odst.events import catalogue as ev, codec
from odst.events.log import StoredMessage
from odst.events.signing import SiteKey
from odst.projections import apply, db
from tests.unit.test_projection import Log


def content(i: int) -> dict:
    return dict(size=10, sha1=f"s{i}", sha512=f"x{i}", blake3=f"b{i}", chunk_size=1 << 20, chunks=[f"c{i}"])


def streams(tmp_path):
    """This site's log and a peer's, their messages interleaved into one run as a mirror
    and the site's own stream would be folded."""
    here = SiteKey.load_or_create(tmp_path / "here.key")
    peer = SiteKey.load_or_create(tmp_path / "peer.key")
    mallory = SiteKey.load_or_create(tmp_path / "mallory.key")
    own, theirs = Log(here, mallory), Log(peer, mallory)
    theirs.append(ev.PackageUploaded(name="A.pkg", stage="prod", **content(1)))
    theirs.append(ev.PackageUploaded(name="B.pkg", stage="prod", **content(2)))
    own.append(ev.PackageAvailable(name="A.pkg", stage="prod", origin=peer.site_id, uploaded_ts=1,
                                   **content(1)))
    own.append(ev.PackageDamaged(name="A.pkg", blake3="b1", reason="bit rot", found_by="scrub"))
    own.append(ev.PackageAvailable(name="A.pkg", stage="prod", origin=peer.site_id, uploaded_ts=1,
                                   **content(1)))  # pulled again: repaired
    own.append(ev.PeerRemoved(site=peer.site_id, upto_seq=2))
    theirs.append(ev.PackageUploaded(name="C.pkg", stage="prod", **content(3)))  # after its removal
    theirs.append(ev.PackageUploaded(name="D.pkg", stage="prod", **content(4)))
    theirs.msgs.append(StoredMessage("EVENTS", len(theirs.msgs) + 1, theirs.msgs[2].subject,
                                     theirs.msgs[2].payload))  # a replay of seq 2
    mirror = [StoredMessage("MIRROR", m.seq, m.subject, m.payload) for m in theirs.msgs]
    # peer's founding and first upload, then ours, then the rest of theirs
    run = mirror[:2] + own.msgs[:3] + mirror[2:3] + own.msgs[3:] + mirror[3:]
    trusted = {here.site_id: here.public_key, peer.site_id: peer.public_key}
    return run, trusted, peer.site_id


def test_a_run_folded_in_one_transaction_equals_folding_one_by_one(tmp_path):
    run, trusted, peer = streams(tmp_path)
    one = db.open_read_model(tmp_path / "one.sqlite")
    by_one = [apply.ReadModelWriter(one, trusted).fold(m) for m in run]
    many = db.open_read_model(tmp_path / "many.sqlite")
    together = apply.ReadModelWriter(many, trusted).fold_many(run)

    assert [(o.applied, o.reason) for o in together] == [(o.applied, o.reason) for o in by_one]
    assert apply.dump(many) == apply.dump(one)
    reasons = [o.reason for o in together if not o.applied]
    # the removal folded mid-run binds the peer's later events in the same transaction
    assert sum(r.startswith(apply.IGNORED) for r in reasons) == 3, reasons
    # the damage report and the pull after it, in one run: repaired, as one by one
    assert many.execute("SELECT count(*) FROM damaged").fetchone()[0] == 0
    assert many.execute("SELECT status FROM availability WHERE key='a.pkg' AND site<>?",
                        (peer,)).fetchone()[0] == "available"
    # the chain head moved by each event: the peer's seq 2 was applied once, B.pkg is known
    assert many.execute("SELECT last_seq FROM sites WHERE site=?", (peer,)).fetchone()[0] == 3


def test_damage_reported_in_a_run_stands_until_repaired(tmp_path):
    here = SiteKey.load_or_create(tmp_path / "here.key")
    own = Log(here, SiteKey.load_or_create(tmp_path / "mallory.key"))
    own.append(ev.PackageUploaded(name="A.pkg", stage="prod", **content(1)))
    own.append(ev.PackageUploaded(name="B.pkg", stage="prod", **content(2)))
    own.append(ev.PackageDamaged(name="A.pkg", blake3="b1", reason="bit rot", found_by="scrub"))
    own.append(ev.PackageUploaded(name="B.pkg", stage="prod", **content(2)))  # another content's upload
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    writer = apply.ReadModelWriter(conn, {here.site_id: here.public_key})
    assert all(o.applied for o in writer.fold_many(own.msgs))
    assert [tuple(r) for r in conn.execute("SELECT key, blake3 FROM damaged")] == [("a.pkg", "b1")]
    own.append(ev.PackageUploaded(name="a.PKG", stage="prod", **content(1)))  # uploaded again
    assert all(o.applied for o in writer.fold_many(own.msgs[-1:]))
    assert conn.execute("SELECT count(*) FROM damaged").fetchone()[0] == 0


def test_a_folds_rollback_scratch_stays_in_memory(tmp_path):
    """Each message folds in a savepoint; its journal spilled to a temp file past 64 KiB (~30
    page writes a message in a catch-up) until the writer's temp storage was put in memory."""
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    assert conn.execute("PRAGMA temp_store").fetchone()[0] != 2  # SQLite's default: a file
    apply.ReadModelWriter(conn, {})
    assert conn.execute("PRAGMA temp_store").fetchone()[0] == 2  # MEMORY


def signed(key: SiteKey, seq: int, prev: str, event, event_id: str | None = None) -> StoredMessage:
    env = codec.Envelope(id=event_id or codec.new_event_id(), origin=key.site_id, seq=seq, prev=prev,
                         ts=1_700_000_000_000 + seq, actor="t", event=event)
    payload = codec.seal(env, key)
    return StoredMessage("EVENTS", seq, f"odst.{key.site_id}.ev.{type(event).__name__}", payload)


def test_an_event_reusing_an_id_is_a_violation_and_moves_no_chain_head(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "here.key")
    founded = signed(key, 1, codec.GENESIS, ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex()))
    first = signed(key, 2, codec.chain_hash(founded.payload), ev.PackageUploaded(name="A.pkg", stage="prod", **content(1)))
    again = signed(key, 3, codec.chain_hash(first.payload), ev.PackageUploaded(name="B.pkg", stage="prod", **content(2)),
                   event_id=codec.decode_body(codec.unverified_body(first.payload)).id)
    # the next event chained where the duplicate would have been: the head never moved to it
    after = signed(key, 3, codec.chain_hash(first.payload), ev.PackageUploaded(name="C.pkg", stage="prod", **content(3)))
    after = StoredMessage("EVENTS", 4, after.subject, after.payload)
    trusted = {key.site_id: key.public_key}
    for how in ("one by one", "together"):
        conn = db.open_read_model(tmp_path / f"{how}.sqlite")
        writer = apply.ReadModelWriter(conn, trusted)
        msgs = [founded, first, again, after]
        out = [writer.fold(m) for m in msgs] if how == "one by one" else writer.fold_many(msgs)
        assert [o.applied for o in out] == [True, True, False, True], how
        assert out[2].reason.startswith("duplicate event id") and out[2].violation, out[2]
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 3
        assert conn.execute("SELECT last_seq FROM sites").fetchone()[0] == 3
        assert conn.execute("SELECT seq FROM checkpoints WHERE stream='EVENTS'").fetchone()[0] == 4
        assert conn.execute("SELECT count(*) FROM packages WHERE name='B.pkg'").fetchone()[0] == 0


def test_a_fold_that_raises_mid_run_keeps_those_before_it_and_folds_the_rest_later(tmp_path):
    run, trusted, _ = streams(tmp_path)
    one = db.open_read_model(tmp_path / "one.sqlite")
    by_one = [apply.ReadModelWriter(one, trusted).fold(m) for m in run]
    many = db.open_read_model(tmp_path / "many.sqlite")
    writer = apply.ReadModelWriter(many, trusted)
    # a real constraint of the database (no stand-in) refuses the fourth message, this site's
    # first availability row (the peer's upload made the first): folding it raises
    many.execute("CREATE TRIGGER refuse BEFORE INSERT ON availability WHEN NEW.site <> ("
                 "SELECT site FROM availability LIMIT 1) BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        writer.fold_many(run)
    assert not many.in_transaction
    before = db.open_read_model(tmp_path / "before.sqlite")
    for m in run[:3]:
        apply.ReadModelWriter(before, trusted).fold(m)
    assert apply.dump(many) == apply.dump(before)  # the three before it stand, as one by one
    assert {r[0]: r[1] for r in many.execute("SELECT stream, seq FROM checkpoints")} == {
        "MIRROR": run[1].seq, "EVENTS": run[2].seq}
    many.execute("DROP TRIGGER refuse")
    rest = writer.fold_many(run)
    assert [(o.applied, o.reason) for o in rest[3:]] == [(o.applied, o.reason) for o in by_one[3:]]
    assert apply.dump(many) == apply.dump(one)


def test_an_insert_refused_otherwise_than_for_a_duplicate_id_is_raised_not_quarantined(tmp_path):
    run, trusted, _ = streams(tmp_path)
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON events WHEN NEW.stream_seq = 2"
                 " BEGIN SELECT RAISE(ABORT, 'refused'); END")
    with pytest.raises(sqlite3.IntegrityError, match="refused"):
        apply.ReadModelWriter(conn, trusted).fold_many(run[:3])
    assert conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1
