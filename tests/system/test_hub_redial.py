"""A hub that has just admitted this site is dialed at once (odst.bus.hubs.HubGuard.redial),
not after the remote's reconnect interval: real nats-servers, a hub that refuses the spoke's
key until it is told otherwise, and a spoke whose refused remote would wait a minute."""

from __future__ import annotations

import asyncio
import json

from odst.bus.embedded import BrokerConfig, EmbeddedBroker
from odst.bus.hubs import HubGuard
from odst.bus.identity import new_user_seed, public_key_of_seed, write_secret
from odst.bus.system import connect_system, dialed_links, reload_servers, server_ids
from tests.conftest import free_port, wait_until
from tests.system.test_bandwidth import hold

NOBODY = public_key_of_seed(new_user_seed())


def users(*nkeys: str) -> str:
    return "authorization { users: [ " + ", ".join(json.dumps({"nkey": k}) for k in nkeys) + " ] }"


def links(broker: EmbeddedBroker, seed: str) -> list[int]:
    """The cids of the leaf links ``broker`` dialed."""
    async def ask() -> list[int]:
        nc = await connect_system(broker.url, seed)
        try:
            [server] = await server_ids(nc, broker.url, 5, single=True)
            return [link["id"] for link in await dialed_links(nc, server, 5)]
        finally:
            await nc.close()
    return asyncio.run(ask())


def test_a_remote_refused_until_now_is_dialed_at_once_and_a_linked_one_is_left_alone(tmp_path):
    system_seed, spoke_seed = new_user_seed(), new_user_seed()
    write_secret(tmp_path / "system.nk", system_seed + "\n")
    leaf_port = free_port()
    hub = EmbeddedBroker(BrokerConfig(site="hub", store_dir=tmp_path / "hub-js", jetstream=False,
                                      leaf_listen=f"127.0.0.1:{leaf_port}", authorization=users(NOBODY),
                                      system_nkey=public_key_of_seed(system_seed)), tmp_path / "hub")
    spoke = EmbeddedBroker(BrokerConfig(site="spoke", store_dir=tmp_path / "spoke-js", jetstream=False,
                                        leaf_remotes=[f"nats-leaf://127.0.0.1:{leaf_port}"], leaf_seed=spoke_seed,
                                        leaf_reconnect="60s", system_nkey=public_key_of_seed(system_seed)),
                           tmp_path / "spoke")
    hub.start()
    try:
        spoke.start()
        try:
            hub_log = tmp_path / "hub" / "nats.log"
            wait_until(lambda: hub_log.exists() and "Authentication Failure" in hub_log.read_text(), 20,
                       what="the hub refused the spoke's first dial")
            # the hub admits the spoke (the registration), surely in force once a reload is answered
            # (the system user may be refused while the SIGHUP's reload runs: asked again then)
            hub.reload(users(NOBODY, public_key_of_seed(spoke_seed)))
            wait_until(lambda: asyncio.run(reload_servers(hub.url, system_seed, single=True)), 20,
                       what="the hub's new users in force")
            assert not links(spoke, system_seed)  # its remote waits out its minute

            guard = HubGuard(spoke, tmp_path / "spoke", tmp_path / "system.nk")
            assert asyncio.run(guard.redial()) == {f"nats-leaf://127.0.0.1:{leaf_port}"}
            def one_link() -> list[int] | None:
                found = links(spoke, system_seed)
                return found if len(found) == 1 else None
            [cid] = wait_until(one_link, 20, what="the spoke's link came up on the redial")
            assert 'reconnect: "60s"' in (tmp_path / "spoke" / "nats.conf").read_text()
            assert '"disabled"' not in (tmp_path / "spoke" / "nats.conf").read_text()

            assert asyncio.run(guard.redial()) == frozenset()  # linked: not dialed again
            hold(lambda: links(spoke, system_seed) == [cid], 1.0, "the link stays as it was")
        finally:
            spoke.stop()
    finally:
        hub.stop()
