"""The system account: the one NATS user that reloads a site's servers and cuts the leaf links
a reload leaves behind.

Who: ``<data>/nats-system.nk`` (0600, beside ``nats-client.nk``), in the account ``SYS`` of the
embedded broker and of a NATS server ODST does not run (``odst nats-config``'s auth.conf).
What it may do: find the servers (``PING.IDZ``), ask one to re-read its config (``RELOAD``),
list its connections with the key each authenticated with (``CONNZ``), list its leaf links
with the name of the server at the other end (``LEAFZ``: which links it dialed, to whom;
odst.bus.hubs) and close one by id (``KICK``). Nothing else of the system account (no account changes, no lame duck, no
shutdown), no JetStream, no ODST subject. No peer can reach it: leaf links are bound to the
global account and peers may not publish ``$SYS``.

Why the cut: nats-server (2.15) checks client connections again on a reload, not accepted
leaf connections (server/reload.go ``reloadAuthorization`` walks the clients only), so a
removed peer's link would keep a peer's rights until it drops. After a reload ``cut_stale_links``
closes every accepted leaf link whose key (``authorized_user`` of ``CONNZ`` with ``auth``: the
NKey nats-server verified at connect, so not one the remote can choose, unlike its
server_name) is not one of the site's users any more. Honest peers' links stay up; the
removed peer's re-dial is refused by the reloaded users.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from odst import tasks
from odst.bus import connect
from odst.bus.identity import new_user_seed, read_seed, write_secret

log = structlog.get_logger("odst.bus")

SYSTEM_SEED_FILE = "nats-system.nk"
SYSTEM_ACCOUNT = "SYS"

PING_IDZ = "$SYS.REQ.SERVER.PING.IDZ"  # every server of the cluster answers with its id
RELOAD = "$SYS.REQ.SERVER.{id}.RELOAD"  # nats-server re-reads its config (server/events.go)
CONNZ = "$SYS.REQ.SERVER.{id}.CONNZ"  # its connections, leaf links included; with "auth", their keys
KICK = "$SYS.REQ.SERVER.{id}.KICK"  # {"cid": N}: close that client or leaf connection
LEAFZ = "$SYS.REQ.SERVER.{id}.LEAFZ"  # its leaf links with the name of the server at the other end
# The system user may ask for ids, reloads, connection and leaf link lists and kicks, and
# nothing else of the system account (no account changes, no lame duck mode, no shutdown).
SYSTEM_PERMISSIONS = {"publish": {"allow": [PING_IDZ, RELOAD.format(id="*"), CONNZ.format(id="*"),
                                            KICK.format(id="*"), LEAFZ.format(id="*")]},
                      "subscribe": {"allow": ["_INBOX.>"]}}
CONNZ_PAGE = 1024  # nats-server's own default page
# A reload under way (the users' SIGHUP just before a pass) refuses the system user for a
# moment ("Authorization Violation", "Problem registering with account SYS"): a pass that
# failed is made again this many times, first after QUICK_RETRY_S, then doubling (in
# all: 1.55 s), before it is an ERROR. A new peer's link waits for the pass (``Site.redial_hubs``).
QUICK_RETRIES = 5
QUICK_RETRY_S = 0.05


class SystemRequestError(Exception):
    """A NATS server did not answer the system user, or refused; the message says what to check."""


def render_system_account(system_nkey: str) -> str:
    """The config lines of the system account and its one user (public key ``system_nkey``)."""
    system = {"nkey": system_nkey, "permissions": SYSTEM_PERMISSIONS}
    return (f"accounts {{\n  {SYSTEM_ACCOUNT}: {{ users: [ {json.dumps(system)} ] }}\n}}\n"
            f"system_account: {SYSTEM_ACCOUNT}\n")


def load_or_create_system_seed(data: Path) -> str:
    path = Path(data) / SYSTEM_SEED_FILE
    if not path.exists():
        write_secret(path, new_user_seed() + "\n")
    return read_seed(path)


@dataclass(frozen=True)
class ClosedLink:
    server: str  # the id of the server that had accepted it
    cid: int
    nkey: str  # the key it authenticated with (a user no longer)
    name: str  # what the remote calls itself (its server_name: its own choice)
    address: str


def stale_links(connections: list[dict], users: frozenset[str]) -> list[dict]:
    """Of a CONNZ page (with ``auth``), the accepted leaf links whose key is none of ``users``.
    A link this server dialed itself carries no authorized_user and is never one."""
    return [c for c in connections
            if c.get("kind") == "Leafnode" and c.get("authorized_user") and c["authorized_user"] not in users]


async def _ask(nc, subject: str, body: dict | None, timeout: float) -> dict:
    import nats.errors

    try:
        msg = await nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=timeout)
    except nats.errors.TimeoutError:
        raise SystemRequestError(f"no answer to {subject} within {timeout}s") from None
    reply = json.loads(msg.data)
    if reply.get("error"):
        raise SystemRequestError(f"{subject} refused: {reply['error'].get('description', reply['error'])}")
    return reply.get("data") or {}


async def server_ids(nc, servers: str, timeout: float, *, single: bool = False) -> list[str]:
    """The ids of every server of the cluster behind ``servers`` (all answer the ping; the
    last answer is known by the silence after it, 0.5 s). ``single``: ``servers`` is one
    server (the embedded broker), whose answer is the last."""
    import nats.errors

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    try:
        await nc.publish(PING_IDZ, b"", reply=inbox)
        ids: list[str] = []
        wait = timeout
        while True:  # the last answer is followed by silence
            try:
                msg = await sub.next_msg(timeout=wait)
            except nats.errors.TimeoutError:
                if ids:
                    return ids
                raise SystemRequestError(
                    f"no NATS server at {servers} answered {PING_IDZ} as the system user: is its system "
                    "account configured (auth.conf from `odst nats-config` included)?") from None
            ids.append(json.loads(msg.data)["id"])
            if single:
                return ids
            wait = 0.5
    finally:
        await sub.unsubscribe()


async def cut_stale_links(nc, server: str, users: frozenset[str], timeout: float,
                          current: Callable[[], frozenset[str]] | None = None) -> list[ClosedLink]:
    """Close every leaf link ``server`` accepted whose key is none of ``users``. Every page of
    its connections is read first (a kick shifts the pages after it); ``current()``, if given,
    gives the users as they are now, so that a key that became a user again while the pass ran
    (a peer registered, an applicant admitted) keeps its link."""
    conns: list[dict] = []
    while True:
        page = await _ask(nc, CONNZ.format(id=server), {"auth": True, "offset": len(conns), "limit": CONNZ_PAGE},
                          timeout)
        got = page.get("connections") or []
        conns += got
        if not got or len(conns) >= int(page.get("total") or 0):
            break
    stale = stale_links(conns, users)
    if stale and current is not None:
        stale = stale_links(stale, current())
    closed: list[ClosedLink] = []
    for c in stale:
        if not await kick(nc, server, c["cid"], timeout):
            continue  # gone already
        closed.append(ClosedLink(server, c["cid"], c["authorized_user"], c.get("name") or "",
                                 f"{c.get('ip', '')}:{c.get('port', '')}"))
    return closed


async def dialed_links(nc, server: str, timeout: float) -> list[dict]:
    """The leaf links ``server`` dialed itself (to a hub), each with ``id`` (its cid), ``name``
    (the server_name the hub gave), ``ip`` and ``port`` (the hub's address)."""
    leafz = await _ask(nc, LEAFZ.format(id=server), {}, timeout)
    return [link for link in leafz.get("leafs") or [] if link.get("is_spoke")]


async def reload_server(nc, server: str, timeout: float) -> None:
    """Have ``server`` re-read its config; the answer comes once the new config is in force."""
    await _ask(nc, RELOAD.format(id=server), None, timeout)


async def kick(nc, server: str, cid: int, timeout: float) -> bool:
    """Close connection ``cid`` of ``server``; False if it was gone already."""
    try:
        await _ask(nc, KICK.format(id=server), {"cid": cid}, timeout)
    except SystemRequestError as exc:
        if "no such client" not in str(exc):
            raise
        return False
    return True


@dataclass(frozen=True)
class Reloaded:
    servers: list[str]  # the ids of the servers that reloaded
    closed: list[ClosedLink]  # the leaf links cut after it (keep_only given)


async def reload_servers(servers: str, system_seed: str, timeout: float = 5.0, *, single: bool = False,
                         keep_only: frozenset[str] | None = None,
                         current: Callable[[], frozenset[str]] | None = None) -> Reloaded:
    """Ask every server of the cluster behind ``servers`` to re-read its config (the answer
    comes once the new users are in force), then, with ``keep_only`` (the NKeys of the site's
    users now), close on each the leaf links authenticated with any other key. Raises
    SystemRequestError when no server answers or one refuses."""
    nc = await connect_system(servers, system_seed)
    try:
        ids = await server_ids(nc, servers, timeout, single=single)
        closed: list[ClosedLink] = []
        for server in ids:
            try:
                await reload_server(nc, server, timeout)
            except SystemRequestError as exc:
                raise SystemRequestError(f"NATS server {server} did not reload its config: {exc}") from None
        if keep_only is not None:  # only once every server runs the new users: a cut link's re-dial is refused
            for server in ids:
                closed += await cut_stale_links(nc, server, keep_only, timeout, current)
        return Reloaded(ids, closed)
    finally:
        await nc.close()


async def connect_system(servers: str, system_seed: str):
    """The system user's connection: no reconnect, and nats-py's own logging of a refused
    connect left to the caller (it raises; the pass is made again, ``QUICK_RETRIES``)."""
    async def raised_to_the_caller(exc: Exception) -> None:
        pass
    return await connect(servers, seed=system_seed, name="odst-system", allow_reconnect=False,
                         error_cb=raised_to_the_caller)


def user_keys(users: list[dict]) -> frozenset[str]:
    """The NKeys of rendered users (odst.bus.authorization.users)."""
    return frozenset(u["nkey"] for u in users if u.get("nkey"))


class LinkCutter:
    """Keeps a site's servers' leaf links to its users: after its users were reloaded, reload
    every server again through the system account (so the new users are surely in force),
    then close each leaf link whose key is no user's (one log line per link). Runs in the
    background; a failure is logged and the work is done again at the next call."""

    def __init__(self, servers: str, system_seed_path: Path, names=None,
                 current: Callable[[], frozenset[str]] | None = None, *, single: bool = False):
        self.servers, self.system_seed_path = servers, Path(system_seed_path)
        self.single = single  # one server (the embedded broker): server_ids
        self.current = current  # the users' keys as they are now, read again before a kick
        self.names = names or (lambda nkey: "")  # the peer site an NKey is, for the log
        self._keys: frozenset[str] | None = None  # the users to keep at the next pass
        self._task: asyncio.Task | None = None

    def reloaded(self, keys: frozenset[str]) -> None:
        """The users are now ``keys``: reload and cut in the background (the latest keys win;
        the same keys again while a pass for them runs add nothing)."""
        if keys != self._keys:
            self._keys = keys
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="nats-cut-links")

    @property
    def pending(self) -> bool:
        return self._keys is not None

    @property
    def busy(self) -> bool:
        """A pass (reloads, then cuts) is under way."""
        return self._task is not None and not self._task.done()

    async def settled(self, timeout: float) -> bool:
        """Waits up to ``timeout`` for the pass under way; True once none is."""
        if self.busy:
            await asyncio.wait({self._task}, timeout=timeout)
        return not self.busy

    async def stop(self) -> None:
        if self._task is not None:
            await tasks.cancel(self._task)

    async def _run(self) -> None:
        failed = 0
        while self._keys is not None:
            keys = self._keys
            try:
                done = await reload_servers(self.servers, read_seed(self.system_seed_path), single=self.single,
                                            keep_only=keys, current=self.current)
            except Exception as exc:
                failed += 1
                if failed <= QUICK_RETRIES:  # most likely the users' reload still under way
                    await asyncio.sleep(QUICK_RETRY_S * 2 ** (failed - 1))
                    continue
                log.error("NATS servers not reloaded; removed users' leaf links may still be up; retrying",
                          error=f"{type(exc).__name__}: {exc}")
                return  # done again at the next call
            if self._keys == keys:
                self._keys = None
            for link in done.closed:
                log.warning("leaf link of a removed user closed", peer=self.names(link.nkey), nkey=link.nkey,
                            server=link.server, cid=link.cid, calls_itself=link.name, address=link.address)
            log.info("NATS servers reloaded their users", servers=len(done.servers), closed=len(done.closed))
