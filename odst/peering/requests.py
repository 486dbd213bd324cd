"""Signed peer requests: timestamp + nonce + ed25519 signature, replays rejected.

A request is signed over ``method \\n target \\n ts \\n nonce \\n from-site``. The
receiver accepts it only from a site whose key it trusts (own directory, not
removed), within ``MAX_SKEW_S`` of its clock, and never twice with one nonce.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections import OrderedDict
from typing import Callable

from odst.naming import ascii_int
from odst.events.signing import SignatureInvalid, SiteKey, verify_detached

MAX_SKEW_S = 300
HEADER_SITE, HEADER_TS, HEADER_NONCE, HEADER_SIG = ("x-odst-site", "x-odst-ts", "x-odst-nonce",
                                                    "x-odst-signature")


class PeerRequestRefused(Exception):
    """A peer request that is not signed by a trusted site, too old, or replayed."""


def _message(method: str, target: str, ts: str, nonce: str, site: str) -> bytes:
    return f"{method}\n{target}\n{ts}\n{nonce}\n{site}".encode("utf-8")


def sign_request(key: SiteKey, method: str, target: str) -> dict[str, str]:
    ts = str(int(time.time()))
    nonce = secrets.token_hex(12)
    sig = key.sign_detached(_message(method, target, ts, nonce, key.site_id))
    return {HEADER_SITE: key.site_id, HEADER_TS: ts, HEADER_NONCE: nonce,
            HEADER_SIG: base64.b64encode(sig).decode("ascii")}


class RequestVerifier:
    def __init__(self, key_of: Callable[[str], bytes | None], max_nonces: int = 100_000):
        self.key_of = key_of
        self._nonces: OrderedDict[str, float] = OrderedDict()
        self._max = max_nonces

    def verify(self, method: str, target: str, headers: dict[str, str]) -> str:
        """Return the requesting site id, or raise PeerRequestRefused."""
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
