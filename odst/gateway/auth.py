"""Bearer-token authentication and role checks for every /api/ route."""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from odst.errors import Forbidden, Unauthorized
from odst.projections import views
from odst.site import Site, token_digest

READ = ("admin", "operator", "auditor")
WRITE = ("admin", "operator")
ADMIN = ("admin",)


def bearer_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    site: Site = connection.app.state.site
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    row = views.token_by_hash(site.reader, token_digest(token.strip()), site.id)
    if row is None:
        raise Unauthorized("token not recognised or revoked")
    roles = handler.opt.get("roles", READ)
    if row["role"] not in roles:
        raise Forbidden(f"role {row['role']!r} may not do this; needs one of {', '.join(roles)}")
    connection.state.actor = f"token:{row['token_id']}:{row['name']}"
    connection.state.role = row["role"]
