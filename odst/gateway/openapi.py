"""The OpenAPI document made true to what the API does, and OPTIONS answering a path's methods.

Handlers decode their own bodies (``bodies.decode_json``, for clear 400s), so Litestar sees no
``data`` parameter and documents no request body. Each such handler names its body in its
``opt``: ``"body": SomeStruct`` (JSON, schema from msgspec, the decoder that enforces it;
``"body_optional": True`` where an empty body means ``{}``) or ``"body": bytes`` (raw
octets). Every error the API sends is ``{"error": code, "detail": text}`` (``app._error``),
so that shape is the one documented for every error status. What a site's settings decide (its
stages, the package extensions it takes) is written into the document that site serves.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.routes import HTTPRoute

from odst.gateway.constraints import package_name_with_extension

ERROR_REF = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "description": "Every error answer of the API (4xx and 5xx).",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "a stable code, e.g. package_not_found, unauthorized"},
        "detail": {"type": "string", "description": "what went wrong and what to do, for a person"},
    },
}
_ERRORS = {
    "400": "the request is invalid (the detail says which part)",
    "401": "no valid API token or session",
    "403": "the token's or user's role may not do this",
}


def _error_response(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": ERROR_REF}}}


def _body(spec: Any, optional: bool, refs: dict) -> dict:
    if spec is bytes:
        return {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}
    return {"required": not optional, "content": {"application/json": {"schema": refs[spec]}}}


def document(app: Litestar) -> dict:
    """Complete Litestar's generated document in place (it caches it; /schema serves this dict)."""
    from litestar._openapi.plugin import OpenAPIPlugin

    schema = app.plugins.get(OpenAPIPlugin).provide_openapi_schema()
    handlers = [(route, handler) for route in app.routes if isinstance(route, HTTPRoute)
                for handler in route.route_handlers if handler.resolve_include_in_schema()]
    structs = sorted({h.opt["body"] for _, h in handlers if h.opt.get("body") not in (None, bytes)},
                     key=lambda t: t.__name__)
    refs: dict = {}
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    if structs:
        out, defs = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
        refs = dict(zip(structs, out))
        components.update(defs)
    components["Error"] = ERROR_SCHEMA
    for route, handler in handlers:
        for method in handler.http_methods:
            op = schema.get("paths", {}).get(route.path_format, {}).get(method.lower())
            if op is None:
                continue
            if "body" in handler.opt:
                op["requestBody"] = _body(handler.opt["body"], handler.opt.get("body_optional", False), refs)
            responses = op.setdefault("responses", {})
            for status, response in responses.items():
                if not status.startswith(("2", "3")):
                    responses[status] = _error_response(response.get("description") or _ERRORS.get(status, "error"))
            guarded = route.path_format.startswith("/api/") or handler.opt.get("roles")
            for status, text in _ERRORS.items():
                if status == "400" or (guarded and not handler.opt.get("public")):
                    responses.setdefault(status, _error_response(text))
            responses.setdefault("default", _error_response(
                "any other error (404, 409, 413, 415, 429, 503, 507, ...), in the same shape"))
    site = getattr(app.state, "site", None)
    if site is not None:
        _this_site(schema, site.settings)
    return schema


def _this_site(schema: dict, settings) -> None:
    """The rules a site's settings make: which stages exist, which extensions an upload may have."""
    stage = {"type": "string", "enum": list(settings.stages)}
    components = schema["components"]["schemas"]
    if "StagesChoice" in components:
        components["StagesChoice"]["properties"]["stages"]["items"] = stage
    if "PackageUpdate" in components:
        components["PackageUpdate"]["properties"]["stage"] = {"anyOf": [stage, {"type": "null"}], "default": None}
    upload = schema.get("paths", {}).get("/api/v1/packages/{name}", {}).get("put")
    for param in (upload or {}).get("parameters", []):
        if param["name"] == "stage":  # empty or left out: the site's default stage
            param["schema"] = {"oneOf": [{**stage, "enum": [*stage["enum"], ""]}, {"type": "null"}]}
        elif param["name"] == "name" and settings.allowed_extensions is not None:
            param["schema"]["pattern"] = package_name_with_extension(settings.allowed_extensions)


def _methods_by_path(app: Litestar) -> dict[str, bytes]:
    found = getattr(app.state, "_allow_by_path", None)
    if found is None:
        found = {route.path_format: ", ".join(sorted(route.methods)).encode()
                 for route in app.routes if isinstance(route, HTTPRoute)}
        app.state._allow_by_path = found
    return found


def allow_every_method(app):  # noqa: ANN001 - Litestar passes the next ASGI app by this name
    """ASGI middleware: an OPTIONS answer's Allow names every method of the path. Litestar's own
    OPTIONS handler keeps the methods of the first handlers registered on a path (OPTIONS
    /api/v1/packages/{name} said "DELETE, OPTIONS")."""
    async def answer(scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "OPTIONS":
            return await app(scope, receive, send)
        allow = _methods_by_path(scope["app"]).get(scope.get("path_template", ""))

        async def send_allow(message):
            if allow and message["type"] == "http.response.start":
                message = {**message, "headers": [*(h for h in message.get("headers", [])
                                                    if h[0].lower() != b"allow"), (b"allow", allow)]}
            await send(message)
        await app(scope, receive, send_allow)
    return answer
