"""Webhook secrets and the ``X-ODST-Signature`` header (a pure core; no I/O).

The secret of a webhook is derived, never stored: HMAC-SHA256(site private
seed, "odst.webhook." + webhook id), as hex. The event log is mirrored by every
peer, so a secret in ``WebhookSubscribed`` would reach them all; deriving it
keeps it on this site (in ``site.key``) and lets any process of the site sign.
Rotating a secret = a new webhook.

Header: ``t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}.{raw body}")>``;
a receiver checks the HMAC and that ``t`` is recent (replay-safe).
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-ODST-Signature"
DELIVERY_HEADER = "X-ODST-Delivery"
TOLERANCE_S = 300


def sign(secret: str, body: bytes, t: int | None = None) -> str:
    t = int(time.time()) if t is None else t
    mac = hmac.new(secret.encode("utf-8"), f"{t}.".encode("ascii") + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(secret: str, header: str, body: bytes, tolerance_s: int = TOLERANCE_S,
           now: float | None = None) -> bool:
    """What a receiver does (the README's snippet is the same code)."""
    try:
        parts = dict(p.strip().split("=", 1) for p in header.split(","))
        t = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts.get("v1", ""))


def delivery_id(webhook_id: str, event_key: str) -> str:
    """Stable per (webhook, event): the JetStream Nats-Msg-Id and the receiver's dedupe key."""
    return hashlib.sha256(f"{webhook_id}:{event_key}".encode()).hexdigest()[:32]


def backoff_s(attempt: int, base: float, cap: float = 300.0) -> float:
    """Delay before the attempt after ``attempt`` (1-based): base, 2·base, 4·base … at most cap."""
    return min(cap, base * (2 ** max(0, attempt - 1)))
