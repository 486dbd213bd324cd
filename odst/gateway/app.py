"""The gateway: one Litestar app over the parts of the running site it uses (a GatewayContext)."""

from __future__ import annotations

from typing import Any

import structlog
from litestar import Litestar, Request, Response, Router, asgi, get
from litestar.types import Receive, Scope, Send
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig

from odst import __version__
from odst.errors import OdstError
from odst.events.log import AppendFailed
from odst.gateway.auth import auth_guard
from odst.gateway.bandwidth import BandwidthController
from odst.gateway.constraints import one_value_each
from odst.gateway.credentials import CredentialController
from odst.gateway.downloads import Downloads
from odst.gateway.events import EventController
from odst.gateway.jamf import JamfController
from odst.gateway.metrics import make_metrics
from odst.gateway.openapi import allow_every_method, document
from odst.gateway.notifications import EmailSubscriptionController, WebhookController
from odst.gateway.packages import PackageController, Uploads, error_answer
from odst.gateway.peers import PeerController, PeerProtocolController
from odst.gateway.session import SessionController
from odst.gateway.settings import SettingsController
from odst.gateway.tokens import TokenController
from odst.gateway.users import UserController
from odst.gateway.ui import ui_routes
from odst.gateway.context import GatewayContext

log = structlog.get_logger("odst.gateway")


def _odst_error(request: Request, exc: OdstError) -> Response:
    status, body, headers = error_answer(exc)
    return Response(body, status_code=status, headers=headers)


def _append_failed(request: Request, exc: AppendFailed) -> Response:
    log.error("event append failed", error=str(exc), path=request.url.path)
    status, body, headers = error_answer(exc)
    return Response(body, status_code=status, headers=headers)


def _http_error(request: Request, exc: HTTPException) -> Response:
    detail = exc.detail
    if isinstance(exc, ValidationException) and exc.extra:
        detail = f"{exc.detail}: {exc.extra}"
    return Response({"error": "http_error", "detail": str(detail)},
                    status_code=exc.status_code, headers=exc.headers)


def _internal(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", path=request.url.path)
    status, body, headers = error_answer(exc)
    return Response(body, status_code=status, headers=headers)


def create_gateway(site: GatewayContext):
    """The ASGI app the gateway serves: the distribution point's downloads (``downloads.py``,
    under the Mac download caps of ``egress.py``) and token-authenticated package uploads
    (``packages.Uploads``) in front of the Litestar app, so neither passes the framework."""
    gate = site.download_gate
    downloads = Downloads(site, [f"/{site.settings.context}/Packages", "/Packages"],
                          wrap=gate.wrap if gate is not None else None)
    return downloads.front(Uploads(site).front(create_app(site)))


def create_app(site: GatewayContext) -> Litestar:
    """The Litestar app: the Admin API, the peer protocol, the web UI, health and metrics."""

    @get("/healthz", operation_id="health")
    async def healthz(request: Request) -> Response[dict[str, Any]]:
        ok, reason = await site.health()
        return Response({"status": "ok" if ok else "unavailable", "reason": reason, "site": site.id},
                        status_code=200 if ok else 503)

    render_metrics = make_metrics(site.metrics)

    # Counts, lags, peer ids and alerts tell an outsider the site's shape and state: an API
    # token of any role (a scraper gets an auditor token) unless the operator makes it public.
    @get("/metrics", operation_id="metrics", media_type="text/plain", guards=[auth_guard],
         opt={"public": site.settings.metrics_public})
    async def metrics() -> Response[bytes]:
        """Prometheus metrics: `Authorization: Bearer <API token>` of any role, unless metrics_public."""
        body, content_type = await render_metrics()
        return Response(body, media_type=content_type)

    @asgi("/peer/v1/chunks", is_mount=True, copy_scope=True)
    async def peer_chunks(scope: Scope, receive: Receive, send: Send) -> None:
        await site.chunk_server.http(scope, receive, send)  # ChunkServer.serve, over HTTP

    api = Router(path="/", route_handlers=[PackageController, EventController, TokenController,
                                           PeerController, WebhookController, EmailSubscriptionController,
                                           SessionController, UserController, SettingsController,
                                           CredentialController, JamfController, BandwidthController],
                 guards=[auth_guard])
    app = Litestar(
        route_handlers=[healthz, metrics, peer_chunks, api, PeerProtocolController,
                        *ui_routes()],
        exception_handlers={OdstError: _odst_error, AppendFailed: _append_failed,
                            HTTPException: _http_error, Exception: _internal},
        openapi_config=OpenAPIConfig(title="ODST Admin API", version=__version__, path="/schema"),
        middleware=[allow_every_method],
        before_request=one_value_each,
        logging_config=None,
        debug=False,
    )
    app.state.site = site
    document(app)  # request bodies and the error shape, into the document /schema serves
    return app
