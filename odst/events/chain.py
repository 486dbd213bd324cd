"""The hash-chain rule, once: how an envelope relates to the last event of its origin's chain.

Every event of a site carries ``seq`` (one more than the site's last) and ``prev`` (the
chain hash of the site's last signed message); a site's first event is SiteFounded. The
projector, the log's own head and recovery's check of a peer's copy all judge by this.
"""

from __future__ import annotations

import enum

from odst.events import catalogue as ev
from odst.events.codec import Envelope


class Link(enum.Enum):
    NEXT = "next"  # the event that extends the chain
    REPLAY = "replay"  # a seq the chain already has: a copy (or a second version) of a known event
    GAP = "gap"  # a seq beyond the next one: events are missing
    FORK = "fork"  # the next seq, but its prev is not the chain's head
    NOT_FOUNDED = "not founded"  # the next seq is 1 but the event is not SiteFounded


def link(env: Envelope, last_seq: int, last_hash: str) -> Link:
    """Where ``env`` stands against a chain whose last event has ``last_seq`` and hash ``last_hash``."""
    if env.seq <= last_seq:
        return Link.REPLAY
    if env.seq != last_seq + 1:
        return Link.GAP
    if env.prev != last_hash:
        return Link.FORK
    if env.seq == 1 and not isinstance(env.event, ev.SiteFounded):
        return Link.NOT_FOUNDED
    return Link.NEXT
