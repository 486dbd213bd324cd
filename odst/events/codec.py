"""The one mapper between an event and its stored bytes: envelope, signature, chain hash.

Published bytes = ed25519 signature (64 bytes) || canonical JSON of the Envelope.
The signature is checked before anything is decoded. ``prev`` is the blake3 of the
previous published message from the same origin site, so an audit can prove that
nothing was altered, dropped or reordered.
"""

from __future__ import annotations

import time
import uuid

import blake3
import msgspec

from odst.events.catalogue import AnyEvent
from odst.events.signing import SIGNATURE_BYTES, SiteKey, verify

ENVELOPE_VERSION = 1
GENESIS = ""  # prev of the first event of a site


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    v: int = ENVELOPE_VERSION
    id: str
    origin: str
    seq: int
    prev: str
    ts: int  # unix time in milliseconds
    actor: str
    event: AnyEvent


class EnvelopeInvalid(Exception):
    """Bytes that verify but do not decode to a well-formed envelope."""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Envelope)


def new_event_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seal(envelope: Envelope, key: SiteKey) -> bytes:
    """Encode deterministically and sign; returns the exact bytes to publish."""
    return key.sign(_encoder.encode(envelope))


def open_signed(payload: bytes, public_key: bytes) -> Envelope:
    """Verify the signature, then decode. Raises SignatureInvalid or EnvelopeInvalid."""
    body = verify(public_key, payload)
    return decode_body(body)


def decode_body(body: bytes) -> Envelope:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise EnvelopeInvalid(str(exc)) from exc


def unverified_body(payload: bytes) -> bytes:
    """The envelope bytes without checking the signature (for quarantine reports only)."""
    return payload[SIGNATURE_BYTES:]


def chain_hash(payload: bytes) -> str:
    return blake3.blake3(payload).hexdigest()


def to_builtins(envelope: Envelope) -> dict:
    return msgspec.to_builtins(envelope)
