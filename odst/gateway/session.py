"""/api/v1/session: web UI sign-in (local users, then LDAP), sign-out, own password."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

import msgspec
import structlog
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import Cookie

from odst.accounts import passwords, signin
from odst.gateway.users import forget_first_password
from odst.errors import OdstError, RequestInvalid, Unauthorized
from odst.events import catalogue as ev
from odst.gateway.auth import READ, SESSION_COOKIE, CsrfFailed, Principal, same_origin
from odst.gateway.bodies import decode_json
from odst.projections import views
from odst.gateway.context import GatewayContext

log = structlog.get_logger("odst.signin")


class JsonRequired(OdstError):
    status, code = 415, "unsupported_media_type"


class SignIn(msgspec.Struct, forbid_unknown_fields=True):
    username: str
    password: str


class PasswordChange(msgspec.Struct, forbid_unknown_fields=True):
    current: Annotated[str, msgspec.Meta(max_length=passwords.MAX_LENGTH,
                                         description=f"at most {passwords.MAX_LENGTH} characters")]
    # Not expressible here: the new password must not be the user name (a 400, password_rejected).
    new: Annotated[str, msgspec.Meta(min_length=passwords.MIN_LENGTH, max_length=passwords.MAX_LENGTH,
                                     description=f"at least {passwords.MIN_LENGTH} characters "
                                                 f"(and at most {passwords.MAX_LENGTH})")]
    refusals: ClassVar = {"new": passwords.PasswordRejected}


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _secure(request: Request, site: GatewayContext) -> bool:
    mode = site.settings.cookie_secure
    if mode != "auto":
        return mode == "always"
    return (request.url.scheme == "https" or site.settings.base_url.startswith("https://")
            or request.headers.get("x-forwarded-proto", "").lower() == "https")


def _session_cookie(request: Request, site: GatewayContext, value: str, max_age: int) -> Cookie:
    return Cookie(key=SESSION_COOKIE, value=value, path="/", httponly=True, samesite="strict",
                  secure=_secure(request, site), max_age=max_age)


def session_json(p: Principal) -> dict[str, Any]:
    return {"username": p.username, "role": p.role, "source": p.source, "display_name": p.display_name,
            "csrf_token": p.csrf, "expires_at": int(p.expires_at * 1000)}


class SessionController(Controller):
    path = "/api/v1/session"
    tags = ["session"]

    @post("/", operation_id="signIn", opt={"public": True, "body": SignIn}, status_code=200)
    async def sign_in(self, request: Request) -> Response[dict[str, Any]]:
        """Sign in with a local or directory (LDAP) account; sets the session cookie."""
        site: GatewayContext = request.app.state.site
        # a form on another site can post text/plain cross-origin (login CSRF); JSON cannot
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise JsonRequired("send the credentials as application/json")
        if not same_origin(request):
            raise CsrfFailed(f"sign-in from another origin ({request.headers.get('origin')}) refused")
        body = decode_json(await request.body(), SignIn)
        username = body.username.strip()
        if not username or len(username) > 256 or len(body.password) > passwords.MAX_LENGTH:
            raise signin.SigninFailed(signin.WRONG)
        address = client_address(request)
        reservation = signin.reserve_attempt(site.sessions, site.settings, username, address)
        try:
            who = await signin.check_password(site.reader, site.key, site.settings, username, body.password)
        except signin.SigninFailed:
            log.warning("sign-in failed", user=username, address=address)
            raise
        except BaseException:  # the directory was down or we were too busy: no password was judged
            site.sessions.forgive(reservation)
            raise
        site.sessions.succeeded(username, address, reservation)
        session_id, sess = site.sessions.create(
            username=who.username, role=who.role, source=who.source, display_name=who.display_name,
            address=address, user_agent=request.headers.get("user-agent", ""), credential=who.credential)
        log.info("signed in", user=who.username, role=who.role, source=who.source, address=address)
        p = Principal(username=who.username, role=who.role, source=who.source, display_name=who.display_name,
                      csrf=sess.csrf, expires_at=sess.ends_at(site.sessions.idle_s))
        return Response(session_json(p),
                        cookies=[_session_cookie(request, site, session_id, site.settings.session_max_s)])

    @get("/", operation_id="whoAmI", opt={"roles": READ})
    async def who_am_i(self, request: Request) -> dict[str, Any]:
        """The caller: a signed-in user (with its CSRF token) or an API token."""
        return session_json(request.state.principal)

    @delete("/", operation_id="signOut", opt={"roles": READ}, status_code=200)
    async def sign_out(self, request: Request) -> Response[dict[str, Any]]:
        site: GatewayContext = request.app.state.site
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id:
            site.sessions.delete(session_id)
        log.info("signed out", user=request.state.principal.username)
        return Response({"signed_out": True}, cookies=[_session_cookie(request, site, "", 0)])

    @post("/password", operation_id="changeOwnPassword", opt={"roles": READ, "body": PasswordChange}, status_code=200)
    async def change_password(self, request: Request) -> Response[dict[str, Any]]:
        """A local user changes their own password; their other sessions end."""
        site: GatewayContext = request.app.state.site
        p: Principal = request.state.principal
        if p.source != "local":
            raise RequestInvalid("only local users have a password here; directory users change "
                                 "theirs in the directory")
        body = decode_json(await request.body(), PasswordChange)
        address = client_address(request)
        reservation = signin.reserve_attempt(site.sessions, site.settings, p.username, address)
        row = views.user_account(site.reader, p.username)
        if row is None or not await passwords.verify_async(site.key, row.password_sealed, body.current):
            log.warning("password change: current password wrong", user=p.username, address=address)
            raise Unauthorized("current password is wrong")
        site.sessions.succeeded(p.username, address, reservation)
        passwords.check_new_password(body.new, p.username)
        sealed = await passwords.seal_async(site.key, body.new)
        await site.append(ev.UserPasswordChanged(username=row.username, password_sealed=sealed),
                          actor=p.actor)
        site.sessions.delete_user(row.username)
        forget_first_password(site, row.username)
        row = views.user_account(site.reader, row.username)
        session_id, sess = site.sessions.create(
            username=row.username, role=row.role, source="local", display_name=row.display_name,
            address=address, user_agent=request.headers.get("user-agent", ""),
            credential=passwords.fingerprint(row))
        fresh = Principal(username=row.username, role=row.role, source="local",
                          display_name=row.display_name, csrf=sess.csrf,
                          expires_at=sess.ends_at(site.sessions.idle_s))
        return Response(session_json(fresh),
                        cookies=[_session_cookie(request, site, session_id, site.settings.session_max_s)])
