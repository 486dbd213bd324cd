"""Removing a peer cuts its live leaf link, and only its.

nats-server (2.15) checks client connections again when it reloads its users, not the leaf
connections it accepted: a removed peer's open link kept a peer's NATS rights (reading the
site's log through its mirror, delivering into mirrors labelled with its path) until it
dropped. The site now closes, after the reload, every accepted leaf link whose key is no user
any more, found by the key nats-server verified at connect (odst.bus.system.LinkCutter).
The link a spoke dialed to a hub it removed is closed, and dialed no more (odst.bus.hubs).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from pathlib import Path

from structlog.testing import capture_logs

from odst.bus import connect
from odst.bus.embedded import nats_server_binary
from odst.bus.hubs import HUBS_FILE, ExternalHubWatch
from odst.bus.identity import public_key_of_seed, read_seed
from odst.bus.system import (CONNZ, SYSTEM_SEED_FILE, dialed_links, load_or_create_system_seed, reload_servers,
                              render_system_account, server_ids)
from tests.conftest import free_port, wait_until, write_random
from tests.system.test_bandwidth import hold
from tests.system.test_cluster import cluster  # noqa: F401  (a fixture)
from tests.system.test_mirror_injection import RawLeaf, hub_with_spokes, leaf_seed
from tests.system.test_replication import available_at, site_id, upload


def leaf_links(site) -> dict[str, int]:
    """The leaf links the site's broker accepted: the key each authenticated with -> its cid,
    as nats-server itself reports them to the site's system user."""
    async def ask():
        nc = await connect(site.run_info()["nats"], seed=read_seed(site.data / SYSTEM_SEED_FILE),
                           allow_reconnect=False)
        try:
            (server,) = await server_ids(nc, "", 5)
            msg = await nc.request(CONNZ.format(id=server), json.dumps({"auth": True}).encode(), timeout=5)
            return {c["authorized_user"]: c["cid"] for c in json.loads(msg.data)["data"]["connections"]
                    if c.get("kind") == "Leafnode" and c.get("authorized_user")}
        finally:
            await nc.close()
    return asyncio.run(ask())


def cut(link: RawLeaf) -> bool:
    """The hub closed this connection (an EOF, or a reset), within a short read."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            data = link.sock.recv(1 << 16)
        except socket.timeout:
            continue
        except OSError:
            return True
        if not data:
            return True
        link.buf += data
        if b"PING\r\n" in data:
            link.send(b"PONG\r\n")
    return False


def refused(port: int, seed: str) -> bytes:
    """Dial the leaf port with ``seed`` and return what the hub answered before closing."""
    try:
        RawLeaf(port, seed).close()
    except AssertionError as exc:  # no PONG: refused
        return str(exc).encode()
    return b"accepted"


def test_removing_a_peer_cuts_its_leaf_link_and_the_others_go_on(make_site, tmp_path):
    leaf, a, (b, c) = hub_with_spokes(make_site, "B", "C")
    b_id, c_id = site_id(b), site_id(c)
    b_seed, c_seed = leaf_seed(b), leaf_seed(c)
    b_key, c_key = public_key_of_seed(b_seed), public_key_of_seed(c_seed)
    wait_until(lambda: {b_key, c_key} <= set(leaf_links(a)), 30, what="B's and C's links at A")
    c_link = leaf_links(a)[c_key]

    # B's own key on a link of its own: what a removed peer would keep using
    held = RawLeaf(leaf, b_seed)
    try:
        held.listen("$JS.M.>")
        assert not cut(held), "the hub closed B's link before B was removed: the test proves nothing"
        with a.client() as admin:
            r = admin.delete(f"/api/v1/peers/{b_id}")
            assert r.status_code == 200, r.text

        wait_until(lambda: cut(held), 20, what="A to close the link B's key holds")
    finally:
        held.close()
    wait_until(lambda: b_key not in leaf_links(a), 20, what="B's own broker's link at A to be closed")
    # B's re-dial is checked against A's new users: refused
    answer = refused(leaf, b_seed)
    assert b"Authorization Violation" in answer, answer
    assert b_key not in leaf_links(a)
    # one log line per closed link, naming the peer, the server and the connection (logged
    # once the pass has closed every link: a moment after the test can see them closed)
    wait_until(lambda: "leaf link of a removed user closed" in a.log(1 << 20), 30, what="the cut links logged")
    assert b_id in a.log(1 << 20)

    # C's link was never cut, and C still gets what A publishes
    assert leaf_links(a).get(c_key) == c_link
    upload(a, "after.pkg", write_random(tmp_path / "after.pkg", 5000, seed=7))
    wait_until(lambda: available_at(c, "after.pkg", c_id), 60, what="after.pkg at C")
    assert not available_at(b, "after.pkg", b_id)

    # a pass that began before C was a user (keep_only without C's key) reads the users again
    # before it kicks: C, a user by then, keeps its link
    stale_pass = asyncio.run(reload_servers(a.run_info()["nats"], read_seed(a.data / SYSTEM_SEED_FILE),
                                            keep_only=frozenset(), current=lambda: frozenset({c_key})))
    assert stale_pass.closed == [] and leaf_links(a).get(c_key) == c_link


def leaf_port(conf: Path) -> int:
    """The leaf port a node of the cluster fixture listens on (from its config)."""
    block = conf.read_text().split("leafnodes", 1)[1]
    return int(re.search(r'"127\.0\.0\.1:(\d+)"', block).group(1))


def test_on_a_cluster_every_node_cuts_a_removed_peers_links(cluster, make_site, tmp_path):
    """A NATS cluster ODST does not run: the projector rewrites auth.conf, reloads every node
    and closes the removed peer's links on each of them."""
    data, _, urls, _, _, leaf = cluster
    site = make_site("site", env={"ODST_NATS_AUTH_FILE": str(tmp_path / "nodes" / "site" / "auth.conf")},
                     extra_args=["--nats", urls])
    site.data = data
    site.start(timeout=120)
    peer = make_site("peer", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}"]).start()
    with site.client() as c, peer.client() as pc:
        token = c.post("/api/v1/peers/invites", json={}).json()["token"]
        assert pc.post("/api/v1/peers/join", json={"token": token}).status_code == 201
    peer_id, seed = site_id(peer), leaf_seed(peer)
    ports = [leaf, leaf_port(tmp_path / "nodes" / "n1.conf")]
    # the peer's key on a link to node 0 and to node 1 (accepted once the users are reloaded)
    wait_until(lambda: refused(ports[1], seed) == b"accepted", 30, what="node 1 to accept the peer's key")
    held = [RawLeaf(p, seed) for p in ports]
    try:
        for link in held:
            link.listen("$JS.M.>")
        assert not any(cut(link) for link in held), "a link was closed before the removal: the test proves nothing"
        with site.client() as c:
            assert c.delete(f"/api/v1/peers/{peer_id}").status_code == 200
        for link, port in zip(held, ports):
            wait_until(lambda: cut(link), 30, what=f"the node on leaf port {port} to close the peer's link")
    finally:
        for link in held:
            link.close()
    for port in ports:
        answer = refused(port, seed)
        assert b"Authorization Violation" in answer, answer
    # logged once the pass has closed every link: a moment after the test sees the last one closed
    wait_until(lambda: "leaf link of a removed user closed" in site.log(1 << 20), 30, what="the cut links logged")


def dialed(site) -> list[str]:
    """The hubs the site's broker dialed (LEAFZ: the links it is the spoke of), by the name
    each hub gave, as nats-server reports them to the site's system user."""
    async def ask():
        nc = await connect(site.run_info()["nats"], seed=read_seed(site.data / SYSTEM_SEED_FILE),
                           allow_reconnect=False)
        try:
            (server,) = await server_ids(nc, "", 5)
            return [link["name"] for link in await dialed_links(nc, server, 5)]
        finally:
            await nc.close()
    return asyncio.run(ask())


def remotes(site) -> list[dict]:
    """The leaf remotes of the site's rendered broker config."""
    text = (site.data / "run" / "nats.conf").read_text()
    return json.loads("[" + re.search(r"remotes: \[ (.*) \]", text).group(1) + "]")


def test_removing_the_hub_this_site_dials_closes_that_link_for_good(make_site):
    """The link a spoke dialed carries no key of the hub's, so the cut by key never closed it:
    a spoke that removed its hub kept dialing it, and the removed hub could go on reading the
    spoke's log over it. The spoke now disables that remote (odst.bus.hubs)."""
    leaf, a, (b,) = hub_with_spokes(make_site, "B")
    a_id, b_key = site_id(a), public_key_of_seed(leaf_seed(b))
    wait_until(lambda: b_key in leaf_links(a), 30, what="B's link at A")
    assert not any(r.get("disabled") for r in remotes(b))
    with b.client() as admin:
        r = admin.delete(f"/api/v1/peers/{a_id}")
        assert r.status_code == 200, r.text

    wait_until(lambda: b_key not in leaf_links(a), 20, what="B's link at A to be closed")
    assert dialed(b) == []
    (remote,) = remotes(b)
    assert remote["url"] == f"nats-leaf://127.0.0.1:{leaf}" and remote["disabled"] is True
    assert (b.data / HUBS_FILE).stat().st_mode & 0o777 == 0o600
    line = wait_until(lambda: next((x for x in b.log(1 << 20).splitlines() if "hub is dialed no more" in x), None),
                      30, what="the disabled hub logged")  # once the reload is in force
    assert a_id in line and f"127.0.0.1:{leaf}" in line

    # after a restart B still does not dial A: the remote is rendered disabled from the start,
    # and no link comes up over a window of several of the remote's 1 s re-dial intervals
    b.stop()
    b.start()
    assert remotes(b)[0]["disabled"] is True
    hold(lambda: not dialed(b) and b_key not in leaf_links(a), 4, what="no link between B and A")


def bare_server(tmp_path: Path, name: str, body: str) -> tuple[subprocess.Popen, int]:
    """A nats-server of its own config (what an operator runs), listening on a free port."""
    port = free_port()
    conf = tmp_path / f"{name}.conf"
    conf.write_text(f'server_name: "{name}"\nlisten: "127.0.0.1:{port}"\n{body}')
    proc = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return proc, port


def test_a_nats_server_odst_does_not_run_that_dials_a_removed_peer_is_named_for_the_operator(tmp_path):
    """ODST cannot change an external server's remotes: it says which link the operator must remove."""
    seed_path = tmp_path / SYSTEM_SEED_FILE
    seed = load_or_create_system_seed(tmp_path)
    leaf = free_port()
    hub, _ = bare_server(tmp_path, "s-removed", f'leafnodes {{ listen: "127.0.0.1:{leaf}" }}\n')
    server, port = bare_server(tmp_path, "ext", f'leafnodes {{ remotes: [ {{ url: "nats-leaf://127.0.0.1:{leaf}" }} ] }}\n'
                               + render_system_account(public_key_of_seed(seed)))
    url = f"nats://127.0.0.1:{port}"
    try:
        async def links():
            nc = await connect(url, seed=seed, allow_reconnect=False)
            try:
                return [link["name"] for s in await server_ids(nc, url, 5) for link in await dialed_links(nc, s, 5)]
            finally:
                await nc.close()
        wait_until(lambda: asyncio.run(links()) == ["s-removed"], 30, what="the external server's link to its hub")

        watch = ExternalHubWatch(url, seed_path)
        with capture_logs() as logs:
            asyncio.run(watch.check(frozenset({"s-other"})))  # not the hub: nothing to say
            asyncio.run(watch.check(frozenset({"s-other", "s-removed"})))
            asyncio.run(watch.check(frozenset({"s-removed"})))  # said already for this link
        errors = [e for e in logs if e["log_level"] == "error"]
        assert len(errors) == 1, logs
        assert errors[0]["peer"] == "s-removed" and errors[0]["address"] == f"127.0.0.1:{leaf}"
        assert "operator must remove that leaf remote" in errors[0]["event"]
    finally:
        for proc in (server, hub):
            proc.terminate()
            proc.wait(10)
