"""Projections: a read model rebuilt from the log equals the live one, whatever happened."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import StoredMessage
from odst.events.signing import SiteKey
from odst.projections import apply, db

NAMES = ["a.pkg", "b.dmg", "c.zip"]
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
    forged = st.just("forged")
    replay = st.just("replay")
    return st.one_of(up, stage, delete, token, revoke, forged, replay)


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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmds=st.lists(command(), max_size=40), restarts=st.sets(st.integers(0, 40), max_size=4))
def test_rebuild_equals_live_after_any_sequence(tmp_path_factory, cmds, restarts):
    tmp: Path = tmp_path_factory.mktemp("proj")
    key = SiteKey.load_or_create(tmp / "site.key")
    log = Log(key, SiteKey.load_or_create(tmp / "mallory.key"))
    for c in cmds:
        if c == "forged":
            log.append(ev.PackageStaged(name="a.pkg", stage="evil"), signer=log.mallory)
        elif c == "replay":
            log.replay()
        else:
            log.append(c)
    trusted = {key.site_id: key.public_key}

    # live: applied one by one, the process "restarting" (new connection) now and then,
    # and some messages delivered twice (at-least-once redelivery)
    live_path = tmp / "live.sqlite"
    conn = db.open_read_model(live_path)
    for i, m in enumerate(log.msgs):
        if i in restarts:
            conn.close()
            conn = db.open_read_model(live_path)
        apply.Folder(conn, trusted).fold(m)
        if i % 7 == 3:
            assert apply.Folder(conn, trusted).fold(m).reason == "already applied"
    rebuilt = db.open_read_model(tmp / "rebuilt.sqlite")
    folder = apply.Folder(rebuilt, trusted)
    for m in log.msgs:
        folder.fold(m)
    assert apply.dump(conn) == apply.dump(rebuilt)
    # nothing forged or replayed ever reached a view
    assert all(r[0] != "evil" for r in conn.execute("SELECT stage FROM packages"))
    quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    assert quarantined == log.bad
    assert conn.execute("SELECT seq FROM checkpoints").fetchone()[0] == len(log.msgs)


def test_an_unknown_site_is_quarantined(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, key)
    conn = db.open_read_model(tmp_path / "m.sqlite")
    out = apply.Folder(conn, {}).fold(log.msgs[0])
    assert not out.applied and "unknown site" in out.reason
    assert conn.execute("SELECT count(*) FROM sites").fetchone()[0] == 0
