"""/api/v1/webhooks and /api/v1/email-subscriptions (admin): subscribe, list, remove, delivery log."""

from __future__ import annotations

import re
import secrets
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter

from odst.errors import NotFound, RequestInvalid
from odst.events import catalogue as ev
from odst.gateway.auth import ADMIN
from odst.gateway.bodies import decode_json
from odst.gateway.constraints import EMAIL_ADDRESS
from odst.notify.dispatcher import NOTIFIABLE
from odst.notify.ledger import Ledger
from odst.notify.signing import DELIVERY_HEADER, SIGNATURE_HEADER
from odst.notify.webhooks import webhook_secret
from odst.projections import views
from odst.gateway.context import GatewayContext

EMAIL = re.compile(r"^[^@\s<>,;]{1,64}@[^@\s<>,;]{1,255}$")


EventTypes = Annotated[list[Literal[NOTIFIABLE]], msgspec.Meta(
    min_length=1, description="a non-empty list of event types (GET /api/v1/webhooks lists them)")]


class WebhookCreate(msgspec.Struct, forbid_unknown_fields=True):
    # the host is checked by the handler (urlsplit): a 400 if it has none
    url: Annotated[str, msgspec.Meta(max_length=2000, pattern=r"^[hH][tT][tT][pP][sS]?://",
                                     description="an http:// or https:// URL with a host")]
    event_types: EventTypes
    description: Annotated[str, msgspec.Meta(max_length=500, description="at most 500 characters")] = ""


class EmailSubscriptionCreate(msgspec.Struct, forbid_unknown_fields=True):
    recipient: Annotated[str, msgspec.Meta(pattern=EMAIL_ADDRESS,
                                           description="one email address, such as admin@example.com")]
    event_types: EventTypes


def _event_types(types: list[str]) -> list[str]:
    unknown = sorted(set(types) - set(NOTIFIABLE))
    if not types or unknown:
        raise RequestInvalid(f"event_types must be a non-empty list of: {', '.join(NOTIFIABLE)}"
                             + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return sorted(set(types))


def _ledger(request: Request) -> Ledger:
    state = request.app.state
    if getattr(state, "notify_ledger", None) is None:
        state.notify_ledger = Ledger(state.site.data)
    return state.notify_ledger


def _webhook_view(w: views.Webhook) -> dict:
    return {k: getattr(w, k) for k in ("webhook_id", "url", "event_types", "description", "created_at", "created_by",
                              "removed_at")}


class WebhookController(Controller):
    path = "/api/v1/webhooks"
    tags = ["notifications"]

    @get("/", operation_id="listWebhooks", opt={"roles": ADMIN})
    async def list_webhooks(self, request: Request) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        return {"webhooks": [_webhook_view(w) for w in views.webhooks(site.reader)],
                "event_types": list(NOTIFIABLE)}

    @post("/", operation_id="createWebhook", opt={"roles": ADMIN, "body": WebhookCreate})
    async def create_webhook(self, request: Request) -> Response[dict[str, Any]]:
        """Subscribe a URL to event types. The signing secret is in this response only."""
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), WebhookCreate, empty_is_object=True)
        url = urlsplit(body.url)
        if url.scheme not in ("http", "https") or not url.hostname or len(body.url) > 2000:
            raise RequestInvalid("url must be an http:// or https:// URL with a host")
        if len(body.description) > 500:
            raise RequestInvalid("description must be at most 500 characters")
        webhook_id = "wh_" + secrets.token_hex(8)
        types = _event_types(body.event_types)
        await site.append(ev.WebhookSubscribed(webhook_id=webhook_id, url=body.url, event_types=types,
                                               description=body.description), actor=request.state.actor)
        return Response({**_webhook_view(views.webhook(site.reader, webhook_id)),
                         "secret": webhook_secret(site.key, webhook_id),
                         "signature_header": SIGNATURE_HEADER, "delivery_header": DELIVERY_HEADER},
                        status_code=201)

    @delete("/{webhook_id:str}", operation_id="removeWebhook", opt={"roles": ADMIN}, status_code=200)
    async def remove_webhook(self, request: Request, webhook_id: str) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        w = views.webhook(site.reader, webhook_id)
        if w is None or w.removed_at is not None:
            raise NotFound(f"no webhook {webhook_id!r}")
        await site.append(ev.WebhookRemoved(webhook_id=webhook_id), actor=request.state.actor)
        return {"removed": webhook_id}

    @get("/{webhook_id:str}/deliveries", operation_id="listWebhookDeliveries", opt={"roles": ADMIN})
    async def deliveries(self, request: Request, webhook_id: str, status: str | None = None,
                         limit: int = Parameter(default=100, ge=1, le=1000)) -> dict[str, Any]:
        """The delivery log: status (pending, retrying, delivered, failed, cancelled), attempts, last error."""
        site: GatewayContext = request.app.state.site
        if views.webhook(site.reader, webhook_id) is None:
            raise NotFound(f"no webhook {webhook_id!r}")
        return {"webhook_id": webhook_id,
                "deliveries": _ledger(request).deliveries(webhook_id, limit=limit, status=status)}


class EmailSubscriptionController(Controller):
    path = "/api/v1/email-subscriptions"
    tags = ["notifications"]

    @get("/", operation_id="listEmailSubscriptions", opt={"roles": ADMIN})
    async def list_subscriptions(self, request: Request) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        return {"subscriptions": views.email_subscriptions(site.reader),
                "smtp_configured": bool(site.settings.smtp_host),
                "digest_s": site.settings.notify_email_digest_s, "event_types": list(NOTIFIABLE)}

    @post("/", operation_id="createEmailSubscription", opt={"roles": ADMIN, "body": EmailSubscriptionCreate})
    async def create_subscription(self, request: Request) -> Response[dict[str, Any]]:
        site: GatewayContext = request.app.state.site
        body = decode_json(await request.body(), EmailSubscriptionCreate, empty_is_object=True)
        recipient = body.recipient.strip()
        if not EMAIL.match(recipient):
            raise RequestInvalid("recipient must be one email address, such as admin@example.com")
        sub_id = "em_" + secrets.token_hex(8)
        await site.append(ev.EmailSubscribed(subscription_id=sub_id, recipient=recipient,
                                             event_types=_event_types(body.event_types)),
                          actor=request.state.actor)
        row = next(s for s in views.email_subscriptions(site.reader) if s.subscription_id == sub_id)
        return Response(row, status_code=201)

    @delete("/{subscription_id:str}", operation_id="removeEmailSubscription", opt={"roles": ADMIN},
            status_code=200)
    async def remove_subscription(self, request: Request, subscription_id: str) -> dict[str, Any]:
        site: GatewayContext = request.app.state.site
        if not any(s.subscription_id == subscription_id for s in views.email_subscriptions(site.reader)):
            raise NotFound(f"no email subscription {subscription_id!r}")
        await site.append(ev.EmailUnsubscribed(subscription_id=subscription_id), actor=request.state.actor)
        return {"removed": subscription_id}
