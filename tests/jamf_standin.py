"""A stand-in Jamf Pro server for the tests: the endpoints ODST uses, real HTTP on 127.0.0.1.

No Jamf Pro server is reachable here, so this one stands in, and its shapes come from an
independent source, not from ODST: every package record a request carries and every one it
answers with is validated against ``jamf_pro_sdk.models.pro.packages.Package``, and every
token answer is read the way the SDK reads it into ``jamf_pro_sdk.models.client.AccessToken``
(the Mac-admin community's SDK, ``jamf-pro-sdk`` on PyPI, 0.9a1: its Package model is the
Jamf Pro API 11.5+ ``/api/v1/packages`` record with ``hashType``/``hashValue``; its token
readers follow ``/api/v1/oauth/token`` and ``/api/v1/auth/token``). The SDK has no
distribution point model: those bodies are checked against the fields and enums of Jamf's
API reference (``/api/v1/distribution-points``, 11.16+; Classic ``<distribution_point>``).
A body that fails is answered 400 and kept in ``errors``, and the tests assert it is empty.

Behaviour a client must survive: tokens that live ``token_lifetime`` seconds (401 after),
``packages_api_404`` (a server before 11.5: package records only through the Classic
``/JSSResource/packages``, whose XML is checked against and written by the SDK's
``ClassicPackage``), ``revoke_tokens()`` (401 mid-operation), ``revoke_after(method, path)`` (401 on the request after
that one: a token dying between two steps of one sync), ``dp_api_404`` (a server before 11.16),
``new_oauth_404`` (a server with only ``/api/v1/oauth/token``). ``hash_history`` records every
change of a record's hash with the time it happened (time.monotonic()), for the replace story.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import threading
import time
from datetime import datetime, timedelta, timezone
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

from aiohttp import web
from defusedxml.ElementTree import fromstring as safe_xml
from jamf_pro_sdk.models.classic.packages import ClassicPackage
from jamf_pro_sdk.models.client import AccessToken
from jamf_pro_sdk.models.pro.packages import Package
from pydantic import ValidationError

CLIENT_ID, CLIENT_SECRET = "odst-client", "s3cret-client"
USER, PASSWORD = "odst-api", "s3cret-password"

# Jamf Pro API reference, POST /v1/distribution-points (the SDK has no model for it)
DP_REQUIRED = {"name": str, "serverName": str, "fileSharingConnectionType": str}
DP_FIELDS = {"name": str, "serverName": str, "principal": bool, "backupDistributionPointId": str,
             "sshUsername": str, "sshPassword": str, "localPathToShare": str, "fileSharingConnectionType": str,
             "shareName": str, "workgroup": str, "port": int, "readWriteUsername": str, "readWritePassword": str,
             "readOnlyUsername": str, "readOnlyPassword": str, "noAuthenticationRequired": bool,
             "httpsEnabled": bool, "httpsPort": int, "httpsContext": str, "httpsSecurityType": str,
             "httpsUsername": str, "httpsPassword": str, "enableLoadBalancing": bool}
# Classic API reference, <distribution_point>
CLASSIC_DP_ELEMENTS = {"id", "name", "ip_address", "is_master", "failover_point", "failover_point_url",
                       "enable_load_balancing", "local_path", "ssh_username", "password", "connection_type",
                       "share_name", "workgroup_or_domain", "share_port", "read_only_username",
                       "read_only_password", "read_write_username", "read_write_password",
                       "http_downloads_enabled", "http_url", "context", "protocol", "port",
                       "no_authentication_required", "username_password_required", "http_username",
                       "http_password"}


class JamfStandin:
    def __init__(self, *, token_lifetime: float = 3.0, version: str = "11.20.0"):
        self.token_lifetime = token_lifetime
        self.version = version
        self.dp_api_404 = False
        self.packages_api_404 = False
        self.new_oauth_404 = False
        self.tokens: dict[str, float] = {}  # token -> monotonic expiry
        self.packages: dict[str, dict] = {}
        self.dps: dict[str, dict] = {}
        self.classic_dps: dict[str, dict] = {}
        self.errors: list[str] = []
        self.log: list[tuple[str, str, int]] = []
        self.hash_history: list[tuple[float, str, str]] = []  # (monotonic time, fileName, hashValue)
        self._revoke_after: tuple[str, str] | None = None
        self.tokens_issued = 0
        self._next_id = 1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ----------------------------------------------------------------- running

    def start(self) -> "JamfStandin":
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        threading.Thread(target=run, name="jamf-standin", daemon=True).start()
        if not ready.wait(10):
            raise RuntimeError("the Jamf Pro stand-in did not start")
        return self

    async def _start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_post("/api/oauth/token", self.oauth_token)
        r.add_post("/api/v1/oauth/token", self.oauth_token)
        r.add_post("/api/v1/auth/token", self.basic_token)
        r.add_get("/api/v1/jamf-pro-version", self.get_version)
        r.add_get("/api/v1/packages", self.list_packages)
        r.add_post("/api/v1/packages", self.create_package)
        r.add_get("/api/v1/packages/{id}", self.get_package)
        r.add_put("/api/v1/packages/{id}", self.update_package)
        r.add_delete("/api/v1/packages/{id}", self.delete_package)
        r.add_get("/JSSResource/packages", self.classic_list_packages)
        r.add_get("/JSSResource/packages/name/{name}", self.classic_get_package)
        r.add_get("/JSSResource/packages/id/{id}", self.classic_get_package)
        r.add_post("/JSSResource/packages/id/0", self.classic_create_package)
        r.add_put("/JSSResource/packages/id/{id}", self.classic_put_package)
        r.add_delete("/JSSResource/packages/id/{id}", self.classic_delete_package)
        r.add_get("/api/v1/distribution-points", self.list_dps)
        r.add_post("/api/v1/distribution-points", self.create_dp)
        r.add_put("/api/v1/distribution-points/{id}", self.update_dp)
        r.add_get("/JSSResource/distributionpoints/name/{name}", self.classic_get_dp)
        r.add_put("/JSSResource/distributionpoints/name/{name}", self.classic_put_dp)
        r.add_post("/JSSResource/distributionpoints/id/0", self.classic_create_dp)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    # ----------------------------------------------------------------- switches for the tests

    def revoke_tokens(self) -> None:
        """Every token issued so far is refused from now on (401), as after a restart of Jamf Pro."""
        self.tokens.clear()

    def revoke_after(self, method: str, path: str) -> None:
        """Once: revoke every token right after answering the next ``method path`` (query ignored)."""
        self._revoke_after = (method, path)

    def hashes_of(self, file_name: str) -> list[str]:
        """The hash values the record of ``file_name`` held, in order, each change once."""
        return [h for _, f, h in self.hash_history if f == file_name]

    def _note_hash(self, record: dict, before: dict | None) -> None:
        if before is None or (before.get("hashValue"), before.get("fileName")) != (record.get("hashValue"),
                                                                                  record.get("fileName")):
            self.hash_history.append((time.monotonic(), record.get("fileName", ""), record.get("hashValue") or ""))

    def by_file(self, file_name: str) -> dict | None:
        return next((p for p in self.packages.values() if p["fileName"] == file_name), None)

    def edit_hash(self, file_name: str, value: str) -> None:
        record = self.by_file(file_name)
        before = dict(record)
        record["hashValue"] = value
        self._note_hash(record, before)

    # ----------------------------------------------------------------- plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        public = request.path in ("/api/oauth/token", "/api/v1/oauth/token", "/api/v1/auth/token")
        if not public:
            auth = request.headers.get("Authorization", "")
            token = auth[7:] if auth.startswith("Bearer ") else ""
            expiry = self.tokens.get(token)
            if expiry is None or time.monotonic() >= expiry:
                self.log.append((request.method, request.path, 401))
                return web.json_response({"httpStatus": 401, "errors": [{"code": "INVALID_TOKEN"}]}, status=401)
        response = await handler(request)
        self.log.append((request.method, request.path, response.status))
        if self._revoke_after == (request.method, request.path):
            self._revoke_after = None
            self.revoke_tokens()
        return response

    def _invalid(self, what: str) -> web.Response:
        self.errors.append(what)
        return web.json_response({"httpStatus": 400, "errors": [{"description": what}]}, status=400)

    def _issue(self) -> tuple[str, float]:
        token = secrets.token_urlsafe(24)
        self.tokens[token] = time.monotonic() + self.token_lifetime
        self.tokens_issued += 1
        return token, self.token_lifetime

    # ----------------------------------------------------------------- tokens

    async def oauth_token(self, request: web.Request) -> web.Response:
        if request.path == "/api/oauth/token" and self.new_oauth_404:
            return web.json_response({"httpStatus": 404}, status=404)
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return self._invalid(f"oauth: grant_type {form.get('grant_type')!r}")
        if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        token, lifetime = self._issue()
        body = {"access_token": token, "scope": "api-role:1", "token_type": "Bearer", "expires_in": int(lifetime)}
        # read it exactly as jamf_pro_sdk.clients.auth.ApiClientCredentialsProvider does
        AccessToken(type="oauth", token=body["access_token"], scope=body["scope"].split(),
                    expires=datetime.now(timezone.utc) + timedelta(seconds=body["expires_in"]))
        return web.json_response(body)

    async def basic_token(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        try:
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":") if auth.startswith("Basic ") \
                else ("", "", "")
        except ValueError:
            user, password = "", ""
        if (user, password) != (USER, PASSWORD):
            return web.json_response({"httpStatus": 401}, status=401)
        token, lifetime = self._issue()
        expires = (datetime.now(timezone.utc) + timedelta(seconds=lifetime)).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        body = {"token": token, "expires": expires}
        AccessToken(type="user", **body)  # as jamf_pro_sdk.clients.auth.UserCredentialsProvider reads it
        return web.json_response(body)

    async def get_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version})

    # ----------------------------------------------------------------- packages (Jamf Pro API 11.5+)

    def _checked(self, record: dict) -> dict | None:
        try:
            Package.model_validate(record)
            return record
        except ValidationError as exc:
            self.errors.append(f"package record fails jamf_pro_sdk's Package model: {exc}")
            return None

    async def list_packages(self, request: web.Request) -> web.Response:
        if self.packages_api_404:
            return web.json_response({"httpStatus": 404}, status=404)
        page = int(request.query.get("page", "0"))
        size = int(request.query.get("page-size", "100"))
        found = list(self.packages.values())
        rsql = request.query.get("filter", "")
        if rsql:
            field, _, value = rsql.partition("==")
            if field != "fileName" or not (value.startswith('"') and value.endswith('"')):
                return self._invalid(f"unsupported filter {rsql!r}")
            found = [p for p in found if p["fileName"] == value[1:-1].replace('\\"', '"')]
        results = [self._checked(dict(p)) for p in found[page * size:(page + 1) * size]]
        return web.json_response({"totalCount": len(found), "results": results})

    async def _package_body(self, request: web.Request) -> dict | web.Response:
        body = await request.json()
        if "id" in body:
            return self._invalid("a package body must not carry id")
        try:
            Package.model_validate({"id": None, **body})
        except ValidationError as exc:
            return self._invalid(f"package body fails jamf_pro_sdk's Package model: {exc}")
        if body.get("hashType") not in ("MD5", "SHA_512", "SHA3_512", None):
            return self._invalid(f"hashType {body.get('hashType')!r}")
        return body

    async def create_package(self, request: web.Request) -> web.Response:
        if self.packages_api_404:
            return web.json_response({"httpStatus": 404}, status=404)
        body = await self._package_body(request)
        if isinstance(body, web.Response):
            return body
        if self.by_file(body["fileName"]):
            return web.json_response({"httpStatus": 409, "errors": [{"code": "DUPLICATE_FIELD"}]}, status=409)
        pid = str(self._next_id)
        self._next_id += 1
        self.packages[pid] = {"id": pid, **body}
        self._note_hash(self.packages[pid], None)
        return web.json_response({"id": pid, "href": f"{self.url}/api/v1/packages/{pid}"}, status=201)

    async def get_package(self, request: web.Request) -> web.Response:
        if self.packages_api_404:
            return web.json_response({"httpStatus": 404}, status=404)
        p = self.packages.get(request.match_info["id"])
        if p is None:
            return web.json_response({"httpStatus": 404}, status=404)
        return web.json_response(self._checked(dict(p)))

    async def update_package(self, request: web.Request) -> web.Response:
        if self.packages_api_404:
            return web.json_response({"httpStatus": 404}, status=404)
        pid = request.match_info["id"]
        if pid not in self.packages:
            return web.json_response({"httpStatus": 404}, status=404)
        body = await self._package_body(request)
        if isinstance(body, web.Response):
            return body
        before = self.packages[pid]
        self.packages[pid] = {"id": pid, **body}
        self._note_hash(self.packages[pid], before)
        return web.json_response(self._checked(dict(self.packages[pid])))

    async def delete_package(self, request: web.Request) -> web.Response:
        if self.packages_api_404:
            return web.json_response({"httpStatus": 404}, status=404)
        if self.packages.pop(request.match_info["id"], None) is None:
            return web.json_response({"httpStatus": 404}, status=404)
        return web.Response(status=204)

    # ----------------------------------------------------------------- packages (Classic API)

    def _classic_package_body(self, text: str) -> dict | web.Response:
        try:
            root = safe_xml(text)
        except ElementTree.ParseError as exc:
            return self._invalid(f"classic package: not XML: {exc}")
        fields = {c.tag: (c.text or "") for c in root}
        unknown = sorted(set(fields) - set(ClassicPackage.model_fields))
        if root.tag != "package" or unknown or "id" in fields:
            return self._invalid(f"classic package: root <{root.tag}>, unknown elements {unknown} or an <id>")
        try:
            ClassicPackage.model_validate(fields)
        except ValidationError as exc:
            return self._invalid(f"classic package fails jamf_pro_sdk's ClassicPackage model: {exc}")
        if fields.get("hash_type", "MD5") not in ("MD5", "SHA_512"):  # what servers before 11.5 know
            return self._invalid(f"classic package: hash_type {fields.get('hash_type')!r}")
        return {k: v for k, v in {"packageName": fields.get("name"), "fileName": fields.get("filename"),
                                  "hashType": fields.get("hash_type"), "hashValue": fields.get("hash_value"),
                                  "notes": fields.get("notes")}.items() if v is not None}

    def _classic_package_xml(self, p: dict) -> str:
        return ClassicPackage(id=int(p["id"]), name=p.get("packageName"), filename=p.get("fileName"),
                              category="No category assigned", priority=10, notes=p.get("notes", ""),
                              hash_type=p.get("hashType"), hash_value=p.get("hashValue")).xml()

    async def classic_list_packages(self, request: web.Request) -> web.Response:
        items = "".join(f"<package><id>{p['id']}</id><name>{xml_escape(p['packageName'])}</name></package>"
                        for p in self.packages.values())
        return web.Response(text=f"<packages><size>{len(self.packages)}</size>{items}</packages>",
                            content_type="application/xml")

    async def classic_get_package(self, request: web.Request) -> web.Response:
        key = request.match_info.get("id")
        p = self.packages.get(key) if key else next(
            (x for x in self.packages.values() if x["packageName"] == request.match_info["name"]), None)
        if p is None:
            return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        return web.Response(text=self._classic_package_xml(p), content_type="application/xml")

    async def classic_create_package(self, request: web.Request) -> web.Response:
        body = self._classic_package_body(await request.text())
        if isinstance(body, web.Response):
            return body
        if not body.get("packageName") or not body.get("fileName"):
            return self._invalid("classic package: a new record needs <name> and <filename>")
        if any(p["packageName"] == body["packageName"] for p in self.packages.values()):
            return web.Response(status=409, text="<html>Conflict: duplicate name</html>", content_type="text/html")
        pid = str(self._next_id)
        self._next_id += 1
        self.packages[pid] = {"id": pid, **body}
        self._note_hash(self.packages[pid], None)
        return web.Response(status=201, text=f"<package><id>{pid}</id></package>", content_type="application/xml")

    async def classic_put_package(self, request: web.Request) -> web.Response:
        pid = request.match_info["id"]
        if pid not in self.packages:
            return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        body = self._classic_package_body(await request.text())
        if isinstance(body, web.Response):
            return body
        before = self.packages[pid]
        self.packages[pid] = {**before, **body}  # a Classic PUT changes only the elements it carries
        self._note_hash(self.packages[pid], before)
        return web.Response(status=201, text=f"<package><id>{pid}</id></package>", content_type="application/xml")

    async def classic_delete_package(self, request: web.Request) -> web.Response:
        if self.packages.pop(request.match_info["id"], None) is None:
            return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        return web.Response(status=200, text="<package><id>0</id></package>", content_type="application/xml")

    # ----------------------------------------------------------------- distribution points

    def _dp_errors(self, body: dict) -> list[str]:
        errors = [f"missing {k}" for k in DP_REQUIRED if k not in body]
        errors += [f"unknown field {k}" for k in body if k not in DP_FIELDS]
        errors += [f"{k} must be {t.__name__}" for k, t in DP_FIELDS.items()
                   if k in body and not (isinstance(body[k], t) and not (t is int and isinstance(body[k], bool)))]
        if body.get("fileSharingConnectionType") not in ("NONE", "AFP", "SMB"):
            errors.append("fileSharingConnectionType must be NONE, AFP or SMB")
        if body.get("fileSharingConnectionType") == "NONE" and not body.get("httpsEnabled"):
            errors.append("either file sharing or httpsEnabled is needed")
        if body.get("httpsEnabled") and not (body.get("httpsPort") and "httpsContext" in body):
            errors.append("httpsEnabled needs httpsPort and httpsContext")
        if body.get("httpsSecurityType", "NONE") not in ("NONE", "USERNAME_PASSWORD"):
            errors.append("httpsSecurityType must be NONE or USERNAME_PASSWORD")
        return errors

    async def list_dps(self, request: web.Request) -> web.Response:
        if self.dp_api_404:
            return web.json_response({"httpStatus": 404}, status=404)
        return web.json_response({"totalCount": len(self.dps), "results": list(self.dps.values())})

    async def create_dp(self, request: web.Request) -> web.Response:
        if self.dp_api_404:
            return web.json_response({"httpStatus": 404}, status=404)
        body = await request.json()
        if errors := self._dp_errors(body):
            return self._invalid("distribution point: " + "; ".join(errors))
        did = str(self._next_id)
        self._next_id += 1
        self.dps[did] = {"id": did, **body}
        return web.json_response({"id": did, "href": f"{self.url}/api/v1/distribution-points/{did}"}, status=201)

    async def update_dp(self, request: web.Request) -> web.Response:
        did = request.match_info["id"]
        if self.dp_api_404 or did not in self.dps:
            return web.json_response({"httpStatus": 404}, status=404)
        body = await request.json()
        if errors := self._dp_errors(body):
            return self._invalid("distribution point: " + "; ".join(errors))
        self.dps[did] = {"id": did, **body}
        return web.json_response(self.dps[did])

    def _classic_body(self, text: str) -> dict | web.Response:
        try:
            root = safe_xml(text)
        except ElementTree.ParseError as exc:
            return self._invalid(f"classic distribution point: not XML: {exc}")
        if root.tag != "distribution_point":
            return self._invalid(f"classic distribution point: root <{root.tag}>")
        unknown = [c.tag for c in root if c.tag not in CLASSIC_DP_ELEMENTS]
        if unknown or root.find("name") is None:
            return self._invalid(f"classic distribution point: unknown {unknown} or no <name>")
        fields = {c.tag: (c.text or "") for c in root}
        if fields.get("protocol") not in ("http", "https") or not fields.get("port", "").isdigit():
            return self._invalid("classic distribution point: protocol must be http|https with a numeric port")
        return fields

    def _classic_xml(self, dp: dict) -> str:
        return "<distribution_point>" + "".join(f"<{k}>{v}</{k}>" for k, v in dp.items()) + "</distribution_point>"

    async def classic_get_dp(self, request: web.Request) -> web.Response:
        dp = self.classic_dps.get(request.match_info["name"])
        if dp is None:
            return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        return web.Response(text=self._classic_xml(dp), content_type="application/xml")

    async def classic_put_dp(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.classic_dps:
            return web.Response(status=404, text="<html>Not Found</html>", content_type="text/html")
        fields = self._classic_body(await request.text())
        if isinstance(fields, web.Response):
            return fields
        did = self.classic_dps[name]["id"]
        self.classic_dps.pop(name)
        self.classic_dps[fields["name"]] = {"id": did, **fields}
        return web.Response(status=201, text=f"<distribution_point><id>{did}</id></distribution_point>",
                            content_type="application/xml")

    async def classic_create_dp(self, request: web.Request) -> web.Response:
        fields = self._classic_body(await request.text())
        if isinstance(fields, web.Response):
            return fields
        did = str(self._next_id)
        self._next_id += 1
        self.classic_dps[fields["name"]] = {"id": did, **fields}
        return web.Response(status=201, text=f"<distribution_point><id>{did}</id></distribution_point>",
                            content_type="application/xml")
