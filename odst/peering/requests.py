"""Signed peer requests: timestamp + nonce + ed25519 signature, replays rejected.

A request is signed over ``method \\n target \\n ts \\n nonce \\n from-site``. The
receiver accepts it only from a site whose key it trusts (own directory, not
removed), within ``MAX_SKEW_S`` of its clock, and never twice with one nonce.

"Never twice" holds across every process of the site (gateway workers, replicators): a nonce
is checked first in the process (cheap, and enough for a replay to the same process), then
claimed in ``SharedNonces``, a JetStream key-value bucket all of them use, whose atomic create
fails for a nonce any of them has already accepted.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections import OrderedDict
from typing import Callable

import nats.errors
import nats.js.errors
from nats.js import api

from odst.bus.streams import ensure_key_value
from odst.naming import ascii_int
from odst.events.signing import SignatureInvalid, SiteKey, verify_detached

MAX_SKEW_S = 300
HEADER_SITE, HEADER_TS, HEADER_NONCE, HEADER_SIG = ("x-odst-site", "x-odst-ts", "x-odst-nonce",
                                                    "x-odst-signature")


NONCE_BUCKET = "ODST_NONCES"
NONCE_TTL_S = 2 * MAX_SKEW_S  # a request is fresh for MAX_SKEW_S either side of its timestamp


class PeerRequestRefused(Exception):
    """A peer request that is not signed by a trusted site, too old, or replayed."""


class NonceStoreUnavailable(Exception):
    """The site's shared record of used nonces cannot be reached: the request is not served
    (it might be a replay); the peer may ask again shortly."""


def _message(method: str, target: str, ts: str, nonce: str, site: str) -> bytes:
    return f"{method}\n{target}\n{ts}\n{nonce}\n{site}".encode("utf-8")


def sign_request(key: SiteKey, method: str, target: str) -> dict[str, str]:
    ts = str(int(time.time()))
    nonce = secrets.token_hex(12)
    sig = key.sign_detached(_message(method, target, ts, nonce, key.site_id))
    return {HEADER_SITE: key.site_id, HEADER_TS: ts, HEADER_NONCE: nonce,
            HEADER_SIG: base64.b64encode(sig).decode("ascii")}


class SharedNonces:
    """The nonces of signed peer requests accepted by any process of this site: one key per
    nonce in the ``ODST_NONCES`` bucket (internal to the site, like the lease bucket: peers and
    subscribers may not touch it), kept ``NONCE_TTL_S``. ``claim`` is one create, which the
    server refuses if the key exists: two processes cannot both accept one nonce."""

    def __init__(self, js, replicas: int = 1):
        self.js, self.replicas = js, replicas
        self._kv = None

    async def open(self) -> "SharedNonces":
        """The bucket, created if missing (at start: the site's streams do not change later)."""
        self._kv = await ensure_key_value(self.js, api.KeyValueConfig(
            bucket=NONCE_BUCKET, ttl=NONCE_TTL_S, history=1, storage=api.StorageType.FILE,
            replicas=self.replicas))
        return self

    async def claim(self, site: str, nonce: str) -> bool:
        """True: the nonce was unused and is now taken; False: it was used (a replay)."""
        key = hashlib.sha256(f"{site}\n{nonce}".encode("utf-8")).hexdigest()  # any nonce, a valid key
        try:
            if self._kv is None:
                await self.open()
            await self._kv.create(key, b"")
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        except (nats.errors.Error, OSError) as exc:
            raise NonceStoreUnavailable(f"the site's nonce record cannot be reached: {exc!r}") from None
        return True


class RequestVerifier:
    def __init__(self, key_of: Callable[[str], bytes | None], max_nonces: int = 100_000,
                 shared: SharedNonces | None = None):
        self.key_of = key_of
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._max = max_nonces
        self.shared = shared

    async def check(self, method: str, target: str, headers: dict[str, str]) -> str:
        """``verify``, then the nonce claimed among all the site's processes: the requesting
        site id, or PeerRequestRefused (NonceStoreUnavailable: cannot tell, not served)."""
        site = self.verify(method, target, headers)
        if self.shared is not None and not await self.shared.claim(site, headers[HEADER_NONCE]):
            raise PeerRequestRefused("replayed peer request")
        return site

    def verify(self, method: str, target: str, headers: dict[str, str]) -> str:
        """Return the requesting site id, or raise PeerRequestRefused (nonces: this process's)."""
        site = headers.get(HEADER_SITE, "")
        ts = headers.get(HEADER_TS, "")
        nonce = headers.get(HEADER_NONCE, "")
        sig = headers.get(HEADER_SIG, "")
        if not (site and ascii_int(ts) is not None and nonce and sig):
            raise PeerRequestRefused("unsigned peer request")
        now = time.time()
        if abs(now - ascii_int(ts)) > MAX_SKEW_S:
            raise PeerRequestRefused("peer request timestamp outside the allowed window")
        key = self.key_of(site)
        if key is None:
            raise PeerRequestRefused(f"site {site} is not a registered peer")
        try:
            verify_detached(key, _message(method, target, ts, nonce, site), base64.b64decode(sig))
        except (SignatureInvalid, ValueError):
            raise PeerRequestRefused("peer request signature does not verify") from None
        token = f"{site}:{nonce}"
        self._expire(now)
        if token in self._nonces:
            raise PeerRequestRefused("replayed peer request")
        self._nonces[token] = now
        return site

    def _expire(self, now: float) -> None:
        while self._nonces:
            first, seen = next(iter(self._nonces.items()))
            if now - seen > 2 * MAX_SKEW_S or len(self._nonces) > self._max:
                self._nonces.popitem(last=False)
            else:
                break
