"""/api/v1/users: local users of the web UI and API (admin only). Every change is an event."""

from __future__ import annotations

import asyncio
import fcntl
import os
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, ClassVar, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post

from odst.accounts import passwords
from odst.datadir import run_dir
from odst.errors import NotFound, OdstError, RequestInvalid
from odst.events import catalogue as ev
from odst.gateway.auth import ADMIN
from odst.gateway.bodies import decode_json
from odst.gateway.constraints import DISPLAY_NAME, DISPLAY_NAME_MAX, END
from odst.projections import views
from odst.gateway.context import GatewayContext

_in_process = asyncio.Lock()


@asynccontextmanager
async def users_lock(site: GatewayContext) -> AsyncIterator[None]:
    """One user change at a time across every gateway process of the site: a check such as
    "not the last admin" or "no such user yet" and the event it allows happen as one step."""
    async with _in_process:
        path = run_dir(site.data) / "users.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.02)  # another gateway process holds it for one append
            yield
        finally:
            os.close(fd)


class UserExists(OdstError):
    status, code = 409, "user_exists"


def forget_first_password(site: GatewayContext, username: str) -> None:
    """The generated first password of ``admin`` sits in <data>/admin-password until it no longer
    signs anyone in: once admin's password changes (or admin is removed) the file goes."""
    if username == "admin":
        (site.data / "admin-password").unlink(missing_ok=True)


Username = Annotated[str, msgspec.Meta(pattern=f"^{passwords.USERNAME.pattern}{END}", description=(
    "1 to 64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"))]
# Not expressible here: a password must not be the user name (a 400, password_rejected).
Password = Annotated[str, msgspec.Meta(min_length=passwords.MIN_LENGTH, max_length=passwords.MAX_LENGTH,
                                       description=f"at least {passwords.MIN_LENGTH} characters "
                                                   f"(and at most {passwords.MAX_LENGTH})")]
Role = Literal[passwords.ROLES]
DisplayName = Annotated[str, msgspec.Meta(max_length=DISPLAY_NAME_MAX, pattern=DISPLAY_NAME,
                                          description=f"at most {DISPLAY_NAME_MAX} characters, "
                                                      "without control characters")]


class UserCreate(msgspec.Struct, forbid_unknown_fields=True):
    username: Username
    password: Password
    role: Role = "operator"
    display_name: DisplayName = ""
    refusals: ClassVar = {"password": passwords.PasswordRejected}


class UserUpdate(msgspec.Struct, forbid_unknown_fields=True):
    role: Role | None = None
    password: Password | None = None
    display_name: DisplayName | None = None
    refusals: ClassVar = {"password": passwords.PasswordRejected}


def _display_name(value: str) -> str:
    value = value.strip()
    if len(value) > 200 or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise RequestInvalid("display name must be at most 200 characters, without control characters")
    return value


def _live(site: GatewayContext, username: str):
    row = views.user_account(site.reader, username)
    if row is None:
        raise NotFound(f"no user {username!r}")
    return row


def _other_admins(site: GatewayContext, username: str) -> int:
    return sum(1 for u in views.users(site.reader) if u.role == "admin" and u.username.lower() != username.lower())


class UserController(Controller):
    path = "/api/v1/users"
    tags = ["users"]

    @get("/", operation_id="listUsers", opt={"roles": ADMIN})
    async def list_users(self, request: Request) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        return {"users": views.users(site.reader)}

    @post("/", operation_id="createUser", opt={"roles": ADMIN, "body": UserCreate})
    async def create_user(self, request: Request) -> Response[dict[str, Any]]:
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), UserCreate)
        username = passwords.check_username(body.username)
        passwords.check_role(body.role)
        passwords.check_new_password(body.password, username)
        display = _display_name(body.display_name)
        sealed = await passwords.seal_async(site.key, body.password)
        async with users_lock(site):
            if views.user_account(site.reader, username) is not None:
                raise UserExists(f"user {username!r} exists already")
            await site.append(ev.UserCreated(username=username, role=body.role, password_sealed=sealed,
                                             display_name=display), actor=request.state.actor)
        return Response(views.user(site.reader, username), status_code=201)

    @get("/{username:str}", operation_id="getUser", opt={"roles": ADMIN})
    async def get_user(self, request: Request, username: str) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        _live(site, username)
        return views.user(site.reader, username)

    @patch("/{username:str}", operation_id="updateUser", opt={"roles": ADMIN, "body": UserUpdate})
    async def update_user(self, request: Request, username: str) -> dict[str, Any]:
        """Change a user's role, password (their sessions end) or display name."""
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), UserUpdate)
        if body.role is not None:
            passwords.check_role(body.role)
        if body.password is not None:
            passwords.check_new_password(body.password, username)
        display = _display_name(body.display_name) if body.display_name is not None else None
        sealed = await passwords.seal_async(site.key, body.password) if body.password is not None else None
        actor = request.state.actor
        async with users_lock(site):
            row = _live(site, username)
            name = row.username
            if body.role is not None and body.role != row.role:
                if row.role == "admin" and _other_admins(site, name) == 0:
                    raise RequestInvalid("this is the last admin user; make another admin first")
                await site.append(ev.UserRoleChanged(username=name, role=body.role), actor=actor)
            if sealed is not None:
                await site.append(ev.UserPasswordChanged(username=name, password_sealed=sealed), actor=actor)
                site.sessions.delete_user(name)
                forget_first_password(site, name)
            if display is not None and display != row.display_name:
                await site.append(ev.UserDetailsChanged(username=name, display_name=display), actor=actor)
        return views.user(site.reader, name)

    @delete("/{username:str}", operation_id="removeUser", opt={"roles": ADMIN}, status_code=200)
    async def remove_user(self, request: Request, username: str) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        async with users_lock(site):
            row = _live(site, username)
            if row.role == "admin" and _other_admins(site, row.username) == 0:
                raise RequestInvalid("this is the last admin user; make another admin first")
            await site.append(ev.UserRemoved(username=row.username), actor=request.state.actor)
        site.sessions.delete_user(row.username)
        forget_first_password(site, row.username)
        return {"removed": row.username}
