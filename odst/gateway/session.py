"""/api/v1/session: web UI sign-in (local users, then LDAP), sign-out, own password."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import structlog
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import Cookie

from odst.accounts import passwords
from odst.errors import OdstError, RequestInvalid, Unauthorized
from odst.events import catalogue as ev
from odst.gateway.auth import READ, SESSION_COOKIE, Principal
from odst.gateway.bodies import decode_json
from odst.projections import views
from odst.site import Site

log = structlog.get_logger("odst.signin")

WRONG = "user name or password is wrong"


class SigninFailed(OdstError):
    status, code = 401, "signin_failed"


class TooManyAttempts(OdstError):
    status, code = 429, "too_many_attempts"

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed sign-ins for this user or address; try again in {retry_after} s")
        self.retry_after = retry_after


class SignIn(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str


class PasswordChange(msgspec.Struct, forbid_unknown_fields=True):
    current: str
    new: str


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _secure(request: Request, site: Site) -> bool:
    mode = site.settings.cookie_secure
    if mode != "auto":
        return mode == "always"
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"


def _session_cookie(request: Request, site: Site, value: str, max_age: int) -> Cookie:
    return Cookie(key=SESSION_COOKIE, value=value, path="/", httponly=True, samesite="strict",
                  secure=_secure(request, site), max_age=max_age)


def session_json(p: Principal) -> dict[str, Any]:
    return {"username": p.username, "role": p.role, "source": p.source, "display_name": p.display_name,
            "csrf_token": p.csrf, "expires_at": int(p.expires_at * 1000)}


async def _check_password(site: Site, username: str, password: str) -> tuple[str, str, str, str]:
    """(username, role, source, display name) of whoever these credentials are; SigninFailed if no one."""
    row = views.user_row(site.reader, username)
    if row is not None:
        if await passwords.verify_async(site.key, row["password_sealed"], password):
            return row["username"], row["role"], "local", row["display_name"]
        raise SigninFailed(WRONG)
    from odst.accounts import ldap
    if ldap.enabled(site.settings):
        try:
            user = await asyncio.to_thread(ldap.authenticate, site.settings, username, password)
        except ldap.DirectoryRefused as exc:
            log.info("directory refused sign-in", user=username, reason=exc.detail)
            raise SigninFailed(WRONG) from None
        return user.username, user.role, "ldap", user.display_name
    await passwords.verify_async(site.key, None, password)  # an unknown name costs what a wrong password does
    raise SigninFailed(WRONG)


class SessionController(Controller):
    path = "/api/v1/session"
    tags = ["session"]

    @post("/", operation_id="signIn", opt={"public": True}, status_code=200)
    async def sign_in(self, request: Request) -> Response[dict[str, Any]]:
        """Sign in with a local or directory (LDAP) account; sets the session cookie."""
        site: Site = request.app.state.site
        body = decode_json(await request.body(), SignIn)
        username = body.username.strip()
        if not username or len(username) > 256 or len(body.password) > passwords.MAX_LENGTH:
            raise SigninFailed(WRONG)
        address = client_address(request)
        s = site.settings
        wait = site.sessions.retry_after(username, address, max_user=s.signin_max_failures,
                                         max_address=s.signin_max_failures_address, window_s=s.signin_window_s)
        if wait:
            log.warning("sign-in refused: too many failures", user=username, address=address, retry_after=wait)
            raise TooManyAttempts(wait)
        try:
            name, role, source, display = await _check_password(site, username, body.password)
        except SigninFailed:
            site.sessions.record_failure(username, address)
            log.warning("sign-in failed", user=username, address=address)
            raise
        site.sessions.clear_failures(username)
        session_id, sess = site.sessions.create(
            username=name, role=role, source=source, display_name=display, address=address,
            user_agent=request.headers.get("user-agent", ""))
        log.info("signed in", user=name, role=role, source=source, address=address)
        p = Principal(username=name, role=role, source=source, display_name=display, csrf=sess.csrf,
                      expires_at=sess.ends_at(site.sessions.idle_s))
        return Response(session_json(p), cookies=[_session_cookie(request, site, session_id, s.session_max_s)])

    @get("/", operation_id="whoAmI", opt={"roles": READ})
    async def who_am_i(self, request: Request) -> dict[str, Any]:
        """The caller: a signed-in user (with its CSRF token) or an API token."""
        return session_json(request.state.principal)

    @delete("/", operation_id="signOut", opt={"roles": READ}, status_code=200)
    async def sign_out(self, request: Request) -> Response[dict[str, Any]]:
        site: Site = request.app.state.site
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            site.sessions.delete(session_id)
        log.info("signed out", user=request.state.principal.username)
        return Response({"signed_out": True}, cookies=[_session_cookie(request, site, "", 0)])

    @post("/password", operation_id="changeOwnPassword", opt={"roles": READ}, status_code=200)
    async def change_password(self, request: Request) -> Response[dict[str, Any]]:
        """A local user changes their own password; their other sessions end."""
        site: Site = request.app.state.site
        p: Principal = request.state.principal
        if p.source != "local":
            raise RequestInvalid("only local users have a password here; directory users change "
                                 "theirs in the directory")
        body = decode_json(await request.body(), PasswordChange)
        row = views.user_row(site.reader, p.username)
        if row is None or not await passwords.verify_async(site.key, row["password_sealed"], body.current):
            raise Unauthorized("current password is wrong")
        passwords.check_new_password(body.new, p.username)
        sealed = await passwords.seal_async(site.key, body.new)
        await site.append(ev.UserPasswordChanged(username=row["username"], password_sealed=sealed),
                          actor=p.actor)
        site.sessions.delete_user(row["username"])
        session_id, sess = site.sessions.create(
            username=row["username"], role=row["role"], source="local", display_name=row["display_name"],
            address=client_address(request), user_agent=request.headers.get("user-agent", ""),
            now=time.time() + 0.001)  # signed in after the change, so it survives it
        fresh = Principal(username=row["username"], role=row["role"], source="local",
                          display_name=row["display_name"], csrf=sess.csrf,
                          expires_at=sess.ends_at(site.sessions.idle_s))
        return Response(session_json(fresh),
                        cookies=[_session_cookie(request, site, session_id, site.settings.session_max_s)])
