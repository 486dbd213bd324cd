"""Mirror deliveries are labelled with the path their origin's log takes (odst.bus.users.path_to),
and a peer may deliver only what names it (odst.bus.authorization.peer_permissions)."""

import json


from odst.bus import authorization as authz
from odst.bus.users import legacy_mirrors, path_to
from odst.projections.views import PeerSite


def peer(site: str, *vouched_by: str, here: bool = True) -> PeerSite:
    return PeerSite(site=site, public_key="00", name=site, http_url="", registered_here=here,
                    vouched_by=list(vouched_by), accepted_stages=None)


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: '*' one token, '>' the rest (one or more)."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def may_publish(site: str, subject: str, legacy: bool = False) -> bool:
    return any(matches(p, subject) for p in authz.peer_permissions(site, legacy)["publish"]["allow"])


def delivery(path: list[str]) -> str:
    return authz.mirror_deliver_prefix(path) + ".M.Xy12ab9Q"


def test_a_site_registered_here_comes_straight():
    assert path_to([peer("c"), peer("p", "c")], "c") == ["c"]


def test_a_site_known_through_a_peer_comes_through_it_transitively():
    # a registered b; b registered c; c registered d: a knows c and d only through b
    peers = [peer("b"), peer("c", "b", here=False), peer("d", "c", here=False)]
    assert path_to(peers, "c") == ["b", "c"]
    assert path_to(peers, "d") == ["b", "c", "d"]


def test_an_unknown_origin_is_labelled_with_itself():
    assert path_to([peer("b")], "z") == ["z"]


def test_only_the_sites_on_the_path_may_deliver():
    hub_of_c = delivery(["c"])  # a hub's mirror of its spoke c
    assert may_publish("c", hub_of_c)
    assert not may_publish("p", hub_of_c)  # another spoke
    chain = delivery(["b", "c", "d"])  # a's mirror of d, which comes d -> c -> b -> a
    assert all(may_publish(s, chain) for s in "bcd")
    assert not may_publish("p", chain)
    legacy = "$JS.M.Xy12ab9Q"  # nats-server's own subject, mirrors made before
    assert not may_publish("p", legacy) and may_publish("p", legacy, legacy=True)
    assert matches(authz.DELIVERIES, hub_of_c) and matches(authz.DELIVERIES, legacy)


def test_legacy_mirrors_are_found_in_the_store_on_disk(tmp_path):
    for name, external in (("PEER_old", {"api": "$JS.old.API"}), ("PEER_new", {"api": "$JS.new.API", "deliver": "$JS.M.new"}),
                           ("EVENTS", None)):
        d = tmp_path / "$G" / "streams" / name
        d.mkdir(parents=True)
        d.joinpath("meta.inf").write_text(json.dumps({"name": name, **({"mirror": {"name": "EVENTS", "external": external}}
                                                                         if external else {})}))
    assert legacy_mirrors(tmp_path) == ["PEER_old"]
    assert legacy_mirrors(tmp_path / "absent") == []


def test_of_two_vouchers_the_first_one_labels_the_path():
    # b vouched for c first, p later (newest first in vouched_by): p cannot divert c's path
    peers = [peer("b"), peer("p"), peer("c", "p", "b", here=False)]
    assert path_to(peers, "c") == ["b", "c"]
