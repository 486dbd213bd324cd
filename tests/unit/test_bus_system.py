"""The system account as rendered for the embedded broker and for a NATS server ODST does not
run, and the pure choice of which leaf links to close after a reload."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nacl.signing
import pytest

from odst.bus import authorization as authz
from odst.bus.embedded import BrokerConfig
from odst.bus.external import render_auth
from odst.bus.identity import new_user_seed, public_key_of_seed, raw_public_key, user_public_key
from odst.bus.system import SYSTEM_ACCOUNT, SYSTEM_PERMISSIONS, render_system_account, stale_links, user_keys
from odst.events.signing import SiteKey, site_id_for

SYSTEM = public_key_of_seed(new_user_seed())


def system_users(text: str) -> list[dict]:
    """The users of the system account in a rendered config (one JSON object each)."""
    m = re.search(r"accounts \{\n  (\w+): \{ users: \[ (.*) \] \}\n\}\nsystem_account: (\w+)\n", text)
    assert m, text
    assert m.group(1) == m.group(3) == SYSTEM_ACCOUNT
    return [json.loads(m.group(2))]


def test_the_system_user_may_reload_list_connections_and_kick_nothing_else():
    (user,) = system_users(render_system_account(SYSTEM))
    assert user == {"nkey": SYSTEM, "permissions": SYSTEM_PERMISSIONS}
    assert SYSTEM_PERMISSIONS == {
        "publish": {"allow": ["$SYS.REQ.SERVER.PING.IDZ", "$SYS.REQ.SERVER.*.RELOAD",
                              "$SYS.REQ.SERVER.*.CONNZ", "$SYS.REQ.SERVER.*.KICK",
                              "$SYS.REQ.SERVER.*.LEAFZ"]},
        "subscribe": {"allow": ["_INBOX.>"]}}


def test_the_embedded_broker_has_the_system_account_only_when_serving(tmp_path: Path):
    users = authz.users("sx", "UCLIENT", [], [], ["EVENTS"])
    serving = BrokerConfig(site="sx", store_dir=tmp_path, authorization=authz.render_users(users),
                           system_nkey=SYSTEM).render()
    (user,) = system_users(serving)
    assert user["nkey"] == SYSTEM and user["permissions"] == SYSTEM_PERMISSIONS
    # the site's users stay in the global account: the system block comes after them, apart
    assert serving.index("authorization {") < serving.index("accounts {")
    private = BrokerConfig(site="sx", store_dir=tmp_path, extra='authorization { users: [ { nkey: "U" } ] }').render()
    assert "accounts" not in private and "system_account" not in private


def test_external_auth_conf_has_the_same_system_account():
    users = authz.users("sx", "UCLIENT", [], [], ["EVENTS"])
    text = render_auth("sx", authz.render_users(users), SYSTEM)
    assert system_users(text) == system_users(render_system_account(SYSTEM))


def test_no_peer_may_reach_the_system_account():
    for legacy in (False, True):
        perms = authz.peer_permissions("speer", legacy)
        for subject in perms["publish"]["allow"] + perms["subscribe"]["allow"]:
            assert not subject.startswith("$SYS") and subject not in (">", "$*.>"), subject
    assert "$SYS.>" in authz.remote_deny_imports("sx")


def leaf(cid: int, key: str | None, kind: str = "Leafnode") -> dict:
    c = {"cid": cid, "kind": kind, "name": f"n{cid}"}
    if key is not None:
        c["authorized_user"] = key
    return c


def test_only_accepted_leaf_links_of_keys_no_user_has_are_stale():
    conns = [leaf(1, "UPEER"), leaf(2, "UGONE"), leaf(3, None),  # 3: a link this server dialed
             leaf(4, "UGONE", kind="Client"),  # a client: the reload itself checks it again
             leaf(5, "UGONE")]
    assert [c["cid"] for c in stale_links(conns, frozenset({"UPEER", "UCLIENT"}))] == [2, 5]
    assert stale_links(conns, frozenset({"UPEER", "UGONE"})) == []


def test_user_keys_are_every_rendered_users_nkey():
    peer = authz.Peer("UPEER", "speer")
    users = authz.users("sx", "UCLIENT", [peer], [authz.Subscriber("s1", "USUB")], ["EVENTS"],
                        applicants=[authz.Peer("UAPPL", "sappl")])
    assert user_keys(users) == {"UCLIENT", "UPEER", "USUB", "UAPPL"}


def test_raw_public_key_inverts_user_public_key():
    key = SiteKey(nacl.signing.SigningKey.generate())
    raw = key.public_key
    # a peer's leaf link authenticates with its site key: its NKey names the site
    assert raw_public_key(public_key_of_seed(key.nkey_seed())) == raw
    assert site_id_for(raw_public_key(user_public_key(raw))) == key.site_id
    nkey = user_public_key(raw)
    other_last = "B" if nkey[-1] == "A" else "A"  # one character changed: its checksum fails
    for bad in ("", "UNOTAKEY", nkey[:-1] + other_last, "S" + nkey[1:]):
        with pytest.raises(ValueError):
            raw_public_key(bad)
