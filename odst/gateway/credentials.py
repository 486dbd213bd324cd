"""/api/v1/credentials: NATS credentials for downstream services (admin only).

A subscriber credential lets a service outside the site read its events straight from
the broker: subscribe to ``odst.*.ev.>`` and read the event streams through consumers
named after it, with replies (and push deliveries) under its own inbox prefix, nothing else
(``odst.bus.authorization``). The seed is made here, returned once and never stored: the
log holds only the public NKey, and the broker's authorization block is rendered from the
read model.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from litestar import Controller, Request, Response, delete, get, post

from odst.accounts import passwords
from odst.bus import server_list
from odst.bus.authorization import subscriber_inbox
from odst.bus.identity import new_user_seed, public_key_of_seed
from odst.errors import NotFound, OdstError
from odst.events import catalogue as ev
from odst.gateway.auth import ADMIN
from odst.gateway.bodies import decode_json
from odst.gateway.constraints import END
from odst.gateway.users import users_lock
from odst.projections import views
from odst.gateway.context import GatewayContext

ROLES = ("subscriber",)
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_-]+")


class CredentialNameInvalid(OdstError):
    status, code = 400, "credential_name_invalid"


class CredentialExists(OdstError):
    status, code = 409, "credential_exists"


def check_name(name: str) -> str:
    """A credential's name is a NATS subject token and a consumer name: ASCII letters,
    digits, '_' and '-', 1 to MAX_NAME of them."""
    if not name:
        raise CredentialNameInvalid("name is empty")
    if len(name) > MAX_NAME:
        raise CredentialNameInvalid(f"name is {len(name)} characters; at most {MAX_NAME} allowed")
    if not _NAME.fullmatch(name):
        raise CredentialNameInvalid("name may contain only ASCII letters, digits, '_' and '-' "
                                    "(it names the service's JetStream consumer)")
    return name


def public_servers(urls: str) -> list[str]:
    """The broker URLs a service dials, without any user:password a site's own URL may carry."""
    out = []
    for url in server_list(urls):
        parts = urlsplit(url)
        out.append(urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])))
    return out


def usage(site_id: str, name: str) -> dict[str, Any]:
    """What a subscriber may do, as its creator is told once."""
    inbox = subscriber_inbox(name)
    return {
        "subscribe": f"odst.*.ev.> (this site's own events: odst.{site_id}.ev.>)",
        "streams": "EVENTS and the PEER_<site> mirrors, read-only",
        "consumers": f"one consumer per stream, named {name!r} (pull, or push delivering to {inbox}.…); "
                     "no unnamed, ephemeral or ordered consumers",
        "inbox": f"connect with inbox prefix {inbox}: replies come only to {inbox}.>, "
                 "which no one else is sent",
    }


class CredentialCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME, pattern=f"^{_NAME.pattern}{END}",
                                      description=f"1 to {MAX_NAME} ASCII letters, digits, '_' and '-' "
                                                  "(it names the service's JetStream consumer)")]
    role: Literal[ROLES] = "subscriber"
    refusals: ClassVar = {"name": CredentialNameInvalid}


class CredentialController(Controller):
    path = "/api/v1/credentials"
    tags = ["credentials"]

    @get("/", operation_id="listCredentials", opt={"roles": ADMIN})
    async def list_credentials(self, request: Request) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        return {"credentials": views.nats_credentials(site.reader)}

    @post("/", operation_id="createCredential", opt={"roles": ADMIN, "body": CredentialCreate})
    async def create_credential(self, request: Request) -> Response[dict[str, Any]]:
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), CredentialCreate)
        name, role = check_name(body.name), passwords.check_role(body.role, ROLES)
        seed = new_user_seed()
        nkey, credential_id = public_key_of_seed(seed), "nc_" + secrets.token_hex(8)
        # the "name is free" check and the event it allows are one step (the lock that serialises
        # user changes across the site's gateway processes; credentials are identities too)
        async with users_lock(site):
            if any(c.name.lower() == name.lower()
                   for c in views.nats_credentials(site.reader, include_revoked=False)):
                raise CredentialExists(f"a credential named {name!r} is active; revoke it first "
                                       "or choose another name")
            await site.append(ev.NatsCredentialCreated(credential_id=credential_id, name=name, role=role,
                                                       nkey=nkey), actor=request.state.actor)
        if not any(c.credential_id == credential_id  # the projection keeps the first of a name
                   for c in views.nats_credentials(site.reader, include_revoked=False)):
            raise CredentialExists(f"a credential named {name!r} was created at the same time; "
                                   "this one was not")
        return Response({"credential_id": credential_id, "name": name, "role": role, "nkey": nkey, "seed": seed,
                         "servers": public_servers(site.nats_url), "site": site.id,
                         "inbox_prefix": subscriber_inbox(name), "may": usage(site.id, name)}, status_code=201)

    @delete("/{credential_id:str}", operation_id="revokeCredential", opt={"roles": ADMIN}, status_code=200)
    async def revoke_credential(self, request: Request, credential_id: str) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        async with users_lock(site):
            if not any(c.credential_id == credential_id
                       for c in views.nats_credentials(site.reader, include_revoked=False)):
                raise NotFound(f"no active credential {credential_id!r}")
            await site.append(ev.NatsCredentialRevoked(credential_id=credential_id),
                              actor=request.state.actor)
        return {"revoked": credential_id}
