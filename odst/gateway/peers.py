"""/api/v1/peers and /api/v1/state (admin side) and /peer/v1 (site-to-site, signed)."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, ClassVar

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter

from odst.errors import Forbidden, NotFound, RequestInvalid, Unavailable
from odst.events import catalogue as ev
from odst.gateway.auth import ADMIN, READ, WRITE
from odst.gateway.bodies import decode_json
from odst.naming import MAX_INT64
from odst.peering import registration
from odst.peering.requests import NonceStoreUnavailable, PeerRequestRefused
from odst.projections import views
from odst.recovery import MirrorUnavailable, serve_page
from odst.replicator import integrity
from odst.replicator.scrub import read_status
from odst.gateway.context import GatewayContext


class InviteCreate(msgspec.Struct, forbid_unknown_fields=True):
    ttl_s: Annotated[int, msgspec.Meta(ge=60, le=30 * 86400, description="between 60 seconds and 30 days")] = registration.DEFAULT_TTL_S


class Join(msgspec.Struct, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(pattern=r"^\s*odst-invite-", max_length=registration.MAX_MESSAGE_BYTES,
                                       description="an invitation from `odst peer invite` (odst-invite-...)")]
    refusals: ClassVar = {"token": registration.InviteInvalid}


def state_digest(state: list) -> str:
    return hashlib.sha256(json.dumps(state, separators=(",", ":")).encode()).hexdigest()


class PeerController(Controller):
    path = "/api/v1"
    tags = ["peers"]

    @post("/peers/invites", operation_id="createInvite", opt={"roles": ADMIN, "body": InviteCreate, "body_optional": True}, status_code=201)
    async def create_invite(self, request: Request) -> dict[str, Any]:
        """A one-time invitation token for another site (``odst peer join TOKEN``)."""
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), InviteCreate, empty_is_object=True)
        if not 60 <= body.ttl_s <= 30 * 86400:
            raise RequestInvalid("ttl_s must be between 60 seconds and 30 days")
        return await registration.create_invite(site.registrar, actor=request.state.actor, ttl_s=body.ttl_s)

    @post("/peers/join", operation_id="joinPeer", opt={"roles": ADMIN, "body": Join}, status_code=201)
    async def join(self, request: Request) -> dict[str, Any]:
        """Complete a mutual registration with the site that made the invitation."""
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), Join, empty_is_object=True)
        result = await registration.join(site.registrar, body.token, actor=request.state.actor)
        site.replicator and site.replicator.kick()
        return result

    @get("/peers", operation_id="listPeers", opt={"roles": READ})
    async def list_peers(self, request: Request) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        peers = [msgspec.to_builtins(p) | {
            "link": await site.linker.status(p.site),
            "bad_chunks": site.replicator.bad_chunks.get(p.site, 0) if site.replicator else 0}
            for p in views.peer_sites(site.reader, site.id)]
        return {"site": site.id, "peers": peers, "removed": views.removed_peers(site.reader)}

    @delete("/peers/{peer:str}", operation_id="removePeer", opt={"roles": ADMIN}, status_code=200)
    async def remove_peer(self, request: Request, peer: str) -> dict[str, Any]:
        """Stop trusting a peer: its events after the last one seen here are ignored."""
        site: GatewayContext = request.app.state.site
        if not any(p.site == peer for p in views.peer_sites(site.reader, site.id)):
            raise NotFound(f"no peer {peer!r}")
        chain = views.site_chain(site.reader, peer)
        upto = chain.last_seq if chain else 0
        await site.append(ev.PeerRemoved(site=peer, upto_seq=upto), actor=request.state.actor)
        return {"removed": peer, "upto_seq": upto}

    @post("/verify", operation_id="verifyStore", opt={"roles": WRITE}, status_code=200)
    async def verify(self, request: Request, repair: bool = True) -> dict[str, Any]:
        """Re-hash every stored package; take damaged ones out of service and repair them from peers."""
        site: GatewayContext = request.app.state.site
        return await integrity.verify_store(site, actor=request.state.actor, repair=repair)

    @get("/integrity", operation_id="getIntegrity", opt={"roles": READ})
    async def integrity_status(self, request: Request) -> dict[str, Any]:
        """The background scrub's progress and the packages out of service here, awaiting repair."""
        site: GatewayContext = request.app.state.site
        st = site.settings
        return {"scrub": {**read_status(st.store_dir), "period_s": st.scrub_period_s,
                          "min_rate": st.scrub_min_rate, "max_rate": st.scrub_max_rate},
                "damaged": views.damaged(site.reader, site.id),
                "rechecks": [{"trigger": t, "result": r, "count": n}
                             for (t, r), n in sorted((site.integrity.rechecks if site.integrity else {}).items())]}

    @get("/state", operation_id="getState", opt={"roles": READ})
    async def state(self, request: Request) -> dict[str, Any]:
        """Replicated state with a digest equal on every converged site, plus local transfers."""
        site: GatewayContext = request.app.state.site
        replicated = views.replicated_state(site.reader)
        conflicts = views.conflicts(site.reader)
        return {"site": site.id,
                "digest": state_digest([replicated, [[c.name, c.blake3, c.winner] for c in conflicts]]),
                "packages": [{"name": n, "blake3": b, "stage": s, "available_at": sites}
                             for n, b, s, sites in replicated],
                "transfers": site.replicator.transfers() if site.replicator else [],
                "conflicts": conflicts,
                "name_collisions": views.name_collisions(site.reader),
                "chunks_served": dict(site.chunk_server.served) if site.chunk_server else {},
                "bad_chunks_from": dict(site.replicator.bad_chunks) if site.replicator else {},
                "quarantined": views.count(site.reader, "quarantine")}


class PeerProtocolController(Controller):
    """Site-to-site routes: no bearer token, a signature from a registered site instead."""

    path = "/peer/v1"
    tags = ["site-to-site"]

    @post("/register", operation_id="peerRegister", status_code=200, opt={"body": bytes},
          request_max_body_size=registration.MAX_MESSAGE_BYTES)
    async def register(self, request: Request) -> Response[bytes]:
        """A joining site's request, sealed to this site's key; the answer is signed and names
        the request it answers (see odst.peering.registration). Refusals are 4xx."""
        site: GatewayContext = request.app.state.site
        answer = await registration.handle_register(site.registrar, await request.body())
        return Response(answer, media_type="application/json")

    @get("/mirror/{start:int}", operation_id="peerMirrorPage")
    async def mirror_page(self, request: Request,
                          start: int = Parameter(ge=1, le=MAX_INT64, description="a stream sequence")) -> Response[bytes]:
        """Recovery: a page of this site's mirror of the requesting site's own log, from ``start``
        (exact stored bytes, subjects, headers). Only that site, signing with its key, may ask."""
        site: GatewayContext = request.app.state.site
        if start < 1:
            raise RequestInvalid("start must be a stream sequence, 1 or more")
        try:
            body = await serve_page(site.js, site.id, site.chunk_server.authorise, "GET",
                                    dict(request.headers), start)
        except PeerRequestRefused as exc:
            raise Forbidden(str(exc)) from None
        except NonceStoreUnavailable as exc:
            raise Unavailable(str(exc)) from None
        except MirrorUnavailable as exc:
            raise NotFound(str(exc)) from None
        return Response(body, media_type="application/json")
