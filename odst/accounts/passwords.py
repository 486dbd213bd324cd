"""Local users' passwords: argon2id hashes, sealed with a key only this site holds.

The hash travels in a signed event, and peers mirror the log; sealing it with
``SecretBox(SiteKey.derive(b"odst-user-passwords"))`` keeps every peer (and an
auditor replaying the log) from holding an offline guessing target, while the
fold stays a pure copy of what the event carried.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import re

import argon2
import nacl.exceptions
import nacl.secret

from odst.accounts.pool import BoundedPool
from odst.errors import RequestInvalid
from odst.events.signing import SiteKey

MIN_LENGTH = 10
MAX_LENGTH = 1024  # argon2 takes any length; a cap keeps a hostile body from costing more
USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ROLES = ("admin", "operator", "auditor")

# RFC 9106's second recommended option (argon2-cffi's default): t=3, m=64 MiB, p=4.
REAL_PARAMETERS = argon2.PasswordHasher()

# Test-only knob: the test suite starts hundreds of sites, and each makes the first admin's hash
# (0.2-0.4 s of a core) and every sign-in verifies one. With TEST_KNOB=cheap, and only inside a
# pytest run (pytest sets PYTEST_CURRENT_TEST for the test and the processes it starts), hashes
# use argon2's smallest parameters. Anywhere else the knob is ignored with a warning: the real
# parameters are a security setting. tests/system/test_accounts.py keeps a site on them.
TEST_KNOB = "ODST_TEST_ARGON2"
CHEAP_PARAMETERS = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


@functools.cache
def _hasher() -> argon2.PasswordHasher:
    """The hasher, chosen on first use (after logging is configured, so the warning is seen)."""
    if os.environ.get(TEST_KNOB, "") != "cheap":
        return REAL_PARAMETERS
    if os.environ.get("PYTEST_CURRENT_TEST"):
        return CHEAP_PARAMETERS
    import structlog
    structlog.get_logger("odst.accounts").warning(
        f"{TEST_KNOB} is for the test suite only; ignored, passwords keep the real argon2 parameters")
    return REAL_PARAMETERS

# Each hash takes 64 MiB and ~0.1-0.2 s of a core; two at a time bound what a sign-in flood
# can take, and callers beyond 32 waiting get a 503 at once.
POOL = BoundedPool("argon2", workers=2, max_waiting=32)


@functools.cache
def _dummy() -> str:
    """Compared against when the user does not exist, so a wrong name costs what a wrong password
    does. Made on first use, not at import: one argon2 hash is 0.2-0.8 s of a core, and every
    ``odst`` command imports this module."""
    return _hasher().hash("odst-no-such-user")


class PasswordRejected(RequestInvalid):
    code = "password_rejected"


def check_username(username: str) -> str:
    if not USERNAME.fullmatch(username or ""):
        raise RequestInvalid("user name must be 1 to 64 letters, digits, '.', '_', '@' or '-', "
                             "starting with a letter or digit")
    return username


def check_role(role: str, roles: tuple[str, ...] = ROLES) -> str:
    """``role`` if it is one of ``roles`` (a user's or token's by default), else RequestInvalid."""
    if role not in roles:
        raise RequestInvalid(f"role must be one of {', '.join(roles)}")
    return role


def check_new_password(password: str, username: str = "") -> str:
    if not isinstance(password, str) or len(password) < MIN_LENGTH:
        raise PasswordRejected(f"password must be at least {MIN_LENGTH} characters")
    if len(password) > MAX_LENGTH:
        raise PasswordRejected(f"password must be at most {MAX_LENGTH} characters")
    if username and password.lower() == username.lower():
        raise PasswordRejected("password must not be the user name")
    return password


def _box(key: SiteKey) -> nacl.secret.SecretBox:
    return nacl.secret.SecretBox(key.derive(b"odst-user-passwords"))


def seal(key: SiteKey, password: str) -> str:
    """Hash ``password`` with argon2id and seal the hash for the event log."""
    digest = _hasher().hash(password)
    return base64.b64encode(_box(key).encrypt(digest.encode("ascii"))).decode("ascii")


def verify(key: SiteKey, sealed: str | None, password: str) -> bool:
    """True when ``password`` matches the sealed hash; a missing user still costs one hash."""
    digest = _dummy()
    if sealed:
        try:
            digest = _box(key).decrypt(base64.b64decode(sealed)).decode("ascii")
        except (nacl.exceptions.CryptoError, ValueError):
            digest = _dummy()  # sealed by another key (a restored backup with a new key): no match
            sealed = None
    if not password or len(password) > MAX_LENGTH:
        return False
    try:
        return _hasher().verify(digest, password) and sealed is not None
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


async def seal_async(key: SiteKey, password: str) -> str:
    return await POOL.run(seal, key, password)


async def verify_async(key: SiteKey, sealed: str | None, password: str) -> bool:
    return await POOL.run(verify, key, sealed, password)


def fingerprint(row) -> str:
    """What a session remembers of the credential it signed in with: a new password, or the
    user removed and made again, changes it, and the session ends."""
    return hashlib.sha256(f"{row.password_sealed}\0{row.created_at}".encode()).hexdigest()[:32]
