"""Who may use a site's NATS, as its read model says: its processes, peers and subscribers."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from odst.bus import authorization as authz
from odst.bus.identity import user_public_key
from odst.events.log import EVENTS_STREAM
from odst.events.signing import site_id_for
from odst.projections import views
from odst.projections.views import PeerSite


def path_to(peers: list[PeerSite], origin: str) -> list[str]:
    """The sites ``origin``'s log passes on its way here, as registration says: a site
    registered here comes straight ([origin]); one known because a peer vouched for it comes
    through that peer ([peer, origin]), and so on (shortest path, at most MAX_PATH sites; of
    two vouchers, the one that vouched first: a later voucher cannot divert a path). A
    delivery is labelled with it (authorization.mirror_deliver_prefix) and each site on the
    way lets only the named ones send it in. Fixed when the mirror is made."""
    known = {p.site: p for p in peers}
    if origin in known and known[origin].registered_here:
        return [origin]
    frontier = {p.site: [p.site] for p in peers if p.registered_here}
    seen = set(frontier)
    while frontier:
        nxt: dict[str, list[str]] = {}
        for other in sorted(set(known) - seen):
            by = known[other].vouched_by  # newest first
            via = [frontier[v] for v in reversed(by) if v in frontier and len(frontier[v]) < authz.MAX_PATH]
            if via:
                nxt[other] = via[0] + [other]
        if origin in nxt:
            return nxt[origin]
        seen |= set(nxt)
        frontier = nxt
    return [origin]


def legacy_mirrors(store_dir: Path) -> list[str]:
    """Peers' mirrors in a JetStream store made before path-labelled deliveries (their stream
    config, ``meta.inf``, names no delivery prefix): read from disk, before the broker runs,
    since a peer's rights are fixed when its leaf link comes up."""
    out = []
    for meta in sorted(Path(store_dir).glob("*/streams/PEER_*/meta.inf")):
        try:
            mirror = json.loads(meta.read_text()).get("mirror") or {}
        except (OSError, ValueError):
            out.append(meta.parent.name)  # unreadable: assume the old kind (availability first)
            continue
        if not (mirror.get("external") or {}).get("deliver"):
            out.append(meta.parent.name)
    return out


def authorization_users(reader, site: str, client_nkey: str, applicants: Iterable[str] = (),
                        legacy: bool = False) -> list[dict]:
    """The NATS users of a site: its own processes, every known peer, every active subscriber
    (and the sites whose invitations it is joining right now: their public keys, hex).
    ``legacy``: the site has a peer's mirror made before path-labelled deliveries."""
    try:
        peers = views.peer_sites(reader, site)
        subscribers = views.nats_subscribers(reader)
    except sqlite3.OperationalError:  # a read model not yet created
        peers, subscribers = [], []
    streams = [EVENTS_STREAM] + [f"PEER_{p.site}" for p in peers]
    users = [authz.Peer(user_public_key(bytes.fromhex(p.public_key)), p.site) for p in peers]
    joining = [authz.Peer(user_public_key(bytes.fromhex(k)), site_id_for(bytes.fromhex(k))) for k in applicants]
    return authz.users(site, client_nkey, users, subscribers, streams, joining, legacy=legacy)
