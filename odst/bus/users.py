"""Who may use a site's NATS, as its read model says: its processes, peers and subscribers."""

from __future__ import annotations

import sqlite3

from odst.bus import authorization as authz
from odst.bus.identity import user_public_key
from odst.events.log import EVENTS_STREAM
from odst.projections import views


def authorization_users(reader, site: str, client_nkey: str, applicants=()) -> list[dict]:
    """The NATS users of a site: its own processes, every known peer, every active subscriber
    (and the sites whose invitations it is joining right now)."""
    try:
        peers = views.peer_sites(reader, site)
        subscribers = views.nats_subscribers(reader)
    except sqlite3.OperationalError:  # a read model not yet created
        peers, subscribers = [], []
    streams = [EVENTS_STREAM] + [f"PEER_{p.site}" for p in peers]
    return authz.users(site, client_nkey, [user_public_key(bytes.fromhex(p.public_key)) for p in peers],
                       subscribers, streams, list(applicants))
