"""Replacing a package under the same name: the upload/replace decisions (odst.events.uploads)
and how the read model folds PackageReplaced (current content, conflicts, what each site serves),
whatever order the sites' logs arrive in."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from odst.events import catalogue as ev
from odst.events import uploads
from odst.events.signing import SiteKey
from odst.projections import apply, db, views
from odst.store.hashing import manifest_of
from tests.unit.test_projection import Log, TimedLog
from tests.unit.test_uploads import package_of

HERE = "shere"


def pkg(data: bytes, *, stage: str = "prod", generation: int = 0) -> views.Package:
    return package_of(data, stage=stage, generation=generation)


# ------------------------------------------------------------------ decisions


def test_a_replacement_is_admitted_whatever_its_size():
    existing = pkg(b"x" * 40)
    args = dict(max_bytes=100, free_bytes=1000, reserve_bytes=10)
    assert isinstance(uploads.admit_upload("a.pkg", 50, existing, **args), uploads.Conflict)
    assert uploads.admit_upload("a.pkg", 50, existing, replace=True, **args) is None
    assert isinstance(uploads.admit_upload("a.pkg", 101, existing, replace=True, **args), uploads.TooLarge)
    assert isinstance(uploads.admit_upload("a.pkg", 50, existing, replace=True, max_bytes=100, free_bytes=55,
                                           reserve_bytes=10), uploads.NoSpace)


def test_replacing_a_name_nobody_uploaded_is_an_upload_in_the_default_stage():
    d = uploads.accept_replace("a.pkg", None, "test", manifest_of([b"new"]), None, None)
    assert isinstance(d, uploads.Uploaded) and d.event.stage == "test"
    d = uploads.accept_replace("a.pkg", "prod", "test", manifest_of([b"new"]), None, None)
    assert d.event.stage == "prod"


def test_other_content_replaces_the_current_one_a_generation_up_in_its_stage():
    old = pkg(b"old", stage="prod", generation=2)
    m = manifest_of([b"new bytes"])
    d = uploads.accept_replace("a.pkg", None, "test", m, old, old.blake3)
    assert isinstance(d, uploads.Replaced)
    e = d.event
    assert (e.replaces, e.blake3, e.generation, e.stage) == (old.blake3, m.blake3, 3, "prod")
    assert (e.size, e.sha1, e.sha512, e.chunks) == (m.size, m.sha1, m.sha512, list(m.chunks))
    assert uploads.accept_replace("a.pkg", "dev", "test", m, old, None).event.stage == "dev"


def test_the_current_content_served_here_is_identical_and_not_served_here_is_published_here():
    cur = pkg(b"cur")
    m = manifest_of([b"cur"])
    assert isinstance(uploads.accept_replace("a.pkg", None, "prod", m, cur, cur.blake3), uploads.Identical)
    # this site still serves older content (the replacement is on its way): take the new one from the admin
    d = uploads.accept_replace("a.pkg", None, "prod", m, cur, "someoldb3")
    assert isinstance(d, uploads.Uploaded) and d.event.blake3 == cur.blake3


@given(a=st.binary(max_size=64), b=st.binary(max_size=64), served=st.booleans())
def test_a_replace_never_refuses_and_never_records_the_current_content_as_a_replacement(a, b, served):
    cur = pkg(a)
    m = manifest_of([b])
    d = uploads.accept_replace("a.pkg", None, "prod", m, cur, cur.blake3 if served else None)
    if m.blake3 == cur.blake3:
        assert isinstance(d, uploads.Identical if served else uploads.Uploaded)
    else:
        assert isinstance(d, uploads.Replaced) and d.event.replaces == cur.blake3


# ------------------------------------------------------------------ folding


def content(c: str) -> dict:
    return dict(size=len(c), sha1="s" + c, sha512="x" + c, blake3=c, chunk_size=1 << 20, chunks=["c"])


def uploaded(name, c, stage="prod"):
    return ev.PackageUploaded(name=name, stage=stage, **content(c))


def replaced(name, old, c, generation, stage="prod"):
    return ev.PackageReplaced(name=name, stage=stage, replaces=old, generation=generation, **content(c))


def available(name, c, origin, ts):
    return ev.PackageAvailable(name=name, stage="prod", origin=origin, uploaded_ts=ts, **content(c))


class Sites:
    """Two or three sites' logs, A trusting the others through PeerRegistered."""

    def __init__(self, tmp: Path, n: int = 3):
        self.tmp = tmp
        self.keys = [SiteKey.load_or_create(tmp / f"{i}.key") for i in range(n)]
        self.logs = []
        for i, k in enumerate(self.keys):
            log = TimedLog.__new__(TimedLog)
            log.stream = "EVENTS" if i == 0 else f"PEER_{k.site_id}"
            Log.__init__(log, k, k)
            log.msgs = [type(m)(log.stream, m.seq, m.subject, m.payload) for m in log.msgs]
            self.logs.append(log)
        for k in self.keys[1:]:
            self.logs[0].append((0, ev.PeerRegistered(site=k.site_id, public_key=k.public_key.hex())))
        self.ids = [k.site_id for k in self.keys]

    def fold(self, order: list[int] | None = None, name: str = "m.sqlite"):
        conn = db.open_read_model(self.tmp / name)
        folder = apply.ReadModelWriter(conn, {self.ids[0]: self.keys[0].public_key})
        msgs = [m for log in self.logs for m in log.msgs]
        if order is not None:  # A's founding and registrations first, as live
            head = self.logs[0].msgs[:len(self.keys)]
            rest = [m for m in msgs if m not in head]
            msgs = head + [rest[i] for i in order]
        for m in msgs:
            assert folder.fold(m).applied, m
        return conn


def ts(log) -> int:
    return 1_700_000_000_000 + 0 + log.seq  # what TimedLog stamps for t=0 at the next append (less one)


def test_a_replacement_is_current_and_each_site_serves_the_old_content_until_it_holds_the_new(tmp_path):
    s = Sites(tmp_path)
    a, b, c = s.logs
    a.append((1, uploaded("x.pkg", "old")))
    b.append((2, available("x.pkg", "old", s.ids[0], 0)))
    c.append((2, available("x.pkg", "old", s.ids[0], 0)))
    b.append((3, replaced("x.pkg", "old", "new", 1)))
    conn = s.fold()
    p = views.package(conn, "x.pkg")
    assert (p.blake3, p.generation) == ("new", 1)
    assert views.conflicts(conn) == []
    assert views.sites_serving(conn, "x.pkg") == {s.ids[0]: "old", s.ids[1]: "new", s.ids[2]: "old"}
    assert views.servable(conn, "x.pkg", s.ids[0]).blake3 == "old"
    assert [r["name"] for r in views.wanted(conn, s.ids[0], ["prod"])] == ["x.pkg"]
    assert views.sources(conn, "x.pkg", "new", s.ids[0]) == [s.ids[1]]
    assert views.sources(conn, "x.pkg", "old", s.ids[2]) == [s.ids[0]]  # B serves old no longer
    assert views.published_names(conn, s.ids[0]) == {"x.pkg"}
    conn.close()
    c.append((4, available("x.pkg", "new", s.ids[1], 0)))
    conn = s.fold(name="m2.sqlite")
    assert views.sites_serving(conn, "x.pkg")[s.ids[2]] == "new"
    assert views.wanted(conn, s.ids[2], ["prod"]) == []
    # the superseded content is no longer live: no peer asks for its chunks
    assert views.local_content(conn, "old", s.ids[0]) is None
    assert views.served_content(conn, "x.pkg", "old").blake3 == "old"  # a download still open on it


def test_concurrent_replacements_resolve_as_concurrent_uploads_do_the_earliest_wins(tmp_path):
    s = Sites(tmp_path)
    a, b, c = s.logs
    a.append((1, uploaded("x.pkg", "v1")))
    c.append((3, replaced("x.pkg", "v1", "late", 1)))
    b.append((2, replaced("x.pkg", "v1", "early", 1)))
    conn = s.fold()
    assert views.package(conn, "x.pkg").blake3 == "early"
    assert [(x.blake3, x.winner) for x in views.conflicts(conn)] == [("late", "early")]
    # a later replacement of the winner (one generation up) is current, not the older loser
    a.append((5, replaced("x.pkg", "early", "v3", 2)))
    conn = s.fold(name="m2.sqlite")
    assert views.package(conn, "x.pkg").blake3 == "v3"


def test_replacing_back_to_an_older_content_and_deleting_after_a_replacement(tmp_path):
    s = Sites(tmp_path, 1)
    (a,) = s.logs
    a.append((1, uploaded("x.pkg", "v1")))
    a.append((2, replaced("x.pkg", "v1", "v2", 1)))
    a.append((3, replaced("x.pkg", "v2", "v1", 2)))
    conn = s.fold()
    assert views.package(conn, "x.pkg").blake3 == "v1"
    assert views.sites_serving(conn, "x.pkg") == {s.ids[0]: "v1"}
    assert views.conflicts(conn) == []
    a.append((4, ev.PackageDeleted(name="x.pkg", blake3="v1")))
    conn = s.fold(name="m2.sqlite")
    assert views.package(conn, "x.pkg") is None
    assert views.sites_serving(conn, "x.pkg") == {} and views.published_names(conn, s.ids[0]) == set()
    assert views.live_keys(conn) == set()


def cutover_commands():
    name = st.sampled_from(["x.pkg", "y.pkg"])
    c = st.sampled_from(["v1", "v2", "v3"])
    t = st.integers(0, 5)
    return st.lists(st.one_of(
        st.builds(lambda n, c, t: (t, uploaded(n, c)), name, c, t),
        st.builds(lambda n, o, c, g, t: (t, replaced(n, o, c, g)), name, c, c, st.integers(1, 3), t),
        st.builds(lambda n, c, t: (t, available(n, c, "sother", t)), name, c, t),
        st.builds(lambda n, c, t: (t, ev.PackageDeleted(name=n, blake3=c)), name, c, t),
        st.builds(lambda n, s, t: (t, ev.PackageStaged(name=n, stage=s)), name, st.sampled_from(["test", "prod"]), t),
    ), max_size=15)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cmds=st.lists(cutover_commands(), min_size=3, max_size=3), order=st.randoms(use_true_random=False))
def test_replacements_fold_to_the_same_model_in_any_interleaving(tmp_path_factory, cmds, order):
    """Live folds interleave the sites' streams however they arrive; a rebuild folds them one
    after the other: packages, conflicts and what each site serves must not care."""
    s = Sites(tmp_path_factory.mktemp("cut"))
    for log, cs in zip(s.logs, cmds):
        for cmd in cs:
            log.append(cmd)
    rebuilt = s.fold(name="rebuilt.sqlite")
    # an interleaving keeping each stream's own order
    queues = [list(range(len(log.msgs))) for log in s.logs]
    queues[0] = queues[0][len(s.keys):]
    offsets = [0, len(s.logs[0].msgs) - len(s.keys), len(s.logs[0].msgs) - len(s.keys) + len(s.logs[1].msgs)]
    merged = []
    while any(queues):
        i = order.choice([k for k, q in enumerate(queues) if q])
        j = queues[i].pop(0)
        merged.append(offsets[i] + (j - (len(s.keys) if i == 0 else 0)))
    live = s.fold(order=merged, name="live.sqlite")
    assert apply.dump(live) == apply.dump(rebuilt)
    for conn in (live, rebuilt):
        for name in ("x.pkg", "y.pkg"):
            serving = views.sites_serving(conn, name)
            assert set(serving) <= set(s.ids)
            if views.package(conn, name) is None:
                assert serving == {}


def test_a_download_names_the_content_of_the_file_it_opened_not_the_read_models_guess(tmp_path):
    """Between a swap (rename over) and the fold of its event the read model and the file
    disagree: the label on the opened inode decides the ETag (odst.gateway.downloads)."""
    import os

    from odst.gateway.downloads import _opened
    from odst.store.files import Store, tag

    s = Sites(tmp_path, 1)
    (a,) = s.logs
    a.append((1, uploaded("x.pkg", "old")))
    a.append((2, replaced("x.pkg", "old", "new", 1)))
    conn = s.fold()
    store = Store(tmp_path / "store")
    store.ensure()
    # what the read model said before the swap
    guess = views.ServedContent(key="x.pkg", name="x.pkg", size=5, blake3="old", sha1="s-old", uploaded_at=1)
    for label, expect in (("new", "new"), ("old", "old"), ("unknown-yet", "unknown-yet"), (None, "old")):
        temp = store.new_temp()
        temp.write_bytes(b"bytes")
        if label:
            tag(temp, label)
        store.replace(temp, "x.pkg")
        fd = os.open(store.path("x.pkg"), os.O_RDONLY)
        try:
            assert _opened(conn, "x.pkg", fd, guess).blake3 == expect
        finally:
            os.close(fd)
    # a label survives the swap into packages/, and swap_back restores the previous file
    temp = store.new_temp()
    temp.write_bytes(b"newer")
    backup = store.swap(temp, "x.pkg")
    assert store.path("x.pkg").read_bytes() == b"newer" and backup.read_bytes() == b"bytes"
    store.swap_back(backup, "x.pkg")
    assert store.path("x.pkg").read_bytes() == b"bytes" and not backup.exists()


def test_a_replacement_in_a_stage_a_site_does_not_accept_leaves_it_serving_the_old_version(tmp_path):
    s = Sites(tmp_path, 2)
    a, b = s.logs
    a.append((1, uploaded("x.pkg", "v1")))
    b.append((2, available("x.pkg", "v1", s.ids[0], 0)))
    a.append((3, replaced("x.pkg", "v1", "v2", 1, stage="test")))
    conn = s.fold()
    assert views.package(conn, "x.pkg").stage == "test"
    assert views.wanted(conn, s.ids[1], ["prod"]) == []  # B replicates prod only: it does not pull v2 ...
    assert views.servable(conn, "x.pkg", s.ids[1]).blake3 == "v1"  # ... and keeps serving v1
    a.append((4, ev.PackageStaged(name="x.pkg", stage="prod")))
    conn = s.fold(name="m2.sqlite")
    assert [r["blake3"] for r in views.wanted(conn, s.ids[1], ["prod"])] == ["v2"]  # promoted: now it does
