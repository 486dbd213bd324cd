"""Which leaf remotes lead to a removed peer: the pure choices of odst.bus.hubs, and the
rendered remote nats-server reads ``disabled`` from."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

from odst.bus.embedded import BrokerConfig
from odst.bus.hubs import disabled_remotes, remember, remote_addresses, seen_hubs

A_URL, B_URL = "nats-leaf://127.0.0.1:7001", "nats-leaf://localhost:7002"


def remotes(text: str) -> list[dict]:
    return json.loads("[" + re.search(r"remotes: \[ (.*) \]", text).group(1) + "]")


def test_a_disabled_remote_is_rendered_disabled_and_the_others_not(tmp_path: Path):
    config = BrokerConfig(site="sx", store_dir=tmp_path, leaf_remotes=[A_URL, B_URL], leaf_seed="SUSEED",
                          disabled_remotes=frozenset({A_URL}))
    a, b = remotes(config.render())
    assert a["url"] == A_URL and a["disabled"] is True and a["nkey"] == "SUSEED"
    assert b["url"] == B_URL and "disabled" not in b


def test_links_are_matched_to_remotes_by_the_resolved_address():
    addresses = asyncio.run(remote_addresses([A_URL, B_URL, "nats-leaf://127.0.0.1"]))
    links = [{"id": 5, "name": "site-a", "ip": "127.0.0.1", "port": 7001},
             {"id": 6, "name": "site-b", "ip": "127.0.0.1", "port": 7002},
             {"id": 7, "name": "elsewhere", "ip": "127.0.0.2", "port": 7001}]
    assert seen_hubs(links, addresses) == {A_URL: "site-a", B_URL: "site-b"}
    assert addresses[("127.0.0.1", 7422)] == ["nats-leaf://127.0.0.1"]  # nats-server's default leaf port


def test_a_remote_of_a_removed_peer_keeps_it_whatever_name_its_hub_gives_later():
    hubs = remember({}, {A_URL: "site-a", B_URL: "site-b"}, frozenset())
    assert disabled_remotes(hubs, frozenset()) == frozenset()
    removed = frozenset({"site-a"})
    assert disabled_remotes(hubs, removed) == {A_URL}
    # the removed hub comes back calling itself another site: the remote still leads to site-a
    later = remember(hubs, {A_URL: "site-c", B_URL: "site-b2"}, removed)
    assert later == {A_URL: "site-a", B_URL: "site-b2"}
    assert disabled_remotes(later, removed) == {A_URL}
    # no longer removed: dialed again, and learnt anew
    assert disabled_remotes(later, frozenset()) == frozenset()
    assert remember(later, {A_URL: "site-c"}, frozenset())[A_URL] == "site-c"
