"""API tokens: only a token's sha256 is ever recorded (TokenCreated) or looked up."""

from __future__ import annotations

import hashlib


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
