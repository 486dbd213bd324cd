"""Envelopes: deterministic encoding, signatures that catch any change, chain hashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.signing import SignatureInvalid, SiteKey, site_id_for


@pytest.fixture(scope="module")
def key(tmp_path_factory):
    return SiteKey.load_or_create(tmp_path_factory.mktemp("k") / "site.key")


def envelope(key, seq=1, prev="", event=None):
    return codec.Envelope(id=codec.new_event_id(), origin=key.site_id, seq=seq, prev=prev,
                          ts=codec.now_ms(), actor="test",
                          event=event or ev.PackageUploaded(name="a.pkg", size=3, sha1="s", sha512="t",
                                                            blake3="b", chunk_size=1 << 20, chunks=["c"]))


def test_round_trip(key):
    env = envelope(key)
    payload = codec.seal(env, key)
    assert codec.open_signed(payload, key.public_key) == env
    assert codec.seal(env, key) == payload  # deterministic: the same bytes every time


@settings(max_examples=200)
@given(st.data())
def test_any_altered_byte_is_caught(key, data):
    payload = bytearray(codec.seal(envelope(key), key))
    i = data.draw(st.integers(0, len(payload) - 1))
    flip = data.draw(st.integers(1, 255))
    payload[i] ^= flip
    with pytest.raises(SignatureInvalid):
        codec.open_signed(bytes(payload), key.public_key)


def test_other_key_does_not_verify(key, tmp_path):
    other = SiteKey.load_or_create(tmp_path / "other.key")
    payload = codec.seal(envelope(other), other)
    with pytest.raises(SignatureInvalid):
        codec.open_signed(payload, key.public_key)


def test_truncated_payload_is_rejected(key):
    payload = codec.seal(envelope(key), key)
    for n in (0, 10, 63, 64, len(payload) - 1):
        with pytest.raises(SignatureInvalid):
            codec.open_signed(payload[:n], key.public_key)


def test_signed_garbage_is_invalid_not_a_crash(key):
    with pytest.raises(codec.EnvelopeInvalid):
        codec.open_signed(key.sign(b'{"not": "an envelope"}'), key.public_key)


def test_chain_hash_changes_with_content(key):
    a = codec.seal(envelope(key, 1), key)
    b = codec.seal(envelope(key, 2, prev=codec.chain_hash(a)), key)
    assert codec.chain_hash(a) != codec.chain_hash(b)
    assert codec.open_signed(b, key.public_key).prev == codec.chain_hash(a)


def test_key_file_is_private_and_stable(tmp_path):
    k1 = SiteKey.load_or_create(tmp_path / "site.key")
    assert (tmp_path / "site.key").stat().st_mode & 0o777 == 0o600
    k2 = SiteKey.load_or_create(tmp_path / "site.key")
    assert k1.public_key == k2.public_key and k1.site_id == k2.site_id


def test_site_id_is_a_safe_subject_token_and_domain(key):
    sid = site_id_for(key.public_key)
    assert sid == key.site_id
    assert len(sid) == 17 and sid[0] == "s" and sid.isalnum() and sid.islower()


def test_every_event_type_round_trips(key):
    samples = [
        ev.SiteFounded(site="s", public_key="00", name="n"),
        ev.PackageStaged(name="a.pkg", stage="test", previous="prod"),
        ev.PackageDeleted(name="a.pkg", blake3="b"),
        ev.TokenCreated(token_id="t", name="n", role="admin", token_sha256="h"),
        ev.TokenRevoked(token_id="t"),
        ev.SiteRenamed(name="Berlin office"),
    ]
    assert {type(s) for s in samples} | {ev.PackageUploaded} <= set(ev.EVENT_TYPES)
    for s in samples:
        env = envelope(key, event=s)
        assert codec.open_signed(codec.seal(env, key), key.public_key).event == s


def test_bytes_sealed_here_are_opened_once_without_a_second_verification(key, tmp_path):
    payload = codec.seal(envelope(key), key)
    other = SiteKey.load_or_create(tmp_path / "other.key")
    assert not codec.sealed_here(payload, other.public_key)  # only against the key that signed them
    assert codec.sealed_here(payload, key.public_key)
    assert not codec.sealed_here(payload, key.public_key)  # forgotten once opened: verified from now on


def test_bytes_sealed_here_still_fail_against_another_key(key, tmp_path):
    payload = codec.seal(envelope(key), key)
    other = SiteKey.load_or_create(tmp_path / "other.key")
    with pytest.raises(SignatureInvalid):
        codec.open_signed(payload, other.public_key)
    assert codec.open_signed(payload, key.public_key).origin == key.site_id


def test_bytes_signed_but_not_sealed_here_are_verified(key):
    body = codec._encoder.encode(envelope(key))
    forged = bytes(64) + body  # the envelope with a signature nobody made
    with pytest.raises(SignatureInvalid):
        codec.open_signed(forged, key.public_key)
    assert not codec.sealed_here(key.sign(body), key.public_key)  # signed, not sealed: verified


def test_sealed_payloads_never_opened_age_out(key):
    first = codec.seal(envelope(key), key)
    for seq in range(codec.SEALED_KEEP):
        codec.seal(envelope(key, seq + 2), key)
    assert not codec.sealed_here(first, key.public_key)
    assert len(codec._sealed) <= codec.SEALED_KEEP
