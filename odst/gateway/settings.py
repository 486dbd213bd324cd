"""/api/v1/settings: the site's effective settings for the UI, the stages it accepts, and a
check of the LDAP settings. Settings from odst.toml / ODST_* are read-only here."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get, post, put

from odst.accounts import ldap, passwords
from odst.errors import RequestInvalid
from odst.events import catalogue as ev
from odst.gateway.auth import ADMIN, READ
from odst.gateway.bodies import decode_json
from odst.gateway.constraints import SITE_NAME, SITE_NAME_MAX
from odst.projections import views
from odst.gateway.context import GatewayContext


class StagesChoice(msgspec.Struct, forbid_unknown_fields=True):
    # which stages exist is the site's setting: the document served names them (openapi.document)
    stages: Annotated[list[str], msgspec.Meta(min_length=1, description="one or more of the site's stages")]


class SiteNameChoice(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=SITE_NAME_MAX, pattern=SITE_NAME,
                                      description=f"1 to {SITE_NAME_MAX} characters, not all white space, "
                                                  "without control or format characters")]


def check_site_name(name: str) -> str:
    """A site name as admins type it: trimmed, 1 to 100 characters, no control or format characters."""
    name = name.strip()
    if not name or len(name) > SITE_NAME_MAX or any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")
                                                    for c in name):
        raise RequestInvalid(f"a site name is 1 to {SITE_NAME_MAX} characters without control characters")
    return name


def settings_json(site: GatewayContext) -> dict[str, Any]:
    s = site.settings
    chosen = views.site_setting(site.reader, "accepted_stages")
    named = views.site_names(site.reader).get(site.id)
    return {
        "site_id": site.id, "site_name": site.name,
        "site_name_source": ({"from": "event", "updated_at": named.updated_at, "updated_by": named.updated_by}
                             if named else {"from": "setting" if s.site_name else "default"}), "public_url": s.base_url, "context": s.context,
        "download_auth": s.download_auth, "stages": s.stages, "accepted_stages": views.replicated_stages(site.reader, s),
        "accepted_stages_source": ({"from": "event", "updated_at": chosen.updated_at,
                                    "updated_by": chosen.updated_by} if chosen else
                                   {"from": "setting" if s.accept_stages else "default"}),
        "default_stage": s.default_stage, "allowed_extensions": s.allowed_extensions,
        "max_upload_bytes": s.max_upload_bytes,
        "smtp": {"configured": bool(s.smtp_host), "host": s.smtp_host, "port": s.smtp_port,
                 "starttls": s.smtp_starttls, "from": s.smtp_from},
        "ldap": {"configured": bool(s.ldap_url), "url": s.ldap_url, "user_base": s.ldap_user_base,
                 "role_map": s.ldap_role_map},
        "session_idle_s": s.session_idle_s, "session_max_s": s.session_max_s,
        "signin_max_failures": s.signin_max_failures,
        "password_min_length": passwords.MIN_LENGTH,
        "jamf_configured": bool(s.jamf_url),
    }


class SettingsController(Controller):
    path = "/api/v1/settings"
    tags = ["site"]

    @get("/", operation_id="getSettings", opt={"roles": READ})
    async def get_settings(self, request: Request) -> dict[str, Any]:
        """This site's effective settings (odst.toml / ODST_* / flags, and its own choices); no secrets."""
        return settings_json(request.app.state.site)

    @put("/accepted-stages", operation_id="setAcceptedStages", opt={"roles": ADMIN, "body": StagesChoice})
    async def set_accepted_stages(self, request: Request) -> dict[str, Any]:
        """Choose the stages this site replicates (``{"stages": [...]}``); a signed event, effective at once."""
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), StagesChoice)
        unknown = [s for s in body.stages if s not in site.settings.stages]
        if unknown or not body.stages:
            raise RequestInvalid(f"stages must be one or more of {', '.join(site.settings.stages)}"
                                 + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else ""))
        stages = [s for s in site.settings.stages if s in body.stages]  # the configured order, no repeats
        if (stages != views.replicated_stages(site.reader, site.settings)
                or views.site_setting(site.reader, "accepted_stages") is None):
            await site.append(ev.StagesAccepted(stages=stages), actor=request.state.actor)
        if site.replicator:
            site.replicator.kick()
        return settings_json(site)

    @put("/site-name", operation_id="setSiteName", opt={"roles": ADMIN, "body": SiteNameChoice})
    async def set_site_name(self, request: Request) -> dict[str, Any]:
        """Rename this site (``{"name": "..."}``): a signed event, shown here and at every peer at once."""
        site: GatewayContext = request.app.state.site
        name = check_site_name(decode_json(await request.body(), SiteNameChoice).name)
        if name != site.name or views.site_names(site.reader).get(site.id) is None:
            await site.append(ev.SiteRenamed(name=name), actor=request.state.actor)
        return settings_json(site)

    @post("/ldap-check", operation_id="checkDirectory", opt={"roles": ADMIN}, status_code=200)
    async def check_directory(self, request: Request) -> dict[str, Any]:
        """Connect, bind as the service account and search the user base: is LDAP set up right?"""
        site: GatewayContext = request.app.state.site
        if not ldap.enabled(site.settings):
            raise RequestInvalid("LDAP is not configured (ldap_url is empty)")
        return {"ok": True, "detail": await ldap.POOL.run(ldap.check, site.settings)}
