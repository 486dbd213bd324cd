"""The one mapper between an event and its stored bytes: envelope, signature, chain hash.

Published bytes = ed25519 signature (64 bytes) || canonical JSON of the Envelope.
The signature is checked before anything is decoded. ``prev`` is the blake3 of the
previous published message from the same origin site, so an audit can prove that
nothing was altered, dropped or reordered.
"""

from __future__ import annotations

import threading
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

# The payloads this process sealed and has not opened yet, each with the public key that
# signed it. The projector folds back what the event log of its own process just appended:
# bytes identical to ones signed here with that key verify against it by construction, so
# their signature is not checked a second time (an ed25519 verification, ~45 us: a twentieth
# of a pulling site's CPU in a catch-up went to re-checking its own PackageAvailable events).
# Anything else (a peer's event, bytes changed in the stream, another process's) is verified.
SEALED_KEEP = 4096  # bound: sealed payloads never opened here (a refused publish) age out
_sealed: dict[bytes, bytes] = {}
_sealed_lock = threading.Lock()  # sealers and openers may be on other threads (recovery)


def new_event_id() -> str:
    return uuid.uuid4().hex


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seal(envelope: Envelope, key: SiteKey) -> bytes:
    """Encode deterministically and sign; returns the exact bytes to publish."""
    payload = key.sign(_encoder.encode(envelope))
    with _sealed_lock:
        _sealed[payload] = key.public_key
        if len(_sealed) > SEALED_KEEP:
            del _sealed[next(iter(_sealed))]  # the oldest
    return payload


def sealed_here(payload: bytes, public_key: bytes) -> bool:
    """Did this process seal exactly these bytes with ``public_key`` (and not open them since)?
    Forgets them: they are opened once, by the projector."""
    with _sealed_lock:
        if _sealed.get(payload) != public_key:
            return False
        del _sealed[payload]
        return True


def open_signed(payload: bytes, public_key: bytes) -> Envelope:
    """Verify the signature, then decode. Raises SignatureInvalid or EnvelopeInvalid. Bytes this
    process signed with ``public_key`` itself (``sealed_here``) need no verification."""
    body = unverified_body(payload) if sealed_here(payload, public_key) else verify(public_key, payload)
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
