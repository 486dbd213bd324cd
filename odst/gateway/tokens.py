"""/api/v1/tokens: API tokens for automation (admin only). A token is shown once."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post

from odst.accounts import passwords
from odst.errors import NotFound, RequestInvalid
from odst.events import catalogue as ev
from odst.gateway.auth import ADMIN
from odst.gateway.bodies import decode_json
from odst.gateway.constraints import NOT_BLANK
from odst.projections import views
from odst.accounts.tokens import token_digest
from odst.gateway.context import GatewayContext


class TokenCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=NOT_BLANK,
                                      description="1 to 200 characters, not all white space")]
    role: Literal[passwords.ROLES] = "operator"


class TokenController(Controller):
    path = "/api/v1/tokens"
    tags = ["tokens"]

    @get("/", operation_id="listTokens", opt={"roles": ADMIN})
    async def list_tokens(self, request: Request) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        return {"tokens": views.tokens(site.reader, site.id)}

    @post("/", operation_id="createToken", opt={"roles": ADMIN, "body": TokenCreate})
    async def create_token(self, request: Request) -> Response[dict[str, Any]]:
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), TokenCreate)
        passwords.check_role(body.role)
        if not body.name.strip() or len(body.name) > 200:
            raise RequestInvalid("name must be 1 to 200 characters")
        token = "odst_" + secrets.token_urlsafe(32)
        token_id = secrets.token_hex(8)
        await site.append(ev.TokenCreated(token_id=token_id, name=body.name, role=body.role,
                                          token_sha256=token_digest(token)), actor=request.state.actor)
        return Response({"token_id": token_id, "name": body.name, "role": body.role, "token": token},
                        status_code=201)

    @delete("/{token_id:str}", operation_id="revokeToken", opt={"roles": ADMIN}, status_code=200)
    async def revoke_token(self, request: Request, token_id: str) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        if not any(t.token_id == token_id and t.revoked_at is None
                   for t in views.tokens(site.reader, site.id)):
            raise NotFound(f"no active token {token_id!r}")
        await site.append(ev.TokenRevoked(token_id=token_id), actor=request.state.actor)
        return {"revoked": token_id}
