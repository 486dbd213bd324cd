"""Package lists at scale and the site's name, read from a real read model folded from signed
events (no server): pages, sort orders, exact names, chunk hashes only on request; the last
SiteRenamed wins; the live feed's brief form."""

from __future__ import annotations

import json

import msgspec
import pytest

from odst.events import catalogue as ev
from odst.events.log import StoredMessage
from odst.events.signing import SiteKey
from odst.gateway.events import _brief
from odst.gateway.settings import check_site_name
from odst.errors import RequestInvalid
from odst.projections import apply, db, views
from tests.unit.test_projection import Log


@pytest.fixture
def model(tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    log = Log(key, SiteKey.load_or_create(tmp_path / "mallory.key"))
    for i, (name, size, stage) in enumerate([("b.pkg", 30, "prod"), ("A.pkg", 10, "test"), ("c.dmg", 20, "prod")]):
        log.append(ev.PackageUploaded(name=name, size=size, sha1=f"s{i}", sha512=f"x{i}", blake3=f"b{i}",
                                      chunk_size=1 << 20, chunks=[f"c{i}"] * (i + 1), stage=stage))
    log.append(ev.SiteRenamed(name="First"))
    log.append(ev.SiteRenamed(name="Berlin office"))
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    writer = apply.ReadModelWriter(conn, {key.site_id: key.public_key})
    for m in log.msgs:
        assert writer.fold(m).applied
    return conn, key.site_id


def test_a_page_of_packages_has_no_chunk_hashes_unless_asked(model):
    conn, site = model
    rows = views.packages(conn, limit=2)
    assert [r.name for r in rows] == ["A.pkg", "b.pkg"]  # binary order: upper case first
    assert all(not hasattr(r, "chunks") for r in rows) and [r.chunk_count for r in rows] == [2, 1]
    assert rows[0].availability[site].status == "available"
    assert [r.name for r in views.packages(conn, limit=2, offset=2)] == ["c.dmg"]
    assert views.packages(conn, names=["c.dmg"], chunks=True)[0].chunks == ["c2"] * 3
    assert views.package_count(conn) == 3 and views.package_count(conn, stage="prod") == 2
    assert views.package_count(conn, q="PKG") == 2


@pytest.mark.parametrize("sort,descending,expected", [
    ("size", True, ["b.pkg", "c.dmg", "A.pkg"]), ("size", False, ["A.pkg", "c.dmg", "b.pkg"]),
    ("stage", False, ["b.pkg", "c.dmg", "A.pkg"]), ("stage", True, ["A.pkg", "c.dmg", "b.pkg"]),
])
def test_sort_orders_break_ties_by_name_in_the_same_direction(model, sort, descending, expected):
    conn, _ = model
    assert [r.name for r in views.packages(conn, sort=sort, descending=descending)] == expected


def test_an_unknown_sort_column_is_refused_not_interpolated(model):
    with pytest.raises(ValueError):
        views.packages(model[0], sort="name; DROP TABLE contents")


def test_the_last_rename_is_the_name(model):
    conn, site = model
    assert views.site_names(conn)[site].name == "Berlin office"


@pytest.mark.parametrize("bad", ["", "   ", "x" * 101, "two\nlines", "tab\there", "nul\x00", "c1\x85c1", "rtl\u202eoverride"])
def test_a_site_name_needs_words_without_control_characters(bad):
    with pytest.raises(RequestInvalid):
        check_site_name(bad)


def test_a_site_name_is_trimmed():
    assert check_site_name("  Café Zürich  ") == "Café Zürich"


def test_the_brief_feed_drops_signature_and_chunks_only():
    whole = {"position": 7, "type": "PackageUploaded", "signed": "AAAA",
             "envelope": {"id": "e", "event": {"type": "PackageUploaded", "name": "a.pkg", "chunks": ["1", "2"]}}}
    brief = _brief(whole)
    assert brief["brief"] is True and "signed" not in brief and brief["position"] == 7
    assert brief["envelope"]["event"] == {"type": "PackageUploaded", "name": "a.pkg", "chunk_count": 2}
    assert whole["envelope"]["event"]["chunks"] == ["1", "2"]  # the original is left alone


def test_a_package_answers_with_the_keys_the_api_always_sent_in_that_order(model):
    """Views return structs; the gateway sends them as they are, so their field order is the JSON's."""
    conn, site = model
    whole = json.loads(msgspec.json.encode(views.package(conn, "a.PKG")))
    assert list(whole) == ["name", "size", "sha1", "sha512", "blake3", "chunk_size", "chunks", "stage", "origin",
                           "uploaded_at", "uploaded_by", "updated_at", "generation", "chunk_count",
                           "availability", "serving"]
    assert whole["availability"] == {site: {"status": "available", "detail": "", "updated_at": 1_700_000_000_002}}
    assert whole["serving"] == {site: "b1"} and whole["chunk_count"] == 2
    row = json.loads(msgspec.json.encode(views.packages(conn, names=["A.pkg"])[0]))
    assert list(row) == ["name", "size", "sha1", "sha512", "blake3", "chunk_size", "chunk_count", "stage", "origin",
                         "uploaded_at", "uploaded_by", "updated_at", "availability"]
    assert list(json.loads(msgspec.json.encode(views.packages(conn, names=["A.pkg"], chunks=True)[0]))) == \
        list(whole)[:-1]  # no serving in a list


@pytest.mark.parametrize("struct, table, left_out", [
    (views.Token, "tokens", {"token_sha256", "site"}), (views.NatsCredential, "nats_credentials", set()),
    (views.Webhook, "webhooks", set()), (views.EmailSubscription, "email_subscriptions", set()),
    (views.User, "users", {"password_sealed", "removed_at"}), (views.Conflict, "conflicts", set()),
    (views.SiteChain, "sites", set()), (views.Removal, "removals", {"clock"})])
def test_a_row_struct_has_its_tables_columns_in_their_order(model, struct, table, left_out):
    """What the API sent as the row's columns, before views returned structs: same keys, same order."""
    columns = [r[1] for r in model[0].execute(f"PRAGMA table_info({table})") if r[1] not in left_out]
    assert list(struct.__struct_fields__) == columns


def test_the_sources_of_many_packages_are_each_ones_sources(tmp_path, monkeypatch):
    """``sources_of`` answers for many packages what ``sources`` answers for each: per name
    spelling asked, per content, other sites only, across queries of a few keys each."""
    here, peer, other = (SiteKey.load_or_create(tmp_path / f"{n}.key") for n in ("here", "peer", "other"))
    trusted = {k.site_id: k.public_key for k in (here, peer, other)}
    conn = db.open_read_model(tmp_path / "rm.sqlite")
    writer = apply.ReadModelWriter(conn, trusted)
    logs = {k.site_id: Log(k, SiteKey.load_or_create(tmp_path / "mallory.key")) for k in (here, peer, other)}

    def upload(site, i, name):
        logs[site.site_id].append(ev.PackageUploaded(name=name, size=1, sha1="s", sha512="x", blake3=f"b{i}",
                                                     chunk_size=1 << 20, chunks=["c"]))
    for i in range(7):
        upload(peer, i, f"P{i}.pkg")
        if i % 2:
            upload(other, i, f"P{i}.pkg")  # two holders
    upload(here, 3, "P3.pkg")  # held here too: never its own source
    for site_log in logs.values():
        for m in site_log.msgs:
            assert writer.fold(StoredMessage(site_log.key.site_id, m.seq, m.subject, m.payload)).applied
    pairs = [(f"P{i}.pkg", f"b{i}") for i in range(7)] + [("p5.PKG", "b5"), ("P2.pkg", "b9"), ("Q.pkg", "b1")]
    monkeypatch.setattr(views, "IN_PER_QUERY", 2)  # several queries
    got = views.sources_of(conn, pairs, here.site_id)
    assert got == {p: views.sources(conn, *p, here.site_id) for p in pairs if views.sources(conn, *p, here.site_id)}
    assert got[("P5.pkg", "b5")] == got[("p5.PKG", "b5")] == sorted([peer.site_id, other.site_id])
    assert ("P2.pkg", "b9") not in got and ("Q.pkg", "b1") not in got
