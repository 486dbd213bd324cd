"""Registering two sites with each other: one-time invitations, mutual PeerRegistered events.

Site A makes an invitation (``odst peer invite``): a token carrying A's site id,
public key, address, an expiry and a secret (A records only the secret's hash,
as a signed PeerInvited event). Site B joins with the token (``odst peer join``):
B sends its own id, key and address, signed with its key, with the secret — over
NATS request/reply through the leaf tree (works for sites that only dial out),
falling back to HTTP. A checks the secret, the expiry and B's signature, records
PeerRegistered(B) and answers with its own details, signed; B checks that they
match the token and records PeerRegistered(A).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time

import httpx
import structlog

from odst.bus.service import NatsService
from odst.events import catalogue as ev
from odst.events.signing import SignatureInvalid, site_id_for, verify_detached
from odst.errors import OdstError

log = structlog.get_logger("odst.peering")

TOKEN_PREFIX = "odst-invite-"
DEFAULT_TTL_S = 24 * 3600


class InviteInvalid(OdstError):
    status, code = 400, "invite_invalid"


class PeerUnreachable(OdstError):
    status, code = 502, "peer_unreachable"


def register_subject(site: str) -> str:
    return f"odst.{site}.rpc.register"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_token(token: str) -> dict:
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise InviteInvalid("not an ODST invitation (it should start with 'odst-invite-')")
    try:
        data = json.loads(_unb64(token[len(TOKEN_PREFIX):]))
        pub = bytes.fromhex(data["public_key"])
        fields = {k: data[k] for k in ("site", "public_key", "invite_id", "secret", "expires_ts")}
    except (ValueError, KeyError, TypeError):
        raise InviteInvalid("invitation token is damaged; copy it again") from None
    if site_id_for(pub) != fields["site"]:
        raise InviteInvalid("invitation's site id does not match its key")
    return {**data, **fields}


async def create_invite(site, *, actor: str, ttl_s: int = DEFAULT_TTL_S) -> dict:
    secret = secrets.token_urlsafe(24)
    invite_id = secrets.token_hex(8)
    expires_ts = int(time.time() * 1000) + ttl_s * 1000
    await site.append(ev.PeerInvited(invite_id=invite_id, secret_sha256=hashlib.sha256(secret.encode()).hexdigest(),
                                     expires_ts=expires_ts), actor=actor)
    payload = {"v": 1, "site": site.id, "public_key": site.key.public_key.hex(),
               "name": site.settings.site_name, "http_url": site.settings.base_url,
               "invite_id": invite_id, "secret": secret, "expires_ts": expires_ts}
    token = TOKEN_PREFIX + _b64(json.dumps(payload, separators=(",", ":")).encode())
    return {"invite_id": invite_id, "expires_ts": expires_ts, "token": token}


def _self_description(site) -> dict:
    return {"site": site.id, "public_key": site.key.public_key.hex(), "name": site.settings.site_name,
            "http_url": site.settings.base_url}


async def handle_register(site, body: bytes, signature_b64: str) -> tuple[bytes, str]:
    """Site A's side. Returns (reply body, reply signature) or raises InviteInvalid."""
    try:
        req = json.loads(body)
        pub = bytes.fromhex(req["public_key"])
        peer, invite_id, secret = req["site"], req["invite_id"], req["secret"]
    except (ValueError, KeyError, TypeError):
        raise InviteInvalid("malformed registration request") from None
    if site_id_for(pub) != peer:
        raise InviteInvalid("requesting site id does not match its key")
    try:
        verify_detached(pub, body, base64.b64decode(signature_b64))
    except (SignatureInvalid, ValueError):
        raise InviteInvalid("registration request signature does not verify") from None
    row = site.reader.execute("SELECT * FROM invites WHERE invite_id=?", (invite_id,)).fetchone()
    if row is None or row["secret_sha256"] != hashlib.sha256(str(secret).encode()).hexdigest():
        raise InviteInvalid("unknown invitation or wrong secret")
    if row["used_by"] and row["used_by"] != peer:
        raise InviteInvalid("invitation already used by another site")
    if row["expires_ts"] < time.time() * 1000 and not row["used_by"]:
        raise InviteInvalid("invitation expired; make a new one")
    if peer == site.id:
        raise InviteInvalid("a site cannot register with itself")
    if not row["used_by"]:
        await site.append(ev.PeerRegistered(site=peer, public_key=pub.hex(), name=str(req.get("name", ""))[:200],
                                            http_url=str(req.get("http_url", ""))[:500], invite_id=invite_id),
                          actor=f"peer:{peer}")
        log.info("peer registered", peer=peer, via="invite")
    reply = json.dumps(_self_description(site)).encode()
    return reply, base64.b64encode(site.key.sign_detached(reply)).decode()


async def join(site, token: str, *, actor: str) -> dict:
    """Site B's side: complete a mutual registration with the site that made ``token``."""
    inv = decode_token(token)
    if inv["site"] == site.id:
        raise InviteInvalid("this invitation was made by this very site")
    if inv["expires_ts"] < time.time() * 1000:
        raise InviteInvalid("invitation expired; ask for a new one")
    body = json.dumps({**_self_description(site), "invite_id": inv["invite_id"],
                       "secret": inv["secret"]}).encode()
    sig = base64.b64encode(site.key.sign_detached(body)).decode()
    reply, reply_sig, via = await _send(site, inv, body, sig)
    peer_pub = bytes.fromhex(inv["public_key"])
    try:
        verify_detached(peer_pub, reply, base64.b64decode(reply_sig))
        desc = json.loads(reply)
    except (SignatureInvalid, ValueError):
        raise PeerUnreachable("the inviting site's answer is not signed by the key in the invitation") from None
    if desc.get("site") != inv["site"]:
        raise PeerUnreachable("the inviting site answered with another site id")
    await site.append(ev.PeerRegistered(site=inv["site"], public_key=inv["public_key"],
                                        name=str(desc.get("name", ""))[:200],
                                        http_url=str(desc.get("http_url") or inv.get("http_url", ""))[:500],
                                        invite_id=inv["invite_id"]), actor=actor)
    log.info("peer registered", peer=inv["site"], via=via)
    return {"site": inv["site"], "name": desc.get("name", ""), "http_url": desc.get("http_url", ""), "via": via}


async def _send(site, inv: dict, body: bytes, sig: str) -> tuple[bytes, str, str]:
    errors = []
    try:
        msg = await site.nc.request(register_subject(inv["site"]), body, timeout=10,
                                    headers={"odst-signature": sig})
        headers = msg.headers or {}
        if headers.get("odst-status") == "200":
            return msg.data, headers.get("odst-signature", ""), "nats"
        raise InviteInvalid(f"the inviting site refused: {headers.get('odst-error', 'no reason given')}")
    except InviteInvalid:
        raise
    except Exception as exc:  # no responders / timeout: not linked by NATS; try HTTP
        errors.append(f"NATS: {type(exc).__name__}")
    url = inv.get("http_url", "")
    if url:
        try:
            async with httpx.AsyncClient(timeout=15) as client:
                r = await client.post(url.rstrip("/") + "/peer/v1/register", content=body,
                                      headers={"x-odst-signature": sig, "content-type": "application/json"})
        except httpx.HTTPError as exc:
            errors.append(f"HTTP {url}: {type(exc).__name__}")
        else:
            if r.status_code == 200:
                return r.content, r.headers.get("x-odst-signature", ""), "http"
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise InviteInvalid(f"the inviting site refused: {detail}")
    raise PeerUnreachable("cannot reach the inviting site (" + "; ".join(errors) +
                          "): link the sites with a NATS leaf node or make its address reachable")


class RegistrationService(NatsService):
    """Answers registration requests arriving over NATS (one gateway of several answers each)."""

    queue = "register"

    def __init__(self, site):
        super().__init__(site)
        self.subject = register_subject(site.id)

    async def _on_request(self, msg) -> None:
        sig = (msg.headers or {}).get("odst-signature", "")
        try:
            reply, reply_sig = await handle_register(self.site, msg.data, sig)
            await self.site.nc.publish(msg.reply, reply, headers={"odst-status": "200", "odst-signature": reply_sig})
        except OdstError as exc:
            log.warning("registration refused", reason=exc.detail)
            await self.site.nc.publish(msg.reply, b"", headers={"odst-status": str(exc.status),
                                                               "odst-error": exc.detail})
        except Exception:
            log.exception("registration failed")
            await self.site.nc.publish(msg.reply, b"", headers={"odst-status": "500", "odst-error": "internal"})
