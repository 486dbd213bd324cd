"""Who may do what on a site's NATS server: the permission table, rendered into its config.

Three kinds of identity connect to a site's broker, each an NKey (odst.bus.identity):

* **site**: the site's own processes (``<data>/nats-client.nk``). Every right.
* **peer**: a registered site's leaf connection, identified by its site key. It may do
  what mirroring, chunk transfer and registration need, for itself and for sites behind
  it in the leaf tree (a hub carries its spokes' traffic), and nothing else: create a
  mirror consumer on an ``EVENTS`` stream, answer flow control, deliver into this site's
  mirrors of the logs whose path runs through it (its own, and those of the sites this
  site knows through it: ``peer_permissions``) and of no other log, requests to
  ``odst.<site>.chunk`` and ``odst.<site>.rpc.*`` and their replies. It can never update,
  purge or delete a stream, delete a consumer, touch KV buckets (the replicator's leases,
  the used nonces of signed peer requests) or the NOTIFY and REPLICATION streams, publish
  into any site's event subjects or hand events to its chain's owner (``chain_subject``),
  or subscribe to internal subjects (work queues, notifications, the JetStream API, the
  site's private inbox). What it can see: replies on ``_INBOX.>`` that cross its link.
* **subscriber**: a downstream service (``odst credentials add``). Read-only: it may
  subscribe to event subjects and read the event streams through consumers of its own.

Over a leaf link the *accepting* server enforces the connecting user's permissions in
both directions (publish = what the leaf may send in, subscribe = what it is sent). The
*dialing* side (a spoke behind a firewall) cannot trust the permissions its hub
announces, so its remotes carry deny lists (``remote_deny_imports``/``_exports``) that
keep the hub away from the same things.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# Streams of a site that exist for its own machinery, never for peers.
INTERNAL_STREAMS = ("REPLICATION", "NOTIFY", "KV_ODST_LEASES", "KV_ODST_NONCES")


def chain_subject(site: str) -> str:
    """Where a site's gateway helpers hand their events to the process that owns its event chain
    (odst.projections.handoff). Only the site's own identity may use it: no peer's or subscriber's
    allow list names it, and a spoke's leaf deny lists keep its hub away from it."""
    return f"odst.{site}.chain.append"


def inbox_prefix(site: str) -> str:
    """The reply subjects of a site's requests to OTHER sites (``odst.bus.peer_request``):
    under ``_INBOX.``, which peers may publish to (to answer) and are sent. A random token
    each, so a peer that sees some cannot guess the next."""
    return f"_INBOX.{site}"


def private_inbox(site: str) -> str:
    """The reply subjects of everything else a site's processes ask (JetStream, KV, their
    own consumers' deliveries, the chain hand-off): no peer may publish to it or is sent it.
    Under ``_INBOX.<site>`` they were: a peer's leaf link received every reply of the site's
    own requests, and could answer ones whose nats-py token (a NUID) it predicted."""
    return f"_ODST.{site}"


# What a peer's leaf connection may send in and be sent, for every site of the tree.
PEER_SUBJECTS = [
    "$JS.*.API.CONSUMER.CREATE.EVENTS",    # a mirror's consumer on a site's event log
    "$JS.*.API.CONSUMER.CREATE.EVENTS.>",
    "$JS.*.API.STREAM.INFO.EVENTS",         # read-only: is the origin's log still whole?
    "$JSC.R.>",                            # the consumer-create answer to the mirroring server
    "$JS.FC.>",                            # mirror flow control
    "odst.*.chunk",                        # chunk requests (NATS transport)
    "odst.*.rpc.>",                        # registration and other signed peer requests
    "_INBOX.>",                            # replies to requests
]

# Mirror deliveries. A mirror made by this version labels its delivery subject with the path
# its origin's log takes to reach it: ``$JS.M.<p1>…<origin>.M.<random>``, p1 the site this one
# links to, then each site the previous one vouched for, down to the origin
# (``mirror_deliver_prefix``; odst.bus.users.path_to). A peer may send in only deliveries whose
# path names it (``peer_permissions``): a static right, since nats-server keeps a leaf
# connection's permissions for as long as it lasts. nats-server itself checks nothing else of
# a delivery that comes over a leaf link: a peer allowed to publish on every delivery subject
# could write into this site's mirror of ANOTHER site's log (a message the origin never wrote,
# which also hides the origin's own message of that sequence). Under "$JS.M" still, so that a
# hub of an older version, which allows "$JS.M.>", carries them.
DELIVERIES = "$JS.M.>"
LEGACY_DELIVERIES = "$JS.M.*"  # a mirror made before: nats-server's own "$JS.M.<random>"
MAX_PATH = 4  # sites on a delivery's path that the permissions can name


def mirror_deliver_prefix(path: list[str]) -> str:
    return "$JS.M." + ".".join(path[:MAX_PATH])


def peer_permissions(site: str, legacy: bool = False) -> dict:
    """A peer's leaf rights; ``site``: its site id. ``legacy``: this site still has a mirror
    made before path-labelled deliveries (``LEGACY_DELIVERIES``), whose origin any peer may
    then deliver into.

    Both directions carry the same subjects otherwise (a peer mirrors us and we mirror it); it
    is sent every delivery, for the mirrors it makes itself. No deny list: nats-server checks
    the hub's own interest in these subjects against the same table on the spoke, so denying
    "this site's replies" would also cut its requests."""
    publish = PEER_SUBJECTS + ["$JS.M." + "*." * i + f"{site}.>" for i in range(MAX_PATH)]
    if legacy:
        publish.append(LEGACY_DELIVERIES)
    return {"publish": {"allow": publish}, "subscribe": {"allow": PEER_SUBJECTS + [DELIVERIES]}}


def subscriber_inbox(name: str) -> str:
    """A subscriber's own reply-subject prefix (nats-py ``inbox_prefix``, NATS CLI
    ``--inbox-prefix``): no other identity is sent its replies, and it sees no one else's."""
    return f"_INBOX_{name}"


def subscriber_permissions(name: str, streams: list[str]) -> dict:
    """A read-only subscriber: live event subjects, and consumers named ``name`` on the
    event streams (pull, or push to its own inbox). Not the unnamed create route: its body
    could name, and so rewrite, another subscriber's consumer."""
    pub = ["$JS.API.INFO"]
    for stream in streams:
        pub += [f"$JS.API.STREAM.INFO.{stream}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{name}",
                f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>",
                f"$JS.API.CONSUMER.INFO.{stream}.{name}",
                f"$JS.API.CONSUMER.DELETE.{stream}.{name}",
                f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
                f"$JS.ACK.{stream}.{name}.>",
                f"$JS.FC.{stream}.{name}.>"]
    return {"publish": {"allow": pub},
            "subscribe": {"allow": ["odst.*.ev.>", f"{subscriber_inbox(name)}.>"]}}


def remote_deny_imports(site: str) -> list[str]:
    """What a site dialing out refuses to take from its hub, whatever the hub announces."""
    api = f"$JS.{site}.API"
    deny = [f"{api}.STREAM.{op}.>" for op in
            ("CREATE", "UPDATE", "DELETE", "PURGE", "SNAPSHOT", "RESTORE", "MSG", "PEER", "LEADER",
             "CANCEL_MOVE")]
    deny += [f"{api}.STREAM.NAMES", f"{api}.STREAM.LIST"]
    deny += [f"{api}.STREAM.INFO.{stream}" for stream in INTERNAL_STREAMS]
    deny += [f"{api}.META.>", f"{api}.SERVER.>", f"{api}.ACCOUNT.>",
            f"{api}.DIRECT.>", f"{api}.INFO"]
    deny += [f"{api}.CONSUMER.{op}.>" for op in
             ("DELETE", "DURABLE", "MSG", "PAUSE", "UNPIN", "RESET", "LEADER", "INFO", "LIST", "NAMES")]
    for stream in INTERNAL_STREAMS:
        deny += [f"{api}.CONSUMER.CREATE.{stream}", f"{api}.CONSUMER.CREATE.{stream}.>"]
    # (no "$JS.API.>" here: requests to "$JS.<site>.API" are mapped to it before this check)
    deny += ["$KV.>", "$O.>", "$SYS.>", "$JS.ACK.>", f"{private_inbox(site)}.>",
             f"odst.{site}.ev.>", f"odst.{site}.work.>", f"odst.{site}.notify.>", f"odst.{site}.chain.>"]
    return deny


def remote_deny_exports(site: str) -> list[str]:
    """What a site dialing out never sends to its hub: its own replies and internal traffic."""
    return [f"{inbox_prefix(site)}.>", f"{private_inbox(site)}.>", "$JS.API.>", "$KV.>", "$O.>",
            f"odst.{site}.work.>", f"odst.{site}.notify.>", f"odst.{site}.chain.>"]


@dataclass(frozen=True)
class Subscriber:
    name: str
    nkey: str  # public 'U…' key


@dataclass(frozen=True)
class Peer:
    nkey: str
    site: str


def users(site: str, site_nkey: str, peers: list[Peer], subscribers: list[Subscriber],
          streams: list[str], applicants: list[Peer] = (), legacy: bool = False) -> list[dict]:
    # An applicant is a site whose invitation this site's admin is joining: its leaf link (the
    # only way to reach a firewalled inviter) gets a peer's rights at once, since nats-server
    # keeps a leaf connection's permissions for as long as it lasts.
    out: list[dict] = [{"nkey": site_nkey}]
    by_nkey = {p.nkey: p for p in [*applicants, *peers]}
    out += [{"nkey": nk, "permissions": peer_permissions(p.site, legacy)} for nk, p in sorted(by_nkey.items())]
    out += [{"nkey": s.nkey, "permissions": subscriber_permissions(s.name, streams)}
            for s in sorted(subscribers, key=lambda s: s.name)]
    return out


def render_users(users_: list[dict]) -> str:
    """The ``authorization { users: [...] }`` block (NATS config accepts JSON values)."""
    lines = ["authorization {", "  users: ["]
    lines += [f"    {json.dumps(u, separators=(', ', ': '))}" for u in users_]
    lines += ["  ]", "}"]
    return "\n".join(lines)
