"""Registering two sites with each other: one-time invitations, mutual PeerRegistered events.

Threat model: anyone who can reach a site's NATS broker (or sits on the HTTP path)
sees registration traffic and can answer it. They must never learn an invitation's
secret, register their own key with what they saw, replay it, or make a joiner trust
an answer that the inviting site did not give to this very request.

Site A makes an invitation (``odst peer invite``): a token carrying A's site id, its
public keys (the ed25519 site key, and ``seal_key``: a curve25519 key derived from the
site key's seed for this one purpose, so signing and encryption never share a key), its
address, an expiry, an invite id and a secret. The token travels to B's admin out of
band and is the trust anchor for both keys; A records only a hash of the secret (signed
PeerInvited event).

Site B joins with the token (``odst peer join``):

1. B writes a ``RegisterRequest``: its own id, key, name and address, the invite id
   and secret, A's site id (``to``), a fresh 32-byte ``nonce`` and its clock (``ts``).
   B signs it with its site key, then **seals** signature‖request to A's ``seal_key``
   from the token (an anonymous sealed box: X25519 + XSalsa20-Poly1305 with a throwaway
   sender key). Only A can open it; what travels is ``{"v": 2, "sealed": <base64>}``.
2. A opens it, checks B's signature and that ``site`` is the id of ``public_key``,
   that ``to`` is A, the clock window, the invite (secret hash, expiry, not used by
   another site) and that the nonce was never seen; then records PeerRegistered(B).
3. A answers with a ``RegisterAnswer`` signed with its site key: A's details, B's id
   (``peer``) and ``request`` = sha256 of the exact signed request it opened, plus a
   reason if it refused. The hash binds the answer to this request: an answer given to
   another request (or replayed) does not match, and nobody without A's key can sign one.
4. B accepts only an answer signed by the key in the token, for B, bound to its request,
   and only then records PeerRegistered(A).

Over NATS (``odst.<site>.rpc.register``, through the leaf tree) anyone on the broker can
answer, so B listens until a valid answer arrives or the deadline passes, ignoring (and
logging) every other; then it tries HTTP (POST /peer/v1/register) with a fresh request.

Tokens made by ODST before this protocol (``"v": 1``, whose registration sent the secret
in clear) are refused on both sides with a message saying to make a new invitation: a
v2 token names its secret ``invite_secret`` so an older joiner cannot parse it (and so
never sends it), and v2 invitations hash the secret with a v2 label, so a v1 secret that
travelled in clear can never register anyone here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import secrets
import sqlite3
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import httpx
import msgspec
import nacl.exceptions
import nacl.public
import nats.errors
import structlog

from odst.bus.authorization import inbox_prefix
from odst.bus.service import NatsService
from odst.config import Settings
from odst.errors import OdstError
from odst.events import catalogue as ev
from odst.events.log import AppendFailed
from odst.events.signing import SIGNATURE_BYTES, SignatureInvalid, SiteKey, site_id_for, verify_detached
from odst.projections import views
from odst.projections.appender import Append

log = structlog.get_logger("odst.peering")

TOKEN_PREFIX = "odst-invite-"
PROTOCOL = 2
DEFAULT_TTL_S = 24 * 3600
MAX_MESSAGE_BYTES = 16 * 1024  # a request or an answer is well under 2 KiB
MAX_SKEW_S = 300  # a request older (or newer) than this by the inviter's clock is refused
NATS_WAIT_S = 10.0
LEAF_ADMISSION_S = 10.0  # after admitting the inviter's leaf identity, how long to wait for its link
HTTP_TIMEOUT_S = 15.0
SEAL_KEY_LABEL = b"odst registration sealing key v2"

OLD_TOKEN = ("this invitation was made by an older ODST version, whose registration sent the secret "
             "in clear; make a new invitation at the inviting site (upgraded) and join with that")


class InviteInvalid(OdstError):
    status, code = 400, "invite_invalid"


class RegistrationTooLarge(OdstError):
    status, code = 413, "registration_too_large"


class RegistrationRefused(InviteInvalid):
    """A refusal the inviting site could bind to the request: ``answer`` is its signed form."""

    def __init__(self, detail: str, *, status: int, answer: bytes):
        super().__init__(detail)
        self.status, self.answer = status, answer


class AnswerInvalid(Exception):
    """An answer not signed by the inviting site's key, or not bound to this request."""


class PeerUnreachable(OdstError):
    status, code = 502, "peer_unreachable"


SiteId = Annotated[str, msgspec.Meta(pattern=r"^s[a-z2-7]{16}$")]
PublicKeyHex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, msgspec.Meta(max_length=200)]
Url = Annotated[str, msgspec.Meta(max_length=500)]


class Invitation(msgspec.Struct, frozen=True, kw_only=True):
    """What an invitation token carries (base64url JSON after ``odst-invite-``)."""

    v: int
    site: SiteId
    public_key: PublicKeyHex  # ed25519: signs the answer
    seal_key: PublicKeyHex  # curve25519: the request is sealed to it
    name: Name = ""
    http_url: Url = ""
    invite_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{16}$")]
    invite_secret: Annotated[str, msgspec.Meta(min_length=16, max_length=100)]
    expires_ts: int


class SealedRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What travels: ``sealed`` = base64(sealed box to the inviter of signature ‖ RegisterRequest)."""

    v: int
    sealed: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_BYTES)]


class RegisterRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    to: SiteId  # the inviting site
    site: SiteId  # the joining site, = site_id_for(public_key)
    public_key: PublicKeyHex
    name: Name = ""
    http_url: Url = ""
    invite_id: Annotated[str, msgspec.Meta(max_length=64)]
    secret: Annotated[str, msgspec.Meta(max_length=100)]
    nonce: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]  # chosen by the joiner, once
    ts: int  # the joiner's clock, ms


class RegisterAnswer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    site: SiteId  # the inviting site
    public_key: PublicKeyHex
    name: Name = ""
    http_url: Url = ""
    peer: SiteId  # the joining site this answers
    request: Sha256Hex  # sha256 of the signed request it answers
    refused: Annotated[str, msgspec.Meta(max_length=500)] = ""  # empty: registered


class SignedAnswer(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What travels back: ``signed`` = base64(signature ‖ RegisterAnswer) by the inviting site."""

    v: int
    signed: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_BYTES)]


@dataclass(frozen=True)
class Registrar:
    """What registering needs of this site: its key and settings, the read model (invitations),
    the write path, the broker, and a way to let an inviter's leaf link in while joining."""

    site_id: str
    key: SiteKey
    settings: Settings
    reader: sqlite3.Connection
    append: Append
    nc: Any
    admit_applicant: Callable[[str], bool]

    @property
    def name(self) -> str:
        """This site's name as peers are told it (its last SiteRenamed, else the setting)."""
        return views.site_name(self.reader, self.site_id, self.settings)


def register_subject(site: str) -> str:
    return f"odst.{site}.rpc.register"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def secret_hash(secret: str) -> str:
    """The hash PeerInvited records. Labelled, so a v1 secret (hashed bare) never matches."""
    return hashlib.sha256(b"odst-invite-v2\n" + secret.encode("utf-8")).hexdigest()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _seal_private_key(key: SiteKey) -> nacl.public.PrivateKey:
    """The site's registration sealing key: derived from its seed (nothing new to store or
    back up), used for nothing else."""
    return nacl.public.PrivateKey(key.derive(SEAL_KEY_LABEL))


def seal_public_key(key: SiteKey) -> bytes:
    return bytes(_seal_private_key(key).public_key)


# --- the token ---------------------------------------------------------------------------

def encode_token(inv: Invitation) -> str:
    return TOKEN_PREFIX + _b64(msgspec.json.encode(inv))


def decode_token(token: str) -> Invitation:
    token = token.strip()
    if not token.startswith(TOKEN_PREFIX):
        raise InviteInvalid("not an ODST invitation (it should start with 'odst-invite-')")
    try:
        raw = msgspec.json.decode(_unb64(token[len(TOKEN_PREFIX):]))
    except (ValueError, msgspec.DecodeError):
        raise InviteInvalid("invitation token is damaged; copy it again") from None
    if not isinstance(raw, dict):
        raise InviteInvalid("invitation token is damaged; copy it again")
    if raw.get("v", 1) == 1 and "secret" in raw:
        raise InviteInvalid(OLD_TOKEN)
    if raw.get("v") != PROTOCOL:
        raise InviteInvalid(f"invitation version {raw.get('v')!r} is not understood here (this site speaks "
                            f"{PROTOCOL}); upgrade this site or make the invitation with a matching version")
    try:
        inv = msgspec.convert(raw, Invitation)
    except msgspec.ValidationError as exc:
        raise InviteInvalid(f"invitation token is damaged ({exc}); copy it again") from None
    if site_id_for(bytes.fromhex(inv.public_key)) != inv.site:
        raise InviteInvalid("invitation's site id does not match its key")
    return inv


async def create_invite(me: Registrar, *, actor: str, ttl_s: int = DEFAULT_TTL_S) -> dict:
    secret = secrets.token_urlsafe(24)
    invite_id = secrets.token_hex(8)
    expires_ts = _now_ms() + ttl_s * 1000
    await me.append(ev.PeerInvited(invite_id=invite_id, secret_sha256=secret_hash(secret),
                                     expires_ts=expires_ts), actor=actor)
    inv = Invitation(v=PROTOCOL, site=me.site_id, public_key=me.key.public_key.hex(),
                     seal_key=seal_public_key(me.key).hex(),
                     name=me.name[:200], http_url=(me.settings.base_url or "")[:500],
                     invite_id=invite_id, invite_secret=secret, expires_ts=expires_ts)
    return {"invite_id": invite_id, "expires_ts": expires_ts, "token": encode_token(inv)}


# --- the joiner's side: sealing a request, checking an answer (pure) ----------------------

def make_request(key: SiteKey, inv: Invitation, *, name: str = "", http_url: str = "",
                 ts: int | None = None) -> tuple[bytes, str]:
    """A fresh sealed request for ``inv``: (bytes to send, sha256 of the signed request that
    the answer must name)."""
    req = RegisterRequest(to=inv.site, site=key.site_id, public_key=key.public_key.hex(), name=name[:200],
                          http_url=http_url[:500], invite_id=inv.invite_id, secret=inv.invite_secret,
                          nonce=secrets.token_hex(32), ts=_now_ms() if ts is None else ts)
    signed = key.sign(msgspec.json.encode(req))
    try:
        sealed = nacl.public.SealedBox(nacl.public.PublicKey(bytes.fromhex(inv.seal_key))).encrypt(signed)
    except nacl.exceptions.CryptoError:
        raise InviteInvalid("the invitation's sealing key is not usable; copy the invitation again") from None
    wire = msgspec.json.encode(SealedRequest(v=PROTOCOL, sealed=base64.b64encode(sealed).decode("ascii")))
    return wire, hashlib.sha256(signed).hexdigest()


def check_answer(inv: Invitation, joiner: str, request_digest: str, body: bytes) -> RegisterAnswer:
    """The inviting site's answer to the request whose digest is ``request_digest``, or
    AnswerInvalid. Signature first, then decoding, then the binding."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise AnswerInvalid("answer too large")
    try:
        signed = base64.b64decode(msgspec.json.decode(body, type=SignedAnswer).signed, validate=True)
    except (msgspec.DecodeError, msgspec.ValidationError, binascii.Error, ValueError):
        raise AnswerInvalid("not a signed registration answer") from None
    sig, message = signed[:SIGNATURE_BYTES], signed[SIGNATURE_BYTES:]
    try:
        verify_detached(bytes.fromhex(inv.public_key), message, sig)
    except SignatureInvalid:
        raise AnswerInvalid("not signed by the inviting site's key (the one in the invitation)") from None
    try:
        ans = msgspec.json.decode(message, type=RegisterAnswer)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AnswerInvalid(f"signed answer is malformed: {exc}") from None
    if ans.site != inv.site or ans.public_key != inv.public_key:
        raise AnswerInvalid("answer names another inviting site")
    if ans.peer != joiner or not hmac.compare_digest(ans.request, request_digest):
        raise AnswerInvalid("answer was given to another request (replayed)")
    return ans


# --- the inviting site's side ---------------------------------------------------------------

class _Opened(msgspec.Struct, frozen=True):
    request: RegisterRequest
    digest: str  # sha256 of the signed request: what the answer names


def open_request(key: SiteKey, body: bytes) -> _Opened:
    """Open and authenticate a sealed request addressed to ``key``, or raise a 4xx OdstError."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise RegistrationTooLarge(f"registration request over {MAX_MESSAGE_BYTES} bytes")
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        raise InviteInvalid("malformed registration request: not JSON") from None
    if not isinstance(raw, dict):
        raise InviteInvalid("malformed registration request: not a JSON object")
    if "secret" in raw or "invite_id" in raw:
        raise InviteInvalid("registration request in clear (from an older ODST version) refused: its secret "
                            "must be taken as seen by others; upgrade the joining site and use a new invitation")
    if raw.get("v") != PROTOCOL:
        raise InviteInvalid(f"registration protocol version {raw.get('v')!r} is not understood here "
                            f"(this site speaks {PROTOCOL})")
    try:
        sealed = base64.b64decode(msgspec.convert(raw, SealedRequest).sealed, validate=True)
    except (msgspec.ValidationError, binascii.Error, ValueError) as exc:
        raise InviteInvalid(f"malformed registration request: {exc}") from None
    try:
        signed = nacl.public.SealedBox(_seal_private_key(key)).decrypt(sealed)
    except nacl.exceptions.CryptoError:
        raise InviteInvalid("registration request is not sealed to this site's key (damaged, or made from "
                            "another site's invitation)") from None
    sig, message = signed[:SIGNATURE_BYTES], signed[SIGNATURE_BYTES:]
    try:
        req = msgspec.json.decode(message, type=RegisterRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InviteInvalid(f"malformed registration request: {exc}") from None
    pub = bytes.fromhex(req.public_key)
    if site_id_for(pub) != req.site:
        raise InviteInvalid("requesting site id does not match its key")
    try:
        verify_detached(pub, message, sig)
    except SignatureInvalid:
        raise InviteInvalid("registration request signature does not verify") from None
    if req.to != key.site_id:
        raise InviteInvalid("registration request is addressed to another site")
    return _Opened(req, hashlib.sha256(signed).hexdigest())


class _Nonces:
    """Nonces of admitted requests, kept for the clock window (after it, ``ts`` refuses them)."""

    def __init__(self, max_entries: int = 10_000):
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries

    def first_time(self, key: str) -> bool:
        now = time.monotonic()
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if now - at > 2 * MAX_SKEW_S or len(self._seen) >= self._max:
                self._seen.popitem(last=False)
            else:
                break
        if key in self._seen:
            return False
        self._seen[key] = now
        return True


# Per process (every gateway answers registrations, over HTTP and NATS alike). Only requests
# carrying a right secret get here, so strangers cannot fill it.
_nonces = _Nonces()
_admitting = asyncio.Lock()


def make_answer(key: SiteKey, *, peer: str, request_digest: str, name: str = "", http_url: str = "",
                refused: str = "") -> bytes:
    """The signed answer to the request of ``peer`` whose digest is ``request_digest``."""
    ans = RegisterAnswer(site=key.site_id, public_key=key.public_key.hex(), name=name[:200],
                         http_url=http_url[:500], peer=peer, request=request_digest, refused=refused[:500])
    signed = key.sign(msgspec.json.encode(ans))
    return msgspec.json.encode(SignedAnswer(v=PROTOCOL, signed=base64.b64encode(signed).decode("ascii")))


def _answer(me: Registrar, opened: _Opened, refused: str = "") -> bytes:
    return make_answer(me.key, peer=opened.request.site, request_digest=opened.digest,
                       name=me.name, http_url=me.settings.base_url or "", refused=refused)


async def _admit(me: Registrar, req: RegisterRequest) -> None:
    if req.site == me.site_id:
        raise InviteInvalid("a site cannot register with itself")
    if abs(_now_ms() - req.ts) > MAX_SKEW_S * 1000:
        raise InviteInvalid(f"registration request timestamp is more than {MAX_SKEW_S} s from this site's "
                            "clock: check both sites' clocks (NTP) and join again")
    row = me.reader.execute("SELECT * FROM invites WHERE invite_id=?", (req.invite_id,)).fetchone()
    if row is None or not hmac.compare_digest(row["secret_sha256"], secret_hash(req.secret)):
        if row is not None and hmac.compare_digest(row["secret_sha256"],
                                                   hashlib.sha256(req.secret.encode()).hexdigest()):
            raise InviteInvalid(OLD_TOKEN)
        raise InviteInvalid("unknown invitation or wrong secret")
    if row["used_by"] and row["used_by"] != req.site:
        raise InviteInvalid("invitation already used by another site")
    if row["expires_ts"] < _now_ms() and not row["used_by"]:
        raise InviteInvalid("invitation expired; make a new one")
    if not _nonces.first_time(f"{req.site}:{req.nonce}"):
        raise InviteInvalid("replayed registration request")
    if not row["used_by"]:
        await me.append(ev.PeerRegistered(site=req.site, public_key=req.public_key, name=req.name,
                                            http_url=req.http_url, invite_id=req.invite_id),
                          actor=f"peer:{req.site}")
        log.info("peer registered", peer=req.site, via="invite")


async def handle_register(me: Registrar, body: bytes) -> bytes:
    """Site A's side, for either transport: the signed answer to a sealed request.

    Raises RegistrationRefused (a 4xx carrying its signed, bound form) when the request
    opened but is refused, another 4xx OdstError when it cannot be opened at all, and
    AppendFailed when the registration could not be recorded."""
    opened = open_request(me.key, body)
    try:
        async with _admitting:
            await _admit(me, opened.request)
    except OdstError as exc:
        log.warning("registration refused", peer=opened.request.site, reason=exc.detail)
        raise RegistrationRefused(exc.detail, status=exc.status,
                                  answer=_answer(me, opened, refused=exc.detail)) from None
    return _answer(me, opened)


# --- the joiner's side: the exchange -----------------------------------------------------------

async def join(me: Registrar, token: str, *, actor: str) -> dict:
    """Site B's side: complete a mutual registration with the site that made ``token``."""
    inv = decode_token(token)
    if inv.site == me.site_id:
        raise InviteInvalid("this invitation was made by this very site")
    if inv.expires_ts < _now_ms():
        raise InviteInvalid("invitation expired; ask for a new one")
    ans, via = await _exchange(me, inv)
    if ans.refused:
        raise InviteInvalid(f"the inviting site refused: {ans.refused}")
    await me.append(ev.PeerRegistered(site=inv.site, public_key=inv.public_key, name=ans.name,
                                        http_url=ans.http_url or inv.http_url, invite_id=inv.invite_id),
                      actor=actor)
    log.info("peer registered", peer=inv.site, via=via)
    return {"site": inv.site, "name": ans.name, "http_url": ans.http_url, "via": via}


def _fresh_request(me: Registrar, inv: Invitation) -> tuple[bytes, str]:
    return make_request(me.key, inv, name=me.name, http_url=me.settings.base_url or "")


async def _exchange(me: Registrar, inv: Invitation) -> tuple[RegisterAnswer, str]:
    notes: list[str] = []
    # the inviter may reach us only over a leaf link it dials, refused while its key is unknown
    patience = LEAF_ADMISSION_S if me.admit_applicant(inv.public_key) else 0.0
    deadline = time.monotonic() + patience
    while True:
        ans = await _over_nats(me, inv, notes)
        if ans is not None:
            return ans, "nats"
        if time.monotonic() > deadline or not notes[-1].startswith("NATS: no responder"):
            break
        notes.pop()
        await asyncio.sleep(0.5)  # the inviter's leaf link reconnects about once a second
    if inv.http_url:
        ans = await _over_http(me, inv, notes)
        if ans is not None:
            return ans, "http"
    raise PeerUnreachable("no valid answer from the inviting site (" + "; ".join(notes) +
                          "): link the sites with a NATS leaf node or make its address reachable")


async def _over_nats(me: Registrar, inv: Invitation, notes: list[str]) -> RegisterAnswer | None:
    """Ask over NATS; anyone on the broker may answer, so keep listening until an answer
    signed by the inviting site and bound to this request arrives, or the deadline."""
    wire, digest = _fresh_request(me, inv)
    ignored: list[str] = []  # the first few reasons, for the error message
    n_ignored = 0
    sub = None
    try:
        inbox = f"{inbox_prefix(me.site_id)}.{secrets.token_hex(16)}"  # a peer answers: odst.bus.peer_request
        sub = await me.nc.subscribe(inbox)
        await me.nc.publish(register_subject(inv.site), wire, reply=inbox)
        deadline = time.monotonic() + NATS_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = await sub.next_msg(timeout=left)
            except nats.errors.TimeoutError:
                break
            headers = msg.headers or {}
            if headers.get("Status") == "503" and not msg.data:
                notes.append("NATS: no responder for the inviting site (not linked by a leaf node?)")
                return None
            n_ignored += 1
            if not msg.data:  # an unsigned refusal: anyone could have sent it; say it if nothing better comes
                reason = f"unverified refusal {headers.get('odst-error', '')!r}"[:300]
            else:
                try:
                    return check_answer(inv, me.site_id, digest, msg.data)
                except AnswerInvalid as exc:
                    reason = f"answer refused: {exc}"
                    if n_ignored <= 20:
                        log.warning("registration answer refused", peer=inv.site, via="nats", reason=str(exc))
            if len(ignored) < 3:
                ignored.append(reason)
        notes.append(f"NATS: no valid answer within {NATS_WAIT_S:.0f} s" +
                     (f" ({n_ignored} ignored: {'; '.join(ignored)})" if n_ignored else ""))
    except Exception as exc:  # not connected, broker gone: try HTTP
        notes.append(f"NATS: {type(exc).__name__}: {exc}"[:300])
    finally:
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
    return None


async def _over_http(me: Registrar, inv: Invitation, notes: list[str]) -> RegisterAnswer | None:
    wire, digest = _fresh_request(me, inv)
    url = inv.http_url.rstrip("/") + "/peer/v1/register"
    try:
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
            r = await client.post(url, content=wire, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        notes.append(f"HTTP {url}: {type(exc).__name__}")
        return None
    if r.status_code == 200:
        try:
            return check_answer(inv, me.site_id, digest, r.content)
        except AnswerInvalid as exc:
            log.warning("registration answer refused", peer=inv.site, via="http", reason=str(exc))
            notes.append(f"HTTP {url}: answer refused: {exc}")
            return None
    try:
        detail = r.json().get("detail", r.text)
    except (ValueError, AttributeError):
        detail = r.text
    if 400 <= r.status_code < 500:
        raise InviteInvalid(f"the inviting site refused: {str(detail)[:500]}")
    notes.append(f"HTTP {url}: {r.status_code} {str(detail)[:200]}")
    return None


class RegistrationService(NatsService):
    """Answers registration requests arriving over NATS (one gateway of several answers each)."""

    queue = "register"

    def __init__(self, registrar: Registrar):
        super().__init__(registrar.nc, registrar.key)
        self.registrar = registrar
        self.subject = register_subject(registrar.site_id)

    async def _on_request(self, msg) -> None:
        if not msg.reply:
            return  # nobody to answer
        body, headers = b"", {"odst-status": "200"}
        try:
            body = await handle_register(self.registrar, msg.data)
        except RegistrationRefused as exc:
            body, headers = exc.answer, {"odst-status": str(exc.status), "odst-error": exc.detail}
        except OdstError as exc:
            log.warning("registration refused", reason=exc.detail)
            headers = {"odst-status": str(exc.status), "odst-error": exc.detail}
        except AppendFailed as exc:
            log.error("registration not recorded", error=str(exc))
            headers = {"odst-status": "503", "odst-error": f"registration not recorded, try again: {exc}"}
        except Exception:
            log.exception("registration failed")
            headers = {"odst-status": "500", "odst-error": "internal error; the inviting site's log has the details"}
        try:
            await self.nc.publish(msg.reply, body, headers=headers)
        except Exception as exc:  # the reply subject is the requester's: a bad one is its problem
            log.warning("registration answer not sent", error=f"{type(exc).__name__}: {exc}")
