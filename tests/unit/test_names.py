"""Names compare as a Mac compares them (odst.naming.name_key), in the read model too."""

from __future__ import annotations

import sqlite3
import unicodedata
from pathlib import Path

from hypothesis import given, strategies as st

from odst.events import catalogue as ev
from odst.events.signing import SiteKey
from odst.naming import name_key
from odst.projections import apply, db, views
from tests.unit.test_projection import Log

# names as admins write them: letters with and without accents, digits, spaces, punctuation
NAME_CHARS = st.characters(codec="utf-8", categories=("L", "M", "N", "P", "Zs", "S"))
names = st.text(NAME_CHARS, min_size=1, max_size=40)


@given(st.text())
def test_the_key_is_a_fixed_point(name):
    assert name_key(name_key(name)) == name_key(name)


@given(names, st.lists(st.booleans(), min_size=40, max_size=40), st.sampled_from(["NFC", "NFD"]))
def test_spellings_a_mac_confuses_have_one_key(name, upper, form):
    """Any mix of case and either Unicode normalisation of a name: one key. (Only case pairs that
    fold together: 'ı'.upper() is 'I', whose fold is 'i', and no Mac takes 'ı' for 'i' either.)"""
    def flip(c: str, up: bool) -> str:
        if not (c.upper().casefold() == c.lower().casefold() == c.casefold()):
            return c
        return c.upper() if up else c.lower()
    variant = "".join(flip(c, up) for c, up in zip(name, upper))
    assert name_key(unicodedata.normalize(form, variant)) == name_key(name)


@given(st.text("abcdefghijklmnopqrstuvwxyz0123456789 ._-", min_size=1, max_size=20),
       st.text("abcdefghijklmnopqrstuvwxyz0123456789 ._-", min_size=1, max_size=20))
def test_names_that_differ_in_more_than_case_stay_distinct(a, b):
    assert (name_key(a) == name_key(b)) == (a == b)
    assert (name_key(a.upper()) == name_key(b)) == (a == b)


def test_examples():
    nfc, nfd = "Caf\u00e9.pkg", "Cafe\u0301.pkg"
    assert name_key(nfc) == name_key(nfd) == name_key("CAF\u00c9.PKG")
    assert name_key("Offline.pkg") == name_key("OFFLINE.PKG") == "offline.pkg"
    assert name_key("Cafe.pkg") != name_key(nfc)  # accents count, as on every Mac file system
    assert unicodedata.is_normalized("NFD", name_key(nfc))  # what HFS+ stores, APFS hashes by


def upload(name: str, content: str, stage: str = "prod") -> ev.PackageUploaded:
    return ev.PackageUploaded(name=name, size=len(content), sha1="s" + content, sha512="x" + content,
                              blake3=content, chunk_size=1 << 20, chunks=["c"], stage=stage)


def fold(path: Path, log: Log, key: SiteKey) -> sqlite3.Connection:
    conn = db.open_read_model(path)
    folder = apply.ReadModelWriter(conn, {key.site_id: key.public_key})
    for m in log.msgs:
        assert folder.fold(m).applied
    return conn


def test_spellings_that_were_two_packages_are_one_and_the_other_is_reported(tmp_path):
    """A log written before the rule (two uploads whose names differ only in case and in
    normalisation): the rebuild keeps the earliest upload and reports the others."""
    key = SiteKey.load_or_create(tmp_path / "k")
    log = Log(key, key)
    log.append(upload("Offline.pkg", "b3-a"))
    log.append(upload("offline.PKG", "b3-b", stage="test"))
    log.append(upload("Caf\u00e9.pkg", "b3-c"))
    log.append(upload("Cafe\u0301.pkg", "b3-c"))  # the same bytes under the NFD spelling
    conn = fold(tmp_path / "m.sqlite", log, key)
    listed = views.packages(conn)
    assert [p.name for p in listed] == ["Caf\u00e9.pkg", "Offline.pkg"]
    for spelling in ("OFFLINE.PKG", "offline.pkg", "Offline.pkg"):
        assert views.package(conn, spelling).blake3 == "b3-a"
    # this site's latest report is of the later upload: its one file holds that (view 'serving')
    # until, at start-up, it keeps the current package's file and says so again
    assert views.servable(conn, "OFFLINE.PKG", key.site_id).name == "offline.PKG"
    assert views.adoption_targets(conn, key.site_id)[name_key("Offline.pkg")] == "b3-a"
    log.append(ev.PackageAvailable(name="Offline.pkg", size=4, sha1="sb3-a", sha512="xb3-a", blake3="b3-a",
                                   chunk_size=1 << 20, chunks=["c"], stage="prod", origin=key.site_id,
                                   uploaded_ts=1, uploaded_by="t"))
    conn = fold(tmp_path / "m1.sqlite", log, key)
    for spelling in ("OFFLINE.PKG", "offline.pkg", "Offline.pkg"):
        assert views.servable(conn, spelling, key.site_id).name == "Offline.pkg"
    assert views.package(conn, "cafe\u0301.PKG").name == "Caf\u00e9.pkg"
    collisions = {c.kept: c for c in views.name_collisions(conn)}
    assert collisions["Offline.pkg"].others == [views.Spelling(name="offline.PKG", blake3="b3-b", same_content=False)]
    assert collisions["Caf\u00e9.pkg"].others == [views.Spelling(name="Cafe\u0301.pkg", blake3="b3-c", same_content=True)]
    assert [(c.name, c.winner_name) for c in views.conflicts(conn)] == [("offline.PKG", "Offline.pkg")]
    # deleting the kept package under any spelling ends that collision: the other content is current
    log.append(ev.PackageDeleted(name="OFFLINE.pkg", blake3="b3-a"))
    conn = fold(tmp_path / "m2.sqlite", log, key)
    assert views.package(conn, "Offline.pkg").name == "offline.PKG"
    assert [c.kept for c in views.name_collisions(conn)] == ["Caf\u00e9.pkg"]


def test_a_stage_change_under_any_spelling_is_the_packages(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "k")
    log = Log(key, key)
    log.append(upload("Offline.pkg", "b3-a", stage="test"))
    log.append(ev.PackageStaged(name="OFFLINE.PKG", stage="prod"))
    conn = fold(tmp_path / "m.sqlite", log, key)
    assert views.package(conn, "offline.pkg").stage == "prod"
    assert views.servable(conn, "Offline.pkg", key.site_id, ["test"]) is None  # withdrawn there
    assert views.servable(conn, "Offline.pkg", key.site_id, ["prod"]) is not None


PACKAGE_TABLES = ("contents", "spellings", "availability", "tombstones", "stage_changes")


def test_the_migration_regroups_an_existing_read_model_as_a_rebuild_would(tmp_path):
    """014_names on a read model folded before it (rows keyed by spelling, written here as the
    old fold wrote them) equals a rebuild of the same log under the new rule."""
    key = SiteKey.load_or_create(tmp_path / "k")
    log = Log(key, key)
    log.append(upload("Offline.pkg", "b3-a"))              # ts ...001
    log.append(upload("offline.PKG", "b3-b", stage="test"))  # ts ...002
    log.append(ev.PackageStaged(name="offline.PKG", stage="prod"))  # ts ...003
    log.append(upload("Other.dmg", "b3-a"))                # ts ...004
    log.append(ev.PackageDeleted(name="Other.dmg", blake3="b3-a"))  # ts ...005
    site = key.site_id
    rebuilt = fold(tmp_path / "rebuilt.sqlite", log, key)

    old = sqlite3.connect(tmp_path / "old.sqlite", isolation_level=None)
    sql = sorted(p for p in (Path(db.__file__).parent / "sql").glob("*.sql") if int(p.name[:3]) <= 7)
    for f in sql:
        for statement in db._statements(f.read_text()):
            old.execute(statement)
    old.execute("PRAGMA user_version=7")
    clock = lambda n: apply.clock(1_700_000_000_000 + n, site)  # noqa: E731 (Log's timestamps)
    for name, b3, n, stage in (("Offline.pkg", "b3-a", 1, "prod"), ("offline.PKG", "b3-b", 2, "test"),
                               ("Other.dmg", "b3-a", 4, "prod")):
        old.execute("INSERT INTO contents VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (name, b3, len(b3), "s" + b3, "x" + b3, 1 << 20, '["c"]', site, 1_700_000_000_000 + n, "t",
                     clock(n), f"{clock(n)}|0|{stage}", clock(n), f"{clock(n)}|1|{stage}", stage))
        old.execute("INSERT INTO availability VALUES (?,?,?,?,?,?)", (name, b3, site, "available", "", clock(n)))
    old.execute("INSERT INTO stage_changes VALUES (?,?,?)", ("offline.PKG", clock(3), "prod"))
    old.execute("INSERT INTO tombstones VALUES (?,?,?,?,?,?)",
                ("Other.dmg", "b3-a", clock(5), site, 1_700_000_000_005, "t"))
    old.close()
    migrated = db.open_read_model(tmp_path / "old.sqlite")
    a, b = apply.dump(migrated), apply.dump(rebuilt)
    for table in PACKAGE_TABLES:
        assert a[table] == b[table], table
    for view in ("packages", "conflicts", "name_collisions"):
        assert sorted(map(tuple, migrated.execute(f"SELECT * FROM {view}"))) == \
            sorted(map(tuple, rebuilt.execute(f"SELECT * FROM {view}"))), view


def test_the_migration_keys_what_replace_and_scrub_added_as_a_rebuild_would(tmp_path):
    """014_names on a read model of 012 (replace-in-place and the scrub keyed by spelling): the
    generation, `replacements`, `damaged` and the view `serving` equal a rebuild's."""
    key = SiteKey.load_or_create(tmp_path / "k")
    log = Log(key, key)
    log.append(upload("Offline.pkg", "b3-a"))  # ts ...001
    log.append(ev.PackageReplaced(name="Offline.pkg", size=4, sha1="sb3-c", sha512="xb3-c", blake3="b3-c",
                                  chunk_size=1 << 20, chunks=["c"], stage="prod", replaces="b3-a",
                                  generation=1))  # ts ...002
    log.append(upload("offline.PKG", "b3-b", stage="test"))  # ts ...003
    log.append(ev.PackageDamaged(name="Offline.pkg", blake3="b3-c", reason="rot", found_by="scrub"))  # ...004
    site = key.site_id
    rebuilt = fold(tmp_path / "rebuilt.sqlite", log, key)

    old = sqlite3.connect(tmp_path / "old.sqlite", isolation_level=None)
    for f in sorted(p for p in (Path(db.__file__).parent / "sql").glob("*.sql") if int(p.name[:3]) <= 12):
        for statement in db._statements(f.read_text()):
            old.execute(statement)
    old.execute("PRAGMA user_version=12")
    clock = lambda n: apply.clock(1_700_000_000_000 + n, site)  # noqa: E731 (Log's timestamps)
    for name, b3, n, stage, generation in (("Offline.pkg", "b3-a", 1, "prod", 0), ("Offline.pkg", "b3-c", 2, "prod", 1),
                                           ("offline.PKG", "b3-b", 3, "test", 0)):
        old.execute("INSERT INTO contents VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (name, b3, len(b3), "s" + b3, "x" + b3, 1 << 20, '["c"]', site, 1_700_000_000_000 + n, "t",
                     clock(n), f"{clock(n)}|0|{stage}", clock(n), f"{clock(n)}|1|{stage}", stage, generation))
    for name, b3, status, detail, n in (("Offline.pkg", "b3-a", "available", "", 1),
                                        ("Offline.pkg", "b3-c", "failed", "rot", 4),
                                        ("offline.PKG", "b3-b", "available", "", 3)):
        old.execute("INSERT INTO availability VALUES (?,?,?,?,?,?)", (name, b3, site, status, detail, clock(n)))
    old.execute("INSERT INTO replacements VALUES (?,?,?,?,?,?,?)",
                ("Offline.pkg", "b3-a", clock(2), "b3-c", site, 1_700_000_000_002, "t"))
    old.execute("INSERT INTO damaged VALUES (?,?,?,?,?,?)", ("Offline.pkg", "b3-c", site, "rot", "scrub", clock(4)))
    old.close()
    migrated = db.open_read_model(tmp_path / "old.sqlite")
    a, b = apply.dump(migrated), apply.dump(rebuilt)
    for table in (*PACKAGE_TABLES, "replacements", "damaged"):
        assert a[table] == b[table], table
    for view in ("packages", "conflicts", "name_collisions", "serving"):
        assert sorted(map(tuple, migrated.execute(f"SELECT * FROM {view}"))) == \
            sorted(map(tuple, rebuilt.execute(f"SELECT * FROM {view}"))), view
    assert views.package(migrated, "OFFLINE.PKG").generation == 1
    assert views.is_damaged(migrated, "offline.pkg", site)
