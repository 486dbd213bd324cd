"""/api/v1/jamf: the Jamf Pro connection, distribution point records, sync and drift check.

Reading the state takes any role; changing Jamf Pro takes an admin (it writes into another
system with this site's Jamf Pro credentials, which never leave this process)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, get, post

from odst.errors import JamfUnavailable, NotFound, Unavailable
from odst.gateway.auth import ADMIN, READ
from odst.gateway.bodies import decode_json
from odst.jamf.client import JamfError
from odst.jamf.sync import JamfNotConfigured, package_state
from odst.gateway.context import GatewayContext as Site


class RegisterDp(msgspec.Struct, forbid_unknown_fields=True):
    all_sites: bool = False
    failover: str = ""


class SyncRequest(msgspec.Struct, forbid_unknown_fields=True):
    dry_run: bool = True


def _service(site: Site):
    if site.jamf is None or not site.jamf.configured:
        raise NotFound("no Jamf Pro server is configured on this site (jamf_url)")
    return site.jamf


async def _call(coro):
    try:
        return await coro
    except JamfNotConfigured as exc:
        raise NotFound(str(exc)) from None
    except JamfError as exc:
        raise JamfUnavailable(str(exc)) from None


def status_json(site: Site) -> dict[str, Any]:
    s = site.settings
    rows = site.reader.execute("SELECT state, count(*) FROM jamf_packages GROUP BY state").fetchall()
    dps = [dict(r) for r in site.reader.execute("SELECT site, record_id, dp_name, url, api, failover_site"
                                                 " FROM jamf_distribution_points ORDER BY dp_name")]
    out = {"configured": bool(s.jamf_url), "url": s.jamf_url,
           "auth": "oauth" if s.jamf_client_id else ("basic" if s.jamf_user else ""),
           "hash_type": s.jamf_hash_type, "stage": s.jamf_stage, "quorum": s.jamf_quorum,
           "dry_run": s.jamf_dry_run, "allow_deletes": s.jamf_allow_deletes,
           "check_interval_s": s.jamf_check_interval_s, "records": {r[0]: r[1] for r in rows},
           "distribution_points": dps, "connection": {"checked": False}, "last_check": {}}
    if site.jamf is not None:
        out["connection"] = site.jamf.connection
        out["last_check"] = {k: v for k, v in site.jamf.last_check.items() if k != "packages"}
    return out


class JamfController(Controller):
    path = "/api/v1/jamf"
    tags = ["jamf"]

    @get("/", operation_id="getJamf", opt={"roles": READ})
    async def get_status(self, request: Request) -> dict[str, Any]:
        """The Jamf Pro settings (no secrets), the last connection check, records by state, DP records."""
        return status_json(request.app.state.site)

    @get("/packages/{name:str}", operation_id="getJamfPackage", opt={"roles": READ})
    async def get_package(self, request: Request, name: str) -> dict[str, Any]:
        """Jamf Pro: in sync / hash differs / no record, for one package."""
        return package_state(request.app.state.site.reader, name)

    @post("/check-connection", operation_id="checkJamfConnection", opt={"roles": ADMIN}, status_code=200)
    async def check_connection(self, request: Request) -> dict[str, Any]:
        """Get a token and Jamf Pro's version: are the URL, credentials and CA right?"""
        result = await _call(_service(request.app.state.site).check_connection())
        if not result.get("ok"):
            raise JamfUnavailable(result.get("error", "Jamf Pro did not answer"))
        return result

    @post("/distribution-points", operation_id="registerJamfDistributionPoints", opt={"roles": ADMIN},
          status_code=200)
    async def register_dp(self, request: Request) -> dict[str, Any]:
        """Create or update this site's (``all_sites``: every site's) DP record, optional ``failover`` site."""
        body = decode_json(await request.body() or b"{}", RegisterDp)
        done = await _call(_service(request.app.state.site).register_dps(all_sites=body.all_sites,
                                                                          failover=body.failover))
        return {"distribution_points": done}

    @post("/sync", operation_id="syncJamf", opt={"roles": ADMIN}, status_code=200)
    async def sync(self, request: Request) -> dict[str, Any]:
        """Write pending package records now (``dry_run``, the default: only say what would change)."""
        site: Site = request.app.state.site
        body = decode_json(await request.body() or b"{}", SyncRequest)
        service = _service(site)
        if not body.dry_run and "projector" not in site.roles:
            raise Unavailable("package records are written by the projector process; it does so by itself")
        return {"dry_run": body.dry_run, "actions": await _call(service.sync_once(dry_run=body.dry_run,
                                                                                 force=True))}

    @post("/check", operation_id="checkJamf", opt={"roles": ADMIN}, status_code=200)
    async def check(self, request: Request) -> dict[str, Any]:
        """Compare Jamf Pro's package records with ODST now; drift is recorded (and notified)."""
        return await _call(_service(request.app.state.site).check())
