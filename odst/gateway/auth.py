"""Who is calling: a bearer token (automation) or a web UI session cookie, and may they.

Every /api/ route passes ``auth_guard``. A cookie-authenticated request that
changes anything must also carry the session's CSRF token in ``X-CSRF-Token``
(and, when the browser sends one, an ``Origin`` of this very host): the cookie
is SameSite=Strict too, but a guard that does not depend on browser policy is
the one to trust.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import structlog

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from odst.accounts import ldap
from odst.accounts.passwords import fingerprint
from odst.errors import Forbidden, Unauthorized
from odst.projections import views
from odst.accounts.tokens import token_digest
from odst.gateway.context import GatewayContext

READ = ("admin", "operator", "auditor")
WRITE = ("admin", "operator")
ADMIN = ("admin",)

log = structlog.get_logger("odst.auth")

SESSION_COOKIE = "odst_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class CsrfFailed(Forbidden):
    code = "csrf_failed"


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    source: str  # token | local | ldap
    display_name: str = ""
    csrf: str = ""
    expires_at: float = 0.0

    @property
    def actor(self) -> str:
        return {"token": "token", "local": "user", "ldap": "ldap"}[self.source] + ":" + self.username


def _from_bearer(site: GatewayContext, header: str) -> Principal:
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("send 'Authorization: Bearer <token>' or sign in")
    row = views.token_by_hash(site.reader, token_digest(token.strip()), site.id)
    if row is None:
        raise Unauthorized("token not recognised or revoked")
    return Principal(username=f"{row.token_id}:{row.name}", role=row.role, source="token")


def same_origin(connection: ASGIConnection) -> bool:
    """No Origin header (not a browser's cross-site request), or one naming this very host."""
    origin = connection.headers.get("origin")
    return not origin or urlsplit(origin).netloc == connection.headers.get("host", "")


async def _from_session(site: GatewayContext, connection: ASGIConnection, session_id: str, touch: bool) -> Principal:
    s = site.sessions.get(session_id, touch=touch) if site.sessions else None
    if s is None:
        raise Unauthorized("not signed in, or the session has ended: sign in again")
    role = s.role
    if s.source == "local":  # role changes apply to open sessions at once; new passwords end them
        row = views.user_account(site.reader, s.username)
        if row is None or not hmac.compare_digest(fingerprint(row), s.credential):
            site.sessions.delete(session_id)
            raise Unauthorized("the account changed since this session began: sign in again")
        role = row.role
    elif s.source == "ldap" and time.time() - s.checked_at > site.settings.ldap_recheck_s:
        role = await _recheck_directory(site, session_id, s.username, role)
    if connection.scope["method"] not in SAFE_METHODS:
        sent = connection.headers.get(CSRF_HEADER, "")
        if not sent or not hmac.compare_digest(sent.encode(), s.csrf.encode()):
            raise CsrfFailed(f"missing or wrong {CSRF_HEADER} header (the session's csrf_token)")
        if not same_origin(connection):
            raise CsrfFailed(f"request from another origin ({connection.headers.get('origin')}) refused")
    return Principal(username=s.username, role=role, source=s.source, display_name=s.display_name,
                     csrf=s.csrf, expires_at=s.ends_at(site.sessions.idle_s))


async def _recheck_directory(site: GatewayContext, session_id: str, username: str, role: str) -> str:
    """Ask the directory whether this user still has a role; an outage keeps the session as it is."""
    try:
        user = await ldap.POOL.run(ldap.lookup, site.settings, username)
    except ldap.DirectoryRefused as exc:
        site.sessions.delete(session_id)
        log.warning("directory no longer grants a role; session ended", user=username, reason=exc.detail)
        raise Unauthorized("your directory account no longer has an ODST role: sign in again") from None
    except Exception as exc:  # directory down or busy: the session keeps its role until it ends
        log.warning("directory re-check failed; session kept", user=username, error=f"{type(exc).__name__}: {exc}")
        return role
    site.sessions.confirmed(session_id, user.role)
    if user.role != role:
        log.info("directory role changed", user=username, role=user.role, previous=role)
    return user.role


async def authenticate(connection: ASGIConnection, *, touch: bool = True) -> Principal:
    """Who sent this request; ``touch=False`` re-checks without counting as use of a session."""
    site: GatewayContext = connection.app.state.site
    header = connection.headers.get("authorization")
    if header:
        return _from_bearer(site, header)
    session_id = connection.cookies.get(SESSION_COOKIE)
    if session_id:
        return await _from_session(site, connection, session_id, touch)
    raise Unauthorized("send 'Authorization: Bearer <token>' or sign in")


def allowed(principal: Principal, roles: tuple[str, ...]) -> Principal:
    """``principal`` if its role is one of ``roles``, else Forbidden."""
    if principal.role not in roles:
        raise Forbidden(f"role {principal.role!r} may not do this; needs one of {', '.join(roles)}")
    return principal


def bearer(site: GatewayContext, header: str) -> Principal:
    """Who an ``Authorization`` header names (Unauthorized if no known token): what
    ``authenticate`` does when the header is there, for a door in front of Litestar."""
    return _from_bearer(site, header)


async def auth_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Async on purpose: Litestar runs a sync guard in the default executor, where a queue of
    slow work (a sign-in flood) would make every API request wait behind it."""
    if handler.opt.get("public"):
        return
    principal = allowed(await authenticate(connection), handler.opt.get("roles", READ))
    connection.state.principal = principal
    connection.state.actor = principal.actor
    connection.state.role = principal.role
