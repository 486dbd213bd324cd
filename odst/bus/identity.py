"""NATS identities: NKeys for the site's own processes, its peers and its subscribers.

An NKey is an ed25519 key in NATS's encoding. A site's leaf-node identity *is* its site
key (the same 32-byte seed), so a site that knows a peer's public key from registration
knows the NKey that peer's leaf connection will present, with nothing more to exchange.
The site's own processes use a separate client key, ``<data>/nats-client.nk`` (0600):
whoever holds it has every right on the site's broker, so it never leaves the data
directory.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import nacl.signing
import nkeys

from odst.events.signing import user_seed

CLIENT_SEED_FILE = "nats-client.nk"


def user_public_key(raw_public_key: bytes) -> str:
    """The NATS user NKey ('U…') of an ed25519 public key."""
    src = bytearray([nkeys.PREFIX_BYTE_USER]) + bytearray(raw_public_key)
    src += nkeys.crc16(src).to_bytes(2, "little")
    return base64.b32encode(bytes(src)).decode("ascii").rstrip("=")


def raw_public_key(nkey: str) -> bytes:
    """The ed25519 public key of a user NKey ('U…'): the inverse of user_public_key.
    ValueError if ``nkey`` is not one."""
    try:
        raw = base64.b32decode(nkey + "=" * (-len(nkey) % 8))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a user NKey: {nkey!r}") from exc
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER \
            or nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise ValueError(f"not a user NKey: {nkey!r}")
    return raw[1:33]


def public_key_of_seed(seed: str) -> str:
    return nkeys.from_seed(seed.encode("ascii")).public_key.decode("ascii")


def new_user_seed() -> str:
    return user_seed(bytes(nacl.signing.SigningKey.generate()))


def write_secret(path: Path, text: str) -> None:
    """Write a secret file atomically, mode 0600 whatever the umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def client_seed_path(data: Path) -> Path:
    return Path(data) / CLIENT_SEED_FILE


def load_or_create_client_seed(data: Path) -> str:
    """The seed the site's own processes connect with (created at first start)."""
    path = client_seed_path(data)
    try:
        return read_seed(path)
    except FileNotFoundError:
        write_secret(path, new_user_seed() + "\n")
        return read_seed(path)


def read_seed(path: Path) -> str:
    """A seed file: the 'SU…' line of an .nk file or of a NATS .creds file."""
    text = Path(path).read_text()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("SU"):
            return line
    raise ValueError(f"{path} holds no NATS user seed (a line starting with 'SU')")
