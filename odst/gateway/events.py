"""/api/v1/events: the signed event log for downstream services, paged and live (SSE)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncGenerator

import msgspec
from litestar import Controller, Request, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from odst.errors import OdstError
from odst.gateway.auth import READ, authenticate
from odst.naming import MAX_INT64, ascii_int
from odst.projections import views
from odst.gateway.context import GatewayContext

KEEPALIVE_S = 15.0


class EventController(Controller):
    path = "/api/v1"
    tags = ["events"]

    @get("/events", operation_id="listEvents", opt={"roles": READ})
    async def list_events(self, request: Request, after: int = Parameter(default=0, ge=0, le=MAX_INT64),
                          limit: int = Parameter(default=100, ge=1, le=1000),
                          type: str | None = None, origin: str | None = None,
                          name: str | None = None, actor: str | None = None,
                          # schema_extra: Litestar leaves out a minimum of 0 on an optional parameter
                          since: int | None = Parameter(default=None, ge=0, le=MAX_INT64, schema_extra={"minimum": 0}),
                          until: int | None = Parameter(default=None, ge=0, le=MAX_INT64, schema_extra={"minimum": 0}),
                          before: int | None = Parameter(default=None, ge=1, le=MAX_INT64)) -> dict[str, Any]:
        """Events with position > after, oldest first, each in its signed envelope.

        Filters: ``type``, ``origin`` (site), ``name`` (package, user, token…), ``actor``,
        ``since``/``until`` (unix ms, [since, until)). With ``before=N``: the newest
        events below position N, newest first (paging an event log backwards).
        """
        site: GatewayContext = request.app.state.site
        items = views.events(site.reader, after=after, limit=limit, type_=type, origin=origin, name=name,
                             actor=actor, since=since, until=until, before=before)
        return {"events": items, "last_position": views.last_position(site.reader)}

    @get("/events/stream", operation_id="streamEvents", opt={"roles": READ})
    async def stream_events(self, request: Request, after: int | None = Parameter(default=None, ge=0, le=MAX_INT64,
                                                                                  schema_extra={"minimum": 0}),
                            type: str | None = None, brief: bool = False) -> ServerSentEvent:
        """Server-Sent Events: every event after ``after`` (or Last-Event-ID), then live.

        ``brief=true`` leaves out what a live view does not need: the signed bytes and a
        manifest's chunk hashes (``chunk_count`` instead); ``GET /api/v1/events`` has them."""
        site: GatewayContext = request.app.state.site
        last_id = ascii_int(request.headers.get("last-event-id"))  # malformed: start from now
        position = after if after is not None else last_id if last_id is not None else \
            views.last_position(site.reader)

        async def feed() -> AsyncGenerator[ServerSentEventMessage, None]:
            nonlocal position
            yield ServerSentEventMessage(data=None, comment="odst event stream", retry=2000)
            while not site.stopping.is_set():
                batch = views.events(site.reader, after=position, limit=500, type_=type)
                for e in batch:
                    position = e.position
                    item = msgspec.to_builtins(e)
                    yield ServerSentEventMessage(data=json.dumps(_brief(item) if brief else item), event=e.type,
                                                 id=position)
                if batch:
                    continue
                if not await _idle(site, KEEPALIVE_S):
                    yield ServerSentEventMessage(data=None, comment="keep-alive")
                if views.last_position(site.reader) < position:  # read model rebuilt
                    position = views.last_position(site.reader)
                try:  # the caller may have signed out, lost their role or token since
                    principal = await authenticate(request, touch=False)
                except OdstError:
                    return
                if principal.role not in READ:
                    return

        return ServerSentEvent(feed())

    @get("/quarantine", operation_id="listQuarantine", opt={"roles": READ})
    async def list_quarantine(self, request: Request,
                              limit: int = Parameter(default=100, ge=1, le=1000)) -> dict[str, Any]:
        """Messages that failed verification or the hash chain: recorded, never applied."""
        site: GatewayContext = request.app.state.site
        items = views.quarantine(site.reader, limit)
        return {"quarantine": items, "count": views.count(site.reader, "quarantine")}

    @get("/site", operation_id="getSite", opt={"roles": READ})
    async def get_site(self, request: Request) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        chain = views.site_chain(site.reader, site.id)
        return {"site": site.id, "name": site.name, "public_key": site.key.public_key.hex(),
                "last_seq": chain.last_seq if chain else 0, "context": site.settings.context,
                "stages": site.settings.stages,
                "packages": views.count(site.reader, "packages"),
                "events": views.count(site.reader, "events"),
                "quarantined": views.count(site.reader, "quarantine")}


def _brief(e: dict) -> dict:
    """An event as the live feed of a page needs it: no signature, no chunk list."""
    out = {k: v for k, v in e.items() if k != "signed"}
    event = (e.get("envelope") or {}).get("event")
    if isinstance(event, dict) and "chunks" in event:
        out["envelope"] = {**e["envelope"], "event": {**{k: v for k, v in event.items() if k != "chunks"},
                                                      "chunk_count": len(event["chunks"])}}
    out["brief"] = True
    return out


async def _idle(site: GatewayContext, timeout: float) -> bool:
    """Wait for the projector to change something (or the site to stop); False when nothing changed."""
    before = views.last_position(site.reader)
    changed = asyncio.ensure_future(site.projection.wait_changed(timeout))
    stopping = asyncio.ensure_future(site.stopping.wait())
    try:
        await asyncio.wait([changed, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        changed.cancel()
        stopping.cancel()
    return views.last_position(site.reader) != before
