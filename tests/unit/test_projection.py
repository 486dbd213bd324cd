"""Projections: a read model rebuilt from the log equals the live one, whatever happened."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import StoredMessage
from odst.events.signing import SiteKey
from odst.projections import apply, db

NAMES = ["a.pkg", "A.PKG", "b.dmg", "c.zip"]  # a.pkg and A.PKG: one package
CONTENT = ["b3-one", "b3-two"]


def command():
    up = st.builds(lambda n, c, s: ev.PackageUploaded(name=n, size=len(c), sha1="s" + c, sha512="x" + c,
                                                      blake3=c, chunk_size=1 << 20, chunks=["c"], stage=s),
                   st.sampled_from(NAMES), st.sampled_from(CONTENT), st.sampled_from(["dev", "prod"]))
    stage = st.builds(lambda n, s: ev.PackageStaged(name=n, stage=s), st.sampled_from(NAMES),
                      st.sampled_from(["dev", "test", "prod"]))
    delete = st.builds(lambda n, c: ev.PackageDeleted(name=n, blake3=c), st.sampled_from(NAMES),
                       st.sampled_from(CONTENT))
    token = st.builds(lambda i, r: ev.TokenCreated(token_id=f"t{i}", name="n", role=r, token_sha256=f"h{i}"),
                      st.integers(0, 3), st.sampled_from(["admin", "auditor"]))
    revoke = st.builds(lambda i: ev.TokenRevoked(token_id=f"t{i}"), st.integers(0, 3))
    damaged = st.builds(lambda n, c: ev.PackageDamaged(name=n, blake3=c, reason="bit rot", found_by="scrub"),
                        st.sampled_from(NAMES), st.sampled_from(CONTENT))
    forged = st.just("forged")
    replay = st.just("replay")
    return st.one_of(up, stage, delete, token, revoke, damaged, forged, replay)


class Log:
    """Builds the stored messages a real site would have in its stream."""

    def __init__(self, key: SiteKey, mallory: SiteKey):
        self.key, self.mallory = key, mallory
        self.msgs: list[StoredMessage] = []
        self.bad = 0  # messages that must end in quarantine
        self.seq, self.prev = 0, codec.GENESIS
        self.append(ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex()))

    def append(self, event, signer=None):
        signer = signer or self.key
        env = codec.Envelope(id=codec.new_event_id(), origin=self.key.site_id, seq=self.seq + 1,
                             prev=self.prev, ts=1_700_000_000_000 + len(self.msgs), actor="t", event=event)
        payload = codec.seal(env, signer)
        self.msgs.append(StoredMessage("EVENTS", len(self.msgs) + 1,
                                       f"odst.{self.key.site_id}.ev.{type(event).__name__}", payload))
        if signer is self.key:
            self.seq, self.prev = env.seq, codec.chain_hash(payload)
        else:
            self.bad += 1

    def replay(self):
        if len(self.msgs) > 1:
            old = self.msgs[1]
            self.msgs.append(StoredMessage("EVENTS", len(self.msgs) + 1, old.subject, old.payload))
            self.bad += 1


def log_of(cmds, key: SiteKey, mallory: SiteKey) -> "Log":
    """A log made by ``cmds``: events signed by ``key``, "forged" ones by ``mallory``, "replay"s."""
    log = Log(key, mallory)
    for c in cmds:
        if c == "forged":
            log.append(ev.PackageStaged(name="a.pkg", stage="evil"), signer=log.mallory)
        elif c == "replay":
            log.replay()
        else:
            log.append(c)
    return log


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmds=st.lists(command(), max_size=40), restarts=st.sets(st.integers(0, 40), max_size=4))
def test_rebuild_equals_live_after_any_sequence(tmp_path_factory, cmds, restarts):
    tmp: Path = tmp_path_factory.mktemp("proj")
    key = SiteKey.load_or_create(tmp / "site.key")
    log = log_of(cmds, key, SiteKey.load_or_create(tmp / "mallory.key"))
    trusted = {key.site_id: key.public_key}

    # live: applied one by one, the process "restarting" (new connection) now and then,
    # and some messages delivered twice (at-least-once redelivery)
    live_path = tmp / "live.sqlite"
    conn = db.open_read_model(live_path)
    for i, m in enumerate(log.msgs):
        if i in restarts:
            conn.close()
            conn = db.open_read_model(live_path)
        apply.ReadModelWriter(conn, trusted).fold(m)
        if i % 7 == 3:
            assert apply.ReadModelWriter(conn, trusted).fold(m).reason == "already applied"
    rebuilt = db.open_read_model(tmp / "rebuilt.sqlite")
    writer = apply.ReadModelWriter(rebuilt, trusted)
    for m in log.msgs:
        writer.fold(m)
    assert apply.dump(conn) == apply.dump(rebuilt)
    # nothing forged or replayed ever reached a view
    assert all(r[0] != "evil" for r in conn.execute("SELECT stage FROM packages"))
    quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    assert quarantined == log.bad
    assert conn.execute("SELECT seq FROM checkpoints").fetchone()[0] == len(log.msgs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmds=st.lists(command(), max_size=40), cuts=st.lists(st.integers(1, 9), max_size=12))
def test_a_batched_fold_equals_one_by_one(tmp_path_factory, cmds, cuts):
    """The projector folds a catch-up in batches (fold_many: one transaction per run). A
    forged or replayed message inside a batch is quarantined alone, the good ones around it
    applied: the read model, quarantine and checkpoint equal folding one message at a time."""
    tmp: Path = tmp_path_factory.mktemp("batch")
    key = SiteKey.load_or_create(tmp / "site.key")
    log = log_of(cmds, key, SiteKey.load_or_create(tmp / "mallory.key"))
    trusted = {key.site_id: key.public_key}
    one = db.open_read_model(tmp / "one.sqlite")
    writer = apply.ReadModelWriter(one, trusted)
    expected = [writer.fold(m) for m in log.msgs]
    many = db.open_read_model(tmp / "many.sqlite")
    writer = apply.ReadModelWriter(many, trusted)
    got, i = [], 0
    for n in [*cuts, len(log.msgs)]:
        got += writer.fold_many(log.msgs[i:i + n])
        i += n
    assert [(o.applied, o.reason) for o in got] == [(o.applied, o.reason) for o in expected][:len(got)]
    assert i >= len(log.msgs) and len(got) == len(log.msgs)
    assert apply.dump(many) == apply.dump(one)
    assert many.execute("SELECT count(*) FROM quarantine").fetchone()[0] == log.bad
    assert many.execute("SELECT seq FROM checkpoints").fetchone()[0] == len(log.msgs)
    # folded again (a redelivery after a crash before the checkpoint moved on): nothing changes
    assert all(o.reason == "already applied" for o in writer.fold_many(log.msgs))
    assert apply.dump(many) == apply.dump(one)


def test_a_batch_stops_where_asked_and_keeps_what_came_before(tmp_path):
    """``stop``: the projector stops a batch at a chain gap to heal it; what was folded before
    (and the gap's own outcome) is committed, the rest is not folded."""
    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, key)
    for i in range(5):
        log.append(ev.PackageStaged(name=f"p{i}.pkg", stage="dev"))
    msgs = log.msgs[:3] + log.msgs[4:]  # seq 4 missing: the 4th message is a gap
    conn = db.open_read_model(tmp_path / "m.sqlite")
    writer = apply.ReadModelWriter(conn, {key.site_id: key.public_key})
    out = writer.fold_many(msgs, stop=lambda o: o.reason.startswith("gap in "))
    assert [o.applied for o in out] == [True, True, True, False] and out[-1].reason.startswith("gap in ")
    assert writer.checkpoint("EVENTS") == msgs[3].seq
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    assert conn.execute("SELECT count(*) FROM quarantine WHERE violation=1").fetchone()[0] == 1


def test_an_unknown_site_is_quarantined(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, key)
    conn = db.open_read_model(tmp_path / "m.sqlite")
    out = apply.ReadModelWriter(conn, {}).fold(log.msgs[0])
    assert not out.applied and "unknown site" in out.reason
    assert conn.execute("SELECT count(*) FROM sites").fetchone()[0] == 0


def _site_log(tmp: Path, name: str, cmds, peer_of=None):
    key = SiteKey.load_or_create(tmp / f"{name}.key")
    log = Log(key, key)
    if peer_of is not None:
        log.append(ev.PeerRegistered(site=peer_of.site_id, public_key=peer_of.public_key.hex()))
    for c in cmds:
        log.append(c)
    return key, log


def site_commands():
    up = st.builds(lambda n, c, s, t: (t, ev.PackageUploaded(name=n, size=len(c), sha1="s" + c, sha512="x" + c,
                                                             blake3=c, chunk_size=1 << 20, chunks=["c"], stage=s)),
                   st.sampled_from(NAMES), st.sampled_from(CONTENT), st.sampled_from(["dev", "prod"]),
                   st.integers(0, 5))
    avail = st.builds(lambda n, c, t: (t, ev.PackageAvailable(name=n, size=len(c), sha1="s" + c, sha512="x" + c,
                                                              blake3=c, chunk_size=1 << 20, chunks=["c"],
                                                              stage="test", origin="sother", uploaded_ts=t)),
                      st.sampled_from(NAMES), st.sampled_from(CONTENT), st.integers(0, 5))
    batch = st.builds(lambda items, t: (t, ev.PackagesAvailable(items=[i for _, i in items])),
                      st.lists(avail, min_size=1, max_size=3), st.integers(0, 5))
    stage = st.builds(lambda n, s, t: (t, ev.PackageStaged(name=n, stage=s)), st.sampled_from(NAMES),
                      st.sampled_from(["dev", "test", "prod"]), st.integers(0, 5))
    delete = st.builds(lambda n, c, t: (t, ev.PackageDeleted(name=n, blake3=c)), st.sampled_from(NAMES),
                       st.sampled_from(CONTENT), st.integers(0, 5))
    damaged = st.builds(lambda n, c, t: (t, ev.PackageDamaged(name=n, blake3=c, reason="bit rot", found_by="report")),
                        st.sampled_from(NAMES), st.sampled_from(CONTENT), st.integers(0, 5))
    return st.lists(st.one_of(up, avail, batch, stage, delete, damaged), max_size=25)


class TimedLog(Log):
    """Like Log, but each event gets a chosen timestamp (clocks of two sites may tie)."""

    def append(self, event, signer=None):
        ts = 0
        if isinstance(event, tuple):
            ts, event = event
        signer = signer or self.key
        env = codec.Envelope(id=codec.new_event_id(), origin=self.key.site_id, seq=self.seq + 1,
                             prev=self.prev, ts=1_700_000_000_000 + ts * 10 + self.seq, actor="t", event=event)
        payload = codec.seal(env, signer)
        self.msgs.append(StoredMessage(self.stream, len(self.msgs) + 1,
                                       f"odst.{self.key.site_id}.ev.{type(event).__name__}", payload))
        self.seq, self.prev = env.seq, codec.chain_hash(payload)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a_cmds=site_commands(), b_cmds=site_commands(), order=st.randoms(use_true_random=False))
def test_two_sites_in_any_interleaving_fold_to_the_same_model(tmp_path_factory, a_cmds, b_cmds, order):
    """Live, a site folds its own stream and a peer's mirror interleaved however they arrive;
    a rebuild folds them one after the other. The views must not care."""
    tmp: Path = tmp_path_factory.mktemp("two")
    ka = SiteKey.load_or_create(tmp / "a.key")
    kb = SiteKey.load_or_create(tmp / "b.key")
    a = TimedLog.__new__(TimedLog)
    a.stream = "EVENTS"
    Log.__init__(a, ka, ka)
    a.append((0, ev.PeerRegistered(site=kb.site_id, public_key=kb.public_key.hex())))
    for c in a_cmds:
        a.append(c)
    b = TimedLog.__new__(TimedLog)
    b.stream = f"PEER_{kb.site_id}"
    Log.__init__(b, kb, kb)
    b.msgs = [StoredMessage(b.stream, m.seq, m.subject, m.payload) for m in b.msgs]
    for c in b_cmds:
        b.append(c)
    trusted = {ka.site_id: ka.public_key}

    def fold(msgs, path):
        conn = db.open_read_model(path)
        writer = apply.ReadModelWriter(conn, trusted)
        for m in msgs:
            writer.fold(m)
        return conn

    # B's stream can only be read once A's PeerRegistered(B) was folded, as live
    rest = a.msgs[2:]
    merged, ia, ib = list(a.msgs[:2]), 0, 0
    while ia < len(rest) or ib < len(b.msgs):
        if ib < len(b.msgs) and (ia >= len(rest) or order.random() < 0.5):
            merged.append(b.msgs[ib])
            ib += 1
        else:
            merged.append(rest[ia])
            ia += 1
    live = fold(merged, tmp / "live.sqlite")
    rebuilt = fold(a.msgs + b.msgs, tmp / "rebuilt.sqlite")
    assert apply.dump(live) == apply.dump(rebuilt)
    assert live.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0
    assert [tuple(r) for r in live.execute("SELECT * FROM packages ORDER BY name")] == \
        [tuple(r) for r in rebuilt.execute("SELECT * FROM packages ORDER BY name")]


def test_damage_takes_a_copy_out_of_service_until_a_verified_copy_is_back(tmp_path):
    """PackageDamaged: not servable here, wanted again, listed damaged; PackageAvailable from the
    same site (the repair) or a new upload of the same bytes puts it back."""
    from odst.projections import views
    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, key)
    up = ev.PackageUploaded(name="a.pkg", size=3, sha1="s", sha512="x", blake3="b3", chunk_size=1 << 20,
                            chunks=["c"], stage="prod")
    log.append(up)
    log.append(ev.PackageDamaged(name="a.pkg", blake3="b3", reason="bit rot", found_by="scrub"))
    conn = db.open_read_model(tmp_path / "m.sqlite")
    writer = apply.ReadModelWriter(conn, {key.site_id: key.public_key})
    for m in log.msgs:
        assert writer.fold(m).applied
    me = key.site_id
    assert views.servable(conn, "a.pkg", me) is None and views.is_damaged(conn, "a.pkg", me)
    assert [r["name"] for r in views.wanted(conn, me, ["prod"])] == ["a.pkg"]
    assert [(d.name, d.found_by, d.sources) for d in views.damaged(conn, me)] == [("a.pkg", "scrub", [])]
    log.append(ev.PackageAvailable(name="a.pkg", size=3, sha1="s", sha512="x", blake3="b3", chunk_size=1 << 20,
                                   chunks=["c"], stage="prod", origin=me, uploaded_ts=1))
    assert writer.fold(log.msgs[-1]).applied
    assert views.servable(conn, "a.pkg", me) is not None and not views.is_damaged(conn, "a.pkg", me)
    assert views.damaged(conn, me) == []
    log.append(ev.PackageDamaged(name="a.pkg", blake3="b3", reason="again", found_by="verify"))
    log.append(up)  # an admin uploads the same bytes again
    for m in log.msgs[-2:]:
        assert writer.fold(m).applied
    assert views.servable(conn, "a.pkg", me) is not None and views.damaged(conn, me) == []


def test_chain_state_is_where_the_own_log_stands_in_the_read_model(tmp_path):
    """views.chain_state, where EventLog starts its head: the stream's checkpoint and the last
    verified seq and hash of the site, a forged message counted in the checkpoint only."""
    from odst.projections import views

    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, SiteKey.load_or_create(tmp_path / "mallory.key"))
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    assert views.chain_state(conn, "EVENTS", key.site_id) == (0, 0, "")
    log.append(ev.PackageStaged(name="a.pkg", stage="test", previous="prod"))
    log.append(ev.PackageStaged(name="a.pkg", stage="prod", previous="test"), signer=log.mallory)
    writer = apply.ReadModelWriter(conn, {key.site_id: key.public_key})
    for m in log.msgs:
        writer.fold(m)
    assert views.chain_state(conn, "EVENTS", key.site_id) == (3, 2, log.prev)


def test_a_batch_of_availability_folds_as_its_items_would_one_by_one(tmp_path):
    """PackagesAvailable (small packages pulled together): the read model's packages, contents
    and availability are what the same items as PackageAvailable events make; what changed
    names every item's package, and each package's history lists the batch."""
    from odst.projections import views

    hq, branch = SiteKey.load_or_create(tmp_path / "hq.key"), SiteKey.load_or_create(tmp_path / "branch.key")
    items = [ev.PackageAvailable(name=n, size=len(c), sha1="s" + c, sha512="x" + c, blake3=c, chunk_size=1 << 20,
                                 chunks=["c"], stage="prod", origin=hq.site_id, uploaded_ts=7)
             for n, c in (("a.pkg", "b3-one"), ("B.dmg", "b3-two"), ("c.zip", "b3-one"))]
    class SameClock(Log):
        """Every event at one time: a batch's items and single events alike."""

        def append(self, event, signer=None):
            env = codec.Envelope(id=codec.new_event_id(), origin=self.key.site_id, seq=self.seq + 1,
                                 prev=self.prev, ts=1_700_000_000_000, actor="t", event=event)
            payload = codec.seal(env, self.key)
            self.msgs.append(StoredMessage("EVENTS", len(self.msgs) + 1, f"odst.{self.key.site_id}.ev.x", payload))
            self.seq, self.prev = env.seq, codec.chain_hash(payload)

    models = []
    for name, events in (("batch", [ev.PackagesAvailable(items=items)]), ("single", items)):
        log = SameClock(branch, branch)
        conn = db.open_read_model(tmp_path / f"{name}.sqlite")
        writer = apply.ReadModelWriter(conn, {branch.site_id: branch.public_key})
        for m in log.msgs:
            writer.fold(m)
        start = views.last_position(conn)
        for e in events:
            log.append(e)
            assert writer.fold(log.msgs[-1]).applied
        changed = views.changed_keys(conn, start)
        assert changed.keys == {"a.pkg", "b.dmg", "c.zip"} and not changed.everything
        assert [e.type for e in views.events(conn, name="B.dmg")] == [type(events[-1]).__name__]
        assert views.events(conn, name="b.dmg") == []  # a history is by the name as spelt
        models.append({t: rows for t, rows in apply.dump(conn).items()
                       if t not in ("events", "event_names", "sites", "checkpoints")})
    assert models[0] == models[1]
    assert {(r["key"], r["site"]) for r in conn.execute("SELECT key, site FROM availability")} == \
        {(k, branch.site_id) for k in ("a.pkg", "b.dmg", "c.zip")}


def test_a_package_name_that_is_no_file_name_has_no_effect_and_the_chain_goes_on(tmp_path):
    """A registered peer's events are signed, not safe: one naming '../../site.key' (to be
    written, pulled or removed there by every site that folds it) is recorded in its chain
    without effect, the item of a PackagesAvailable alone; the events after it fold as usual,
    and no changed key names it. The store refuses such a name as a last line."""
    from odst.errors import PackageNameInvalid
    from odst.projections import views
    from odst.store.files import Store

    peer = SiteKey.load_or_create(tmp_path / "peer.key")
    log = Log(peer, peer)
    content = dict(size=1, sha1="s", sha512="x", chunk_size=1 << 20, chunks=["c"])
    bad = ["../../site.key", "a/b.pkg", "..", "x\x00.pkg", "\u202eevil.pkg"]
    for i, name in enumerate(bad):
        log.append(ev.PackageUploaded(name=name, blake3=f"b{i}", **content))
        log.append(ev.PackageDeleted(name=name, blake3=f"b{i}"))
    log.append(ev.PackagesAvailable(items=[ev.PackageAvailable(
        name=n, blake3=b, stage="prod", origin=peer.site_id, uploaded_ts=1, **content)
        for n, b in (("../escape.pkg", "b8"), ("Fine.pkg", "b9"))]))
    log.append(ev.PackageUploaded(name="After.pkg", blake3="b10", **content))
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    writer = apply.ReadModelWriter(conn, {peer.site_id: peer.public_key})
    assert all(o.applied for o in writer.fold_many(log.msgs))
    assert sorted(r["name"] for r in conn.execute("SELECT name FROM contents")) == ["After.pkg", "Fine.pkg"]
    assert conn.execute("SELECT count(*) FROM tombstones").fetchone()[0] == 0
    assert views.changed_keys(conn, 0).keys == {"fine.pkg", "after.pkg"}
    store = Store(tmp_path / "store")
    for name in ("../../site.key", "a/b.pkg", "..", ".", "", "x\x00y"):
        with pytest.raises(PackageNameInvalid):
            store.path(name)
    assert store.path("Fine.pkg") == tmp_path / "store" / "packages" / "fine.pkg"
    from odst.replicator.puller import temp_path
    for digest in ("../../../escape", "A" * 64, "0" * 63, "0" * 64 + "/x"):
        with pytest.raises(ValueError):
            temp_path(store.tmp, digest)
    assert temp_path(store.tmp, "0f" * 32) == store.tmp / f"{'0f' * 32}.repl"


def test_a_peers_signed_events_cannot_rewrite_another_site_or_stall_every_pass(tmp_path):
    """Signed by a registered peer, yet harmful: a SiteFounded of another site (its chain head
    rewritten: that site's next event a 'gap'), a PeerRegistered of '*' or under a key that is
    not the site's, a URL nothing can parse, a timetable that does not parse, a Jamf Pro record
    named by a path, chunks of 0 bytes. Each is recorded in the peer's chain without effect
    and what follows folds; an integer no SQLite column holds is quarantined, once."""
    from odst.events.signing import site_id_for

    me, peer = SiteKey.load_or_create(tmp_path / "me.key"), SiteKey.load_or_create(tmp_path / "peer.key")
    other = SiteKey.load_or_create(tmp_path / "other.key")
    mine = Log(me, me)
    mine.append(ev.PeerRegistered(site=peer.site_id, public_key=peer.public_key.hex()))
    theirs = Log(peer, peer)
    k = other.public_key.hex()
    theirs.append(ev.SiteFounded(site=me.site_id, public_key=me.public_key.hex(), name="pwned"))
    theirs.append(ev.PeerRegistered(site="*", public_key=k))
    theirs.append(ev.PeerRegistered(site=other.site_id, public_key=peer.public_key.hex()))
    theirs.append(ev.PeerRegistered(site=other.site_id, public_key="zz"))
    theirs.append(ev.PeerRegistered(site=other.site_id, public_key=k, http_url="http://["))
    theirs.append(ev.LinkBandwidthSet(link="*", windows=[ev.TimeWindow(days=["xx"], start="99:00", end="01:00")]))
    theirs.append(ev.JamfPackageSynced(name="a.pkg", blake3="b", file_name="a.pkg", record_id="../../v1/computers/7",
                                       hash_type="SHA_512", hash_value="x", size=1, action="created"))
    theirs.append(ev.PackageUploaded(name="zero.pkg", size=5, sha1="s", sha512="x", blake3="b0", chunk_size=0,
                                     chunks=["c"]))
    theirs.append(ev.PeerRegistered(site=other.site_id, public_key=k, http_url="https://other.example:8443"))
    msgs = [StoredMessage(f"PEER_{peer.site_id}", m.seq, m.subject, m.payload) for m in theirs.msgs]
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    writer = apply.ReadModelWriter(conn, {me.site_id: me.public_key})
    assert all(o.applied for o in writer.fold_many(mine.msgs))
    outcomes = writer.fold_many(msgs)
    assert all(o.applied for o in outcomes), [o.reason for o in outcomes if not o.applied]
    assert tuple(conn.execute("SELECT name, last_seq FROM sites WHERE site=?", (me.site_id,)).fetchone()) == ("", 2)
    mine.append(ev.PackageStaged(name="a.pkg", stage="test"))
    assert writer.fold(mine.msgs[-1]).applied  # its own chain goes on
    assert [tuple(r) for r in conn.execute("SELECT site, public_key, http_url FROM directory WHERE vouched_by=?",
                                           (peer.site_id,))] == [(other.site_id, k, "https://other.example:8443")]
    assert site_id_for(other.public_key) == other.site_id
    for table in ("bandwidth_links", "jamf_packages", "contents"):
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0, table

    # an integer past 64 bits: quarantined (a violation), the stream's checkpoint past it
    env = codec.Envelope(id=codec.new_event_id(), origin=peer.site_id, seq=theirs.seq + 1, prev=theirs.prev,
                         ts=2 ** 64, actor="t", event=ev.PackageStaged(name="a.pkg", stage="dev"))
    big = StoredMessage(f"PEER_{peer.site_id}", len(msgs) + 1, f"odst.{peer.site_id}.ev.PackageStaged",
                        codec.seal(env, peer))
    outcome = writer.fold(big)
    assert not outcome.applied and outcome.violation and "64 bits" in outcome.reason
    assert writer.checkpoint(f"PEER_{peer.site_id}") == big.seq
