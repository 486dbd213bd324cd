"""A Jamf Pro API client: bearer tokens from an API client (OAuth client credentials) or an
account (Basic), renewed before they expire and once more when Jamf Pro answers 401 mid-way.

Jamf Pro tokens can live as little as 60 s; a sync that runs longer than that must never
fail for it (JamfUploader's 401 half-way through a 10 GB upload is the known failure).
Secrets come from the settings (``ODST_JAMF_*`` or a ``*_file`` of mode 0600) and stay in
this process: never in an event, a log line or an answer.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import stat
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from odst.config import ConfigError, Settings

log = structlog.get_logger("odst.jamf")

RENEW_MARGIN_S = 30.0  # renew a token this long before it expires (or a third of its life if shorter)
TIMEOUT = aiohttp.ClientTimeout(total=120, connect=10)


class JamfError(Exception):
    """Jamf Pro refused or could not be reached; the message says what and what to do."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class JamfAuthFailed(JamfError):
    """Jamf Pro refused the credentials (wrong client id/secret or user/password, or no privilege)."""


@dataclass(frozen=True)
class Credentials:
    url: str
    client_id: str = ""
    client_secret: str = ""
    user: str = ""
    password: str = ""
    ca_file: str = ""

    @property
    def kind(self) -> str:
        return "oauth" if self.client_id else "basic"


def read_secret_file(path: str, setting: str) -> str:
    """A secret kept in a file: refuse one that others may read (it must be mode 0600 or stricter)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"{setting}: {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
                          f"chmod 600 {path}")
    return p.read_text().strip()


def credentials(settings: Settings) -> Credentials | None:
    """The Jamf Pro connection the settings describe, or None when there is none."""
    s = settings
    if not s.jamf_url:
        return None
    secret = read_secret_file(s.jamf_client_secret_file, "jamf_client_secret_file") \
        if s.jamf_client_secret_file else s.jamf_client_secret
    password = read_secret_file(s.jamf_password_file, "jamf_password_file") \
        if s.jamf_password_file else s.jamf_password
    if s.jamf_client_id and not secret:
        raise ConfigError("jamf_client_id needs a secret: ODST_JAMF_CLIENT_SECRET or jamf_client_secret_file")
    if not s.jamf_client_id and not password:
        raise ConfigError("jamf_user needs a password: ODST_JAMF_PASSWORD or jamf_password_file")
    return Credentials(url=s.jamf_url.rstrip("/"), client_id=s.jamf_client_id, client_secret=secret,
                       user=s.jamf_user, password=password, ca_file=s.jamf_ca_file)


@dataclass
class Token:
    value: str
    expires: float  # time.monotonic() at which Jamf Pro stops taking it
    lifetime: float

    def fresh(self, now: float) -> bool:
        margin = min(RENEW_MARGIN_S, self.lifetime / 3)
        return now < self.expires - margin


class JamfClient:
    """One Jamf Pro server. ``request`` is the one door: it holds a fresh token, retries once on 401."""

    def __init__(self, creds: Credentials):
        self.creds = creds
        self._session: aiohttp.ClientSession | None = None
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self.tokens_issued = 0  # how many tokens this client obtained (for tests and /metrics)
        self.renewed_on_401 = 0

    async def __aenter__(self) -> "JamfClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ssl_ctx: ssl.SSLContext | bool = True
            if self.creds.ca_file:
                ssl_ctx = ssl.create_default_context(cafile=self.creds.ca_file)
            self._session = aiohttp.ClientSession(timeout=TIMEOUT, connector=aiohttp.TCPConnector(ssl=ssl_ctx),
                                                  headers={"User-Agent": "ODST"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------- tokens

    async def token(self) -> str:
        async with self._lock:
            now = time.monotonic()
            if self._token is None or not self._token.fresh(now):
                self._token = await self._new_token()
            return self._token.value

    async def _forget(self, stale: str) -> None:
        async with self._lock:
            if self._token is not None and self._token.value == stale:
                self._token = None

    async def _new_token(self) -> Token:
        started = time.monotonic()
        try:
            if self.creds.kind == "oauth":
                form = {"grant_type": "client_credentials", "client_id": self.creds.client_id,
                        "client_secret": self.creds.client_secret}
                body = None
                for path in ("/api/oauth/token", "/api/v1/oauth/token"):  # the newer path first, then 11.x's
                    async with self._http().post(self.creds.url + path, data=form,
                                                 headers={"Accept": "application/json"}) as r:
                        if r.status == 404:
                            continue
                        await self._raise_for_auth(r, "API client")
                        body = await r.json(content_type=None)
                        break
                if body is None:
                    raise JamfError(f"{self.creds.url} has no OAuth token endpoint (404): is it Jamf Pro 10.49 "
                                    "or later? Else use jamf_user/jamf_password", 404)
                lifetime = float(body["expires_in"])
                value = body["access_token"]
            else:
                basic = base64.b64encode(f"{self.creds.user}:{self.creds.password}".encode()).decode()
                async with self._http().post(self.creds.url + "/api/v1/auth/token",
                                             headers={"Accept": "application/json",
                                                      "Authorization": f"Basic {basic}"}) as r:
                    await self._raise_for_auth(r, "account")
                    body = await r.json(content_type=None)
                value = body["token"]
                expires = datetime.fromisoformat(body["expires"].replace("Z", "+00:00"))
                lifetime = max(1.0, expires.timestamp() - time.time())
        except aiohttp.ClientError as exc:
            raise JamfError(f"cannot reach Jamf Pro at {self.creds.url}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise JamfError(f"Jamf Pro's token answer is not what ODST expects ({type(exc).__name__}: {exc})") \
                from None
        self.tokens_issued += 1
        log.debug("jamf token issued", kind=self.creds.kind, lifetime_s=lifetime)
        return Token(value=value, expires=started + lifetime, lifetime=lifetime)

    async def _raise_for_auth(self, r: aiohttp.ClientResponse, what: str) -> None:
        if r.status in (400, 401, 403):
            raise JamfAuthFailed(f"Jamf Pro refused the {what} credentials ({r.status}): check "
                                 f"{'jamf_client_id and its secret' if what == 'API client' else 'jamf_user and its password'}",
                                 r.status)
        if r.status >= 400:
            raise JamfError(f"Jamf Pro answered {r.status} to a token request: {(await r.text())[:300]}", r.status)

    # ----------------------------------------------------------------- requests

    async def request(self, method: str, path: str, *, json: Any = None, xml: str | None = None,
                      params: dict | None = None, ok: tuple[int, ...] = (200, 201, 204)) -> tuple[int, Any]:
        """Send one request with a fresh bearer token; on 401 renew it and send it once more.

        Returns (status, body): parsed JSON, XML text, or None. A status outside ``ok`` raises
        JamfError, except 404 when 404 is in ``ok``."""
        headers = {"Accept": "application/xml" if path.startswith("/JSSResource") else "application/json"}
        data = None
        if xml is not None:
            headers["Content-Type"] = "application/xml"
            data = xml.encode("utf-8")
        for attempt in (1, 2):
            token = await self.token()
            headers["Authorization"] = f"Bearer {token}"
            try:
                async with self._http().request(method, self.creds.url + path, json=json, data=data,
                                                params=params, headers=headers) as r:
                    if r.status == 401 and attempt == 1:
                        await self._forget(token)
                        self.renewed_on_401 += 1
                        log.info("jamf token refused mid-operation; renewing", path=path)
                        continue
                    text = await r.text()
                    if r.status not in ok:
                        raise JamfError(f"Jamf Pro answered {r.status} to {method} {path}: {text[:300]}", r.status)
                    if not text:
                        return r.status, None
                    if "json" in (r.headers.get("Content-Type") or ""):
                        return r.status, _json_loads(text)
                    return r.status, text
            except aiohttp.ClientError as exc:
                raise JamfError(f"cannot reach Jamf Pro at {self.creds.url}: {exc}") from None
        raise JamfAuthFailed(f"Jamf Pro refused a freshly issued token for {method} {path} (401): "
                             "does the API role have the privilege?", 401)

    async def version(self) -> str:
        _, body = await self.request("GET", "/api/v1/jamf-pro-version")
        return (body or {}).get("version", "")


def _json_loads(text: str) -> Any:
    import json
    return json.loads(text)
