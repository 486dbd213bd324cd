"""Which packages the Jamf sync may write (odst.jamf.sync.ready_packages): a record's hash is the
content every counting site SERVES (the view 'serving'), not the content a site once reported
available: during a replacement, and after replacing back to an older content, the two differ."""

from __future__ import annotations

from odst.events import catalogue as ev
from odst.jamf.sync import package_state, ready_packages
from tests.unit.test_replace import Sites, available, replaced, uploaded


def ready(conn, s) -> list[tuple[str, str]]:
    return [(r["name"], r["blake3"]) for r in ready_packages(conn, s.ids[0], ["prod"], "prod", 0)]


def test_a_replacement_is_ready_only_once_the_last_site_serves_it(tmp_path):
    s = Sites(tmp_path)
    a, b, c = s.logs
    a.append((1, uploaded("x.pkg", "v1")))
    b.append((2, available("x.pkg", "v1", s.ids[0], 0)))
    c.append((2, available("x.pkg", "v1", s.ids[0], 0)))
    assert ready(s.fold(name="1.sqlite"), s) == [("x.pkg", "v1")]
    b.append((3, replaced("x.pkg", "v1", "v2", 1)))
    a.append((4, available("x.pkg", "v2", s.ids[1], 0)))
    assert ready(s.fold(name="2.sqlite"), s) == []  # C still serves v1
    c.append((5, available("x.pkg", "v2", s.ids[1], 0)))
    assert ready(s.fold(name="3.sqlite"), s) == [("x.pkg", "v2")]


def test_replacing_back_to_an_older_content_waits_for_every_site_to_serve_it_again(tmp_path):
    """A and C reported v1 available long ago, then swapped to v2: their old reports must not
    count for v1, or Jamf Pro would hold v1's hash while Macs there get v2 ("could not be verified")."""
    s = Sites(tmp_path)
    a, b, c = s.logs
    a.append((1, uploaded("x.pkg", "v1")))
    b.append((2, available("x.pkg", "v1", s.ids[0], 0)))
    c.append((2, available("x.pkg", "v1", s.ids[0], 0)))
    b.append((3, replaced("x.pkg", "v1", "v2", 1)))
    a.append((4, available("x.pkg", "v2", s.ids[1], 0)))
    c.append((4, available("x.pkg", "v2", s.ids[1], 0)))
    b.append((5, replaced("x.pkg", "v2", "v1", 2)))
    conn = s.fold()
    assert ready(conn, s) == []  # only B serves v1 again
    a.append((6, available("x.pkg", "v1", s.ids[1], 0)))
    c.append((6, available("x.pkg", "v1", s.ids[1], 0)))
    assert ready(s.fold(name="2.sqlite"), s) == [("x.pkg", "v1")]


def test_a_quorum_counts_serving_sites_too(tmp_path):
    s = Sites(tmp_path)
    a, b, c = s.logs
    a.append((1, uploaded("x.pkg", "v1")))
    b.append((2, available("x.pkg", "v1", s.ids[0], 0)))
    b.append((3, replaced("x.pkg", "v1", "v2", 1)))
    conn = s.fold()
    assert [r["blake3"] for r in ready_packages(conn, s.ids[0], ["prod"], "prod", 1)] == ["v2"]
    assert ready_packages(conn, s.ids[0], ["prod"], "prod", 2) == []


def synced(c: str) -> ev.JamfPackageSynced:
    return ev.JamfPackageSynced(name="x.pkg", blake3=c, file_name="x.pkg", record_id="7", hash_type="SHA_512",
                                hash_value="x" + c, size=len(c), action="updated", created_by_odst=True)


def test_the_package_page_says_jamf_pro_holds_the_previous_version_until_the_hash_moves(tmp_path):
    s = Sites(tmp_path)
    a, b, c = s.logs
    a.append((1, uploaded("x.pkg", "v1")))
    a.append((2, synced("v1")))
    assert package_state(s.fold(name="1.sqlite"), "x.pkg")["state"] == "in_sync"
    b.append((3, replaced("x.pkg", "v1", "v2", 1)))
    st = package_state(s.fold(name="2.sqlite"), "x.pkg")
    assert st["state"] == "previous_version" and "previous version" in st["detail"] and st["blake3"] == "v1"
    a.append((4, synced("v2")))
    assert package_state(s.fold(name="3.sqlite"), "x.pkg")["state"] == "in_sync"
