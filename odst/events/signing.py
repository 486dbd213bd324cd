"""Site identity: the ed25519 key pair, the site id derived from it, and signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from pathlib import Path

import blake3
import nacl.exceptions
import nacl.signing
import nkeys

SIGNATURE_BYTES = 64


class SignatureInvalid(Exception):
    """A message's signature does not verify against the key it claims."""


def site_id_for(public_key: bytes) -> str:
    """A stable, subject-safe site id: 's' + 16 base32 characters of blake3(public key).

    Usable as a NATS subject token and as a JetStream domain name.
    """
    digest = blake3.blake3(public_key).digest()[:10]
    return "s" + base64.b32encode(digest).decode("ascii").lower()


class SiteKey:
    """The site's signing key. The private seed lives in a 0600 file."""

    def __init__(self, signing_key: nacl.signing.SigningKey):
        self._sk = signing_key
        self.public_key: bytes = bytes(signing_key.verify_key)
        self.site_id: str = site_id_for(self.public_key)

    @classmethod
    def load_or_create(cls, path: Path) -> "SiteKey":
        path = Path(path)
        if path.exists():
            seed = bytes.fromhex(path.read_text().strip())
            return cls(nacl.signing.SigningKey(seed))
        path.parent.mkdir(parents=True, exist_ok=True)
        sk = nacl.signing.SigningKey.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(bytes(sk).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        return cls(sk)

    def sign(self, message: bytes) -> bytes:
        """Return signature || message (the exact bytes that get published)."""
        return bytes(self._sk.sign(message))

    def sign_detached(self, message: bytes) -> bytes:
        return self._sk.sign(message).signature

    def nkey_seed(self) -> str:
        """The same key as a NATS user seed: the site's leaf-node identity at its peers."""
        return user_seed(bytes(self._sk))

    def derive(self, label: bytes) -> bytes:
        """A secret derived from the private seed for one purpose (HMAC-SHA256(seed, label));
        the seed itself never leaves this object."""
        return hmac.new(bytes(self._sk), label, hashlib.sha256).digest()


def user_seed(raw_seed: bytes) -> str:
    """The NATS user seed ('SU…') of a 32-byte ed25519 seed (odst.bus.identity: NATS identities)."""
    return nkeys.encode_seed(bytes(raw_seed), nkeys.PREFIX_BYTE_USER).decode("ascii")


def verify(public_key: bytes, signed: bytes) -> bytes:
    """Check signature || message against public_key and return the message."""
    try:
        return nacl.signing.VerifyKey(public_key).verify(signed)
    except (nacl.exceptions.BadSignatureError, ValueError) as exc:
        raise SignatureInvalid(str(exc) or "bad signature") from exc


def verify_detached(public_key: bytes, message: bytes, signature: bytes) -> None:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, ValueError) as exc:
        raise SignatureInvalid(str(exc) or "bad signature") from exc
