"""The hubs this site dials: a peer this site removed is dialed no more.

A spoke dials its hub (``leaf_remotes``). That link carries no key of the hub's, so the
LinkCutter (odst.bus.system), which closes accepted links by the key they authenticated with,
never closes it; over it a removed hub could go on reading whatever this site's remote deny
lists allow (its whole event log, through ``$JS.<site>.API``), and it routes all traffic
between this site and the others. So once this site removed the peer a remote leads to, the
embedded broker's config renders that remote ``disabled``: on the reload nats-server (>= 2.14)
closes its link and dials it no more. It stays disabled across restarts: a removal is for good
(the read model's ``removals``), so the operator names another hub in ``leaf_remotes``.

Which remote leads to which site: LEAFZ gives each link this server dialed with the
server_name of the hub (on an embedded broker, its site id) and the hub's ip:port, matched to
the remotes' URLs (resolved). The name is the hub's own choice, and that is safe here: a hub
that names itself a removed peer only gets itself disconnected, which it can do anyway by
closing the link. So that a removed hub cannot keep its link by coming back under another name
(or by being offline when it is removed), the site a remote led to is remembered from the
first time its link is seen (``<data>/nats-hubs.json``, 0600), and a remote whose site is
removed keeps that site.

A NATS server ODST does not run keeps its remotes in the operator's config: the site can only
find a link to a removed peer there and say, at ERROR, that the operator must remove it.

A hub refuses a spoke's link until the two sites are registered, and nats-server dials a
refused remote again only after its reconnect interval (1 s): most of a new site's wait for
its first package. So while a newly known peer is not linked, ``redial`` has the remotes
with no link dialed at once: disabled, then enabled again (two reloads, each answered once in
force; on enabling, nats-server >= 2.14 dials at once).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import structlog

from odst.bus.identity import read_seed, write_secret
from odst.bus.system import (SystemRequestError, connect_system, dialed_links, kick, reload_server,
                              server_ids)

log = structlog.get_logger("odst.bus")

HUBS_FILE = "nats-hubs.json"  # {remote URL: the site its link led to}
LEAF_PORT = 7422  # nats-server's default leaf port, for a remote URL that names none
TIMEOUT_S = 5.0
EXTERNAL_EVERY_S = 60.0  # how often the servers of a NATS server ODST does not run are asked, at most
EXTERNAL_REPEAT_S = 600.0  # how often the ERROR about one link of such a server is repeated


def read_hubs(data: Path) -> dict[str, str]:
    try:
        return json.loads((Path(data) / HUBS_FILE).read_text())
    except FileNotFoundError:
        return {}


def disabled_remotes(hubs: dict[str, str], removed: frozenset[str]) -> frozenset[str]:
    """The remotes that lead to a removed peer."""
    return frozenset(url for url, site in hubs.items() if site in removed)


def remember(hubs: dict[str, str], seen: dict[str, str], removed: frozenset[str]) -> dict[str, str]:
    """``hubs`` with the sites the remotes' links were ``seen`` to lead to, except that a remote
    that leads to a removed peer keeps it (a removed hub cannot free itself by a new name)."""
    return {**hubs, **{url: site for url, site in seen.items() if hubs.get(url) not in removed}}


def _address(ip: str, port) -> tuple[str, int]:
    return str(ipaddress.ip_address(ip.split("%")[0])), int(port)


async def remote_addresses(urls: list[str]) -> dict[tuple[str, int], list[str]]:
    """Every ip:port each remote URL resolves to -> the URLs (a name may resolve to several)."""
    loop = asyncio.get_running_loop()
    out: dict[tuple[str, int], list[str]] = {}
    for url in urls:
        parts = urlsplit(url)
        port = parts.port or LEAF_PORT
        try:
            infos = await loop.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
        except OSError:
            continue  # not resolvable now: not dialed either
        for info in infos:
            out.setdefault(_address(info[4][0], port), []).append(url)
    return out


def seen_hubs(links: list[dict], addresses: dict[tuple[str, int], list[str]]) -> dict[str, str]:
    """Of the links this server dialed, the remote URL of each -> the name its hub gave."""
    return {url: link["name"] for link in links if link.get("name")
            for url in addresses.get(_address(link["ip"], link["port"]), [])}


class HubGuard:
    """Keeps the embedded broker from dialing a removed peer (see the module docstring)."""

    def __init__(self, broker, data: Path, system_seed_path: Path):
        self.broker, self.data, self.system_seed_path = broker, Path(data), Path(system_seed_path)

    async def check(self, removed: frozenset[str]) -> None:
        urls = self.broker.config.leaf_remotes
        hubs = read_hubs(self.data)
        if not urls or (not removed and not self.broker.config.disabled_remotes and set(urls) <= hubs.keys()):
            return  # nothing to disable or enable again, every remote's site known: no need to ask
        nc = await connect_system(self.broker.url, read_seed(self.system_seed_path))
        try:
            [server] = await server_ids(nc, self.broker.url, TIMEOUT_S, single=True)
            addresses = await remote_addresses(urls)
            known = remember(hubs, seen_hubs(await dialed_links(nc, server, TIMEOUT_S), addresses), removed)
            if known != hubs:
                write_secret(self.data / HUBS_FILE, json.dumps(known, indent=1, sort_keys=True) + "\n")
            off = disabled_remotes(known, removed) & frozenset(urls)
            was = self.broker.config.disabled_remotes
            if self.broker.disable_remotes(off):
                try:
                    await reload_server(nc, server, TIMEOUT_S)  # answered once in force
                except SystemRequestError:
                    self.broker.config.disabled_remotes = was  # not surely in force: written again next pass
                    raise
                for url in sorted(was - off):
                    log.info("a hub is dialed again: its site is no removed peer any more", peer=known.get(url), url=url)
                for url in sorted(off - was):
                    log.warning("a removed peer's hub is dialed no more: this site reaches no other site through "
                                "it until leaf_remotes names another hub (a removal is for good)",
                                peer=known[url], url=url)
            if off:  # the reload closes a disabled remote's link; one that outlived it is closed here
                for link in await dialed_links(nc, server, TIMEOUT_S):
                    at = addresses.get(_address(link["ip"], link["port"]), [])
                    if set(at) & off and await kick(nc, server, link["id"], TIMEOUT_S):
                        log.warning("a removed peer's hub link closed", peer=link.get("name"), urls=at)
        finally:
            await nc.close()

    async def redial(self) -> frozenset[str]:
        """Dial at once every remote that has no link now (see the module docstring); the
        remotes dialed again. A remote whose link came up meanwhile is dialed again too,
        which costs it that one link."""
        urls = [u for u in self.broker.config.leaf_remotes if u not in self.broker.config.disabled_remotes]
        if not urls:
            return frozenset()
        nc = await connect_system(self.broker.url, read_seed(self.system_seed_path))
        try:
            [server] = await server_ids(nc, self.broker.url, TIMEOUT_S, single=True)
            addresses = await remote_addresses(urls)
            linked = {url for link in await dialed_links(nc, server, TIMEOUT_S)
                      for url in addresses.get(_address(link["ip"], link["port"]), [])}
            idle = frozenset(urls) - linked
            if idle:
                was = self.broker.config.disabled_remotes
                try:
                    self.broker.disable_remotes(was | idle)
                    await reload_server(nc, server, TIMEOUT_S)
                finally:  # enabled again whatever happened: the config on disk, then in force
                    self.broker.disable_remotes(was)
                    await reload_server(nc, server, TIMEOUT_S)
            return idle
        finally:
            await nc.close()


class ExternalHubWatch:
    """A NATS server ODST does not run: its remotes are the operator's, so a link one of its
    servers dialed to a removed peer is reported (ERROR, once per EXTERNAL_REPEAT_S a link).
    The servers are asked when the removed peers change and every EXTERNAL_EVERY_S (each ask
    waits for every server's answer, and one whose system user predates LEAFZ never answers)."""

    def __init__(self, servers: str, system_seed_path: Path):
        self.servers, self.system_seed_path = servers, Path(system_seed_path)
        self._asked: tuple[frozenset[str], float] | None = None  # the removed peers, when
        self._said: dict[tuple[str, int], float] = {}  # (server, cid) -> when its ERROR was logged

    async def check(self, removed: frozenset[str]) -> None:
        now = time.monotonic()
        if not removed or not self.system_seed_path.exists() or (
                self._asked and self._asked[0] == removed and now - self._asked[1] < EXTERNAL_EVERY_S):
            return
        self._asked = (removed, now)
        self._said = {key: at for key, at in self._said.items() if now - at < EXTERNAL_REPEAT_S}
        nc = await connect_system(self.servers, read_seed(self.system_seed_path))
        try:
            for server in await server_ids(nc, self.servers, TIMEOUT_S):
                for link in await dialed_links(nc, server, TIMEOUT_S):
                    if link.get("name") in removed and (server, link["id"]) not in self._said:
                        self._said[(server, link["id"])] = now
                        log.error("a NATS server dials a removed peer, which can still read this site's log over "
                                  "that link: the operator must remove that leaf remote from its config",
                                  peer=link["name"], server=server, address=f"{link.get('ip')}:{link.get('port')}")
        finally:
            await nc.close()
