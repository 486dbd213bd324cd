"""Sign-in policy: who a user name and password belong to (local users, then the directory),
and how many password checks a name or an address may make (the limits)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog

from odst.accounts import ldap, passwords
from odst.accounts.sessions import SessionStore
from odst.config import Settings
from odst.errors import OdstError
from odst.events.signing import SiteKey
from odst.projections import views

log = structlog.get_logger("odst.signin")

WRONG = "user name or password is wrong"


class SigninFailed(OdstError):
    status, code = 401, "signin_failed"


class DirectoryDown(OdstError):
    status, code = 503, "directory_unavailable"


class TooManyAttempts(OdstError):
    status, code = 429, "too_many_attempts"

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed sign-ins for this user or address; try again in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Identity:
    """Whoever a user name and password belong to."""

    username: str
    role: str
    source: str  # local | ldap
    display_name: str
    credential: str  # fingerprint of the local password a session was opened with ('' for ldap)


async def check_password(reader, key: SiteKey, settings: Settings, username: str, password: str) -> Identity:
    """The identity these credentials prove; SigninFailed if none, DirectoryDown if the
    directory cannot say."""
    row = views.user_account(reader, username)
    if row is not None:
        if await passwords.verify_async(key, row.password_sealed, password):
            return Identity(row.username, row.role, "local", row.display_name, passwords.fingerprint(row))
        raise SigninFailed(WRONG)
    # an unknown local name costs one hash whether or not the directory is asked, so timing
    # does not tell local users from the rest
    dummy = asyncio.ensure_future(passwords.verify_async(key, None, password))
    try:
        if not ldap.enabled(settings):
            raise SigninFailed(WRONG)
        try:
            user = await ldap.POOL.run(ldap.authenticate, settings, username, password)
        except ldap.DirectoryRefused as exc:
            log.info("directory refused sign-in", user=username, reason=exc.detail)
            raise SigninFailed(WRONG) from None
        except ldap.DirectoryUnavailable as exc:
            log.error("directory unavailable for sign-in", user=username, reason=exc.detail)
            raise DirectoryDown("the directory (LDAP) is not answering; local users can still sign in") from None
        return Identity(user.username, user.role, "ldap", user.display_name, "")
    finally:
        await asyncio.gather(dummy, return_exceptions=True)


def reserve_attempt(sessions: SessionStore, settings: Settings, username: str, address: str) -> list[int]:
    """Count one password check against the sign-in limits, before it is made; 429 when over."""
    wait, reservation = sessions.attempt(username, address, max_failures=settings.signin_max_failures,
                                         max_address=settings.signin_max_failures_address,
                                         window_s=settings.signin_window_s)
    if wait:
        log.warning("refused: too many failed password checks", user=username, address=address, retry_after=wait)
        raise TooManyAttempts(wait)
    return reservation
