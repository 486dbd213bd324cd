"""Which packages the Jamf sync may write (odst.jamf.sync.ready_packages): a record's hash is the
content every counting site SERVES (the view 'serving'), not the content a site once reported
available: during a replacement, and after replacing back to an older content, the two differ."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from hypothesis import given, settings, strategies as st

from odst.config import Settings
from odst.events import catalogue as ev
from odst.jamf.client import JamfError
from odst.jamf.digests import Digests, digests_path, extra_types
from odst.jamf.sync import Deps, JamfService, package_state, ready_packages
from odst.store.hashing import ManifestHasher, manifest_of
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


# ------------------------------------------------------------------ MD5 / SHA3_512 in the upload's pass


@settings(max_examples=40, deadline=None)
@given(pieces=st.lists(st.binary(max_size=3000), max_size=6), types=st.sets(st.sampled_from(["MD5", "SHA3_512", "SHA_512"])))
def test_the_extra_digests_are_hashlibs_and_leave_the_manifest_as_it_was(pieces, types):
    plain, extra = ManifestHasher(1024), ManifestHasher(1024, types)
    data = b"".join(pieces)
    for i in range(0, max(len(data), 1), 1024):
        plain.add_block(data[i:i + 1024])
        extra.add_block(data[i:i + 1024])
    assert extra.manifest() == plain.manifest()
    want = {"MD5": hashlib.md5(data).hexdigest(), "SHA3_512": hashlib.sha3_512(data).hexdigest()}
    assert extra.extra_digests() == {t: want[t] for t in types if t != "SHA_512"}


def service(tmp_path, hash_type: str, files: dict[str, bytes]) -> tuple[JamfService, Digests]:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    digests = Digests(digests_path(tmp_path))

    async def nothing(*_):
        return None

    deps = Deps(settings=Settings(jamf_hash_type=hash_type), site_id="s", reader=None, accepted_stages=list,
                append=nothing, store_path=lambda n: tmp_path / n, wait_changed=nothing, digests=digests)
    return JamfService(deps), digests


def row(name: str, data: bytes) -> dict:
    return {"name": name, "blake3": manifest_of([data]).blake3, "size": len(data), "sha512": "", "stage": "prod",
            "uploaded_by": "t"}


def test_the_sync_takes_the_uploads_digest_and_reads_the_file_only_when_it_has_none(tmp_path):
    data = os.urandom(5000)
    svc, digests = service(tmp_path, "SHA3_512", {})
    digests.put(row("a.pkg", data)["blake3"], {"SHA3_512": "ab" * 64})
    # no file in the store: the value can only come from the upload's pass
    assert asyncio.run(svc.wanted(row("a.pkg", data))).hash_value == "ab" * 64

    other = tmp_path / "other-site"
    other.mkdir()
    svc, digests = service(other, "MD5", {"b.pkg": data})  # uploaded elsewhere: no digest here yet
    assert asyncio.run(svc.wanted(row("b.pkg", data))).hash_value == hashlib.md5(data).hexdigest()
    assert digests.get(row("b.pkg", data)["blake3"], "MD5") == hashlib.md5(data).hexdigest()  # kept for next time
    assert oct(digests.path.stat().st_mode & 0o777) == "0o600"
    svc, _ = service(other, "MD5", {})
    with pytest.raises(JamfError, match="needs this site's copy"):
        asyncio.run(svc.wanted(row("c.pkg", b"other")))


def test_only_a_configured_jamf_pro_with_another_hash_type_costs_the_upload_a_digest():
    assert extra_types("", "MD5") == ()
    assert extra_types("https://jamf", "SHA_512") == ()
    assert extra_types("https://jamf", "SHA3_512") == ("SHA3_512",)
