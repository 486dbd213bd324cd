"""The upload rules as pure decisions (odst.events.uploads), no server needed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from odst.events import uploads
from odst.projections import views
from odst.store.hashing import manifest_of as manifest_of_pieces

SITE = "shere"


def manifest_of(data: bytes):
    return manifest_of_pieces([data])


def package_of(data: bytes, *, name: str = "a.pkg", held_at: tuple[str, ...] = (), stage: str = "prod",
               generation: int = 0, origin: str = "sother") -> views.Package:
    """What views.package gives for ``data`` under ``name``, held (available) at ``held_at``."""
    m = manifest_of(data)
    held = views.Availability(status="available", detail="", updated_at=1)
    return views.Package(name=name, size=m.size, sha1=m.sha1, sha512=m.sha512, blake3=m.blake3,
                         chunk_size=m.chunk_size, chunks=list(m.chunks), stage=stage, origin=origin,
                         uploaded_at=1, uploaded_by="admin", updated_at=1, generation=generation,
                         chunk_count=len(m.chunks), availability={site: held for site in held_at})


def existing(data: bytes, *, here: bool, name: str = "a.pkg", origin: str = "sother") -> views.Package:
    return package_of(data, name=name, held_at=(SITE if here else "sother",), origin=origin)


def admit(length, existing=None, *, max_bytes=100, free=1000, reserve=10):
    return uploads.admit_upload("a.pkg", length, existing, max_bytes=max_bytes, free_bytes=free,
                                reserve_bytes=reserve)


def test_admission_before_the_body():
    assert admit(50) is None
    assert isinstance(admit(101), uploads.TooLarge)
    assert isinstance(admit(50, free=55), uploads.NoSpace)  # 50 + the reserve does not fit
    assert admit(None) is None  # no Content-Length: decided as the bytes come
    assert isinstance(admit(None, free=10), uploads.NoSpace)
    assert isinstance(admit(50, existing(b"x" * 40, here=True)), uploads.Conflict)
    assert admit(40, existing(b"x" * 40, here=True)) is None  # same size: may be the same content


def test_the_same_content_already_here_is_identical_elsewhere_published_and_other_content_refused():
    data = b"package bytes"
    m = manifest_of(data)
    assert isinstance(uploads.accept_upload("a.pkg", "prod", m, None, SITE), uploads.Uploaded)
    same_here = uploads.accept_upload("a.pkg", "prod", m, existing(data, here=True), SITE)
    assert isinstance(same_here, uploads.Identical) and same_here.existing.sha1 == m.sha1
    # known, not yet held here (still replicating): the upload publishes it
    assert isinstance(uploads.accept_upload("a.pkg", "prod", m, existing(data, here=False), SITE),
                      uploads.Uploaded)
    other = uploads.accept_upload("a.pkg", "prod", m, existing(b"other bytes", here=False), SITE)
    assert isinstance(other, uploads.Conflict) and "a different package named 'a.pkg'" in other.detail


def test_the_event_is_the_manifest_of_the_bytes_received():
    data = bytes(range(256)) * 5000
    m = manifest_of(data)
    event = uploads.accept_upload("b.pkg", "test", m, None, SITE).event
    assert (event.name, event.stage, event.size, event.sha1, event.sha512, event.blake3, event.chunks) == \
        ("b.pkg", "test", m.size, m.sha1, m.sha512, m.blake3, list(m.chunks))


def test_losing_a_race_names_the_winner():
    m = manifest_of(b"mine")
    assert uploads.lost_race("c.pkg", m, existing(b"mine", here=True, name="c.pkg", origin=SITE)) is None
    lost = uploads.lost_race("c.pkg", m, existing(b"theirs", here=False, name="c.pkg", origin="sfirst"))
    assert isinstance(lost, uploads.Conflict) and "at site sfirst" in lost.detail


@given(st.binary(max_size=2048), st.binary(max_size=2048), st.booleans())
def test_other_content_under_a_name_is_never_published(mine, theirs, here):
    decision = uploads.accept_upload("d.pkg", "prod", manifest_of(mine), existing(theirs, here=here, name="d.pkg"),
                                      SITE)
    if manifest_of(mine).blake3 != manifest_of(theirs).blake3:
        assert isinstance(decision, uploads.Conflict)
    else:
        assert isinstance(decision, uploads.Identical if here else uploads.Uploaded)


@given(st.sampled_from(["A.pkg", "a.PKG", "A.PKG"]), st.booleans(), st.booleans())
def test_another_spelling_of_an_existing_name_is_refused_naming_that_spelling(spelling, same, here):
    """Case (and Unicode normalisation) do not count: the existing spelling is named, whatever
    the content, before the body (admit) and after it (accept)."""
    data = b"package bytes"
    held = existing(data if same else b"other", here=here, name="a.pkg")
    before = uploads.admit_upload(spelling, len(data), held, max_bytes=100, free_bytes=1000, reserve_bytes=10)
    after = uploads.accept_upload(spelling, "prod", manifest_of(data), held, SITE)
    for decision in (before, after):
        assert isinstance(decision, uploads.Conflict) and "a package named 'a.pkg' exists" in decision.detail
        assert repr(spelling) in decision.detail
