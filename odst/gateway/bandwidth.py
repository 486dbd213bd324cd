"""/api/v1/bandwidth: link limits and timetables, local networks, download caps, urgent packages.

Every change is a signed event (history shows who made it); the replicator and the chunk
server read the result within a second (odst.replicator.bandwidth), without restarting
transfers. Reading needs any role; link limits, local networks and download caps are an
admin's choice; marking a package urgent is an operator's (a hotfix must not wait for an
admin), and the event names who did it.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, put

from odst.errors import NotFound, RequestInvalid
from odst.events import catalogue as ev
from odst.gateway.auth import ADMIN, READ, WRITE
from odst.gateway.bodies import decode_json
from odst.gateway.context import GatewayContext
from odst.gateway.packages import PACKAGE_NAME_PARAM
from odst.naming import check_name
from odst.projections import views
from odst.replicator import bandwidth as bw

MAX_WINDOWS = 48
MAX_CIDRS = 256
MAX_CAP = 1_000_000


class LinkLimits(msgspec.Struct, forbid_unknown_fields=True):
    send: str | int = 0  # bytes per second: 20MB, 2MiB, 500k, 0/off
    receive: str | int = 0
    burst: str | int = 0  # bytes; 0: an eighth of a second at the rate, at least one chunk
    windows: list[str | dict] = []  # "mon-fri 08:00-18:00 2MB" or {"days", "start", "end", "limit"}
    local: str = "auto"  # auto | yes | no


class LocalNetworks(msgspec.Struct, forbid_unknown_fields=True):
    exempt: bool = True
    cidrs: Annotated[list[str], msgspec.Meta(max_length=MAX_CIDRS, description=f"at most {MAX_CIDRS} networks")] = \
        msgspec.field(default_factory=lambda: list(bw.DEFAULT_LOCAL_CIDRS))


Cap = Annotated[int, msgspec.Meta(ge=0, le=MAX_CAP, description=f"0 (no cap) up to {MAX_CAP}")]


class DownloadCapsBody(msgspec.Struct, forbid_unknown_fields=True):
    egress: str | Annotated[int, msgspec.Meta(ge=0, le=bw.MAX_RATE)] = 0  # bytes per second to Macs in total; 0: no limit
    max_concurrent: Cap = 0  # downloads at once; 0: no cap
    per_client: Cap = 0  # downloads at once per client address; 0: no cap


class Urgency(msgspec.Struct, forbid_unknown_fields=True):
    urgent: bool = True
    reason: Annotated[str, msgspec.Meta(max_length=500, description="at most 500 characters")] = ""


def _link_name(site: GatewayContext, link: str) -> str:
    if link == "default":
        return bw.DEFAULT_LINK
    if not any(p.site == link for p in views.peer_sites(site.reader, site.id)):
        raise NotFound(f"no peer {link!r} (a peer's site id, or 'default' for every link without its own)")
    return link


def link_event(link: str, body: LinkLimits) -> ev.LinkBandwidthSet:
    if body.local not in ("auto", "yes", "no"):
        raise bw.BandwidthInvalid("local is auto (by the local networks), yes (never limited) or no")
    if len(body.windows) > MAX_WINDOWS:
        raise bw.BandwidthInvalid(f"at most {MAX_WINDOWS} windows per link")
    windows = [bw.parse_window(w) for w in body.windows]
    return ev.LinkBandwidthSet(
        link=link, send_bps=bw.parse_rate(body.send), receive_bps=bw.parse_rate(body.receive),
        burst_bytes=bw.parse_rate(body.burst), local=body.local,
        windows=[ev.TimeWindow(**w.as_json()) for w in windows])


def bandwidth_json(site: GatewayContext) -> dict[str, Any]:
    b: bw.Bandwidth = site.bandwidth
    b.refresh()
    choices = b.choices()
    urgent = [dict(r) for r in site.reader.execute(
        "SELECT name, reason, marked_by, origin, marked_at FROM urgent_packages WHERE urgent=1 ORDER BY name")]
    return {"site": site.id, "timezone": site.settings.timezone or "system",
            "local_time": b.wall().isoformat(timespec="seconds"),
            "default": bw.policy_json(choices.default),
            "links": [b.link_status(p.site) | {"name": p.name}
                      for p in views.peer_sites(site.reader, site.id)],
            "local_networks": {"exempt": choices.exempt, "cidrs": choices.cidrs},
            "downloads": site.download_gate.status() if site.download_gate else None,
            "urgent": urgent}


class BandwidthController(Controller):
    path = "/api/v1/bandwidth"
    tags = ["bandwidth"]

    @get("/", operation_id="getBandwidth", opt={"roles": READ})
    async def get_bandwidth(self, request: Request) -> dict[str, Any]:
        """Per link: the policy, the limit in force now, the window state and the measured rate;
        the local networks, download caps and urgent packages."""
        return bandwidth_json(request.app.state.site)

    @put("/links/{link:str}", operation_id="setLinkLimits", opt={"roles": ADMIN, "body": LinkLimits})
    async def set_link(self, request: Request, link: str) -> dict[str, Any]:
        """Limits and weekly timetable of one link (a peer's site id) or of every link without
        its own (``default``, network-wide). A signed event; in force within a second."""
        site: GatewayContext = request.app.state.site
        event = link_event(_link_name(site, link), decode_json(await request.body(), LinkLimits))
        await site.append(event, actor=request.state.actor)
        return bandwidth_json(site)

    @delete("/links/{link:str}", operation_id="clearLinkLimits", opt={"roles": ADMIN}, status_code=200)
    async def clear_link(self, request: Request, link: str) -> dict[str, Any]:
        """Drop a link's own limits (it follows the default again), or the default itself."""
        site: GatewayContext = request.app.state.site
        await site.append(ev.LinkBandwidthCleared(link=_link_name(site, link)), actor=request.state.actor)
        return bandwidth_json(site)

    @put("/local", operation_id="setLocalNetworks", opt={"roles": ADMIN, "body": LocalNetworks})
    async def set_local(self, request: Request) -> dict[str, Any]:
        """Which peers count as local (by the address of their URL) and whether local links are exempt."""
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), LocalNetworks, empty_is_object=True)
        if len(body.cidrs) > MAX_CIDRS:
            raise RequestInvalid(f"at most {MAX_CIDRS} networks")
        await site.append(ev.LocalNetworksSet(exempt=body.exempt, cidrs=bw.parse_cidrs(body.cidrs)),
                          actor=request.state.actor)
        return bandwidth_json(site)

    @put("/downloads", operation_id="setDownloadCaps", opt={"roles": ADMIN, "body": DownloadCapsBody})
    async def set_downloads(self, request: Request) -> dict[str, Any]:
        """Caps on Mac downloads: total egress, downloads at once, per client (0: none). Beyond
        them a Mac gets 503 with Retry-After and tries again."""
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), DownloadCapsBody, empty_is_object=True)
        if not (0 <= body.max_concurrent <= MAX_CAP and 0 <= body.per_client <= MAX_CAP):
            raise RequestInvalid(f"max_concurrent and per_client are 0 (no cap) up to {MAX_CAP}")
        await site.append(ev.DownloadCapsSet(egress_bps=bw.parse_rate(body.egress),
                                             max_concurrent=body.max_concurrent, per_client=body.per_client),
                          actor=request.state.actor)
        return bandwidth_json(site)

    @put("/urgent/{name:str}", operation_id="setPackageUrgency", opt={"roles": WRITE, "body": Urgency})
    async def set_urgency(self, request: Request, name: str = PACKAGE_NAME_PARAM) -> dict[str, Any]:
        """Mark a package urgent (it crosses paused windows and limits on every site) or not."""
        site: GatewayContext = request.app.state.site
        check_name(name)
        pkg = views.package(site.reader, name)
        if pkg is None:
            raise NotFound(f"no package {name!r}")
        name = pkg.name  # any spelling finds it; the mark names the package as it is shown
        body = decode_json(await request.body(), Urgency, empty_is_object=True)
        if len(body.reason) > 500:
            raise RequestInvalid("reason: at most 500 characters")
        await site.append(ev.PackageUrgencySet(name=name, urgent=body.urgent, reason=body.reason),
                          actor=request.state.actor)
        if site.replicator:
            site.replicator.kick()
        return bandwidth_json(site)
