"""Which consumer requests a site answers for its own mirrors (odst.peering.mirrors.MirrorResume),
and the broker config that lets it listen before JetStream restores them."""

from __future__ import annotations

import json
from pathlib import Path

from odst.bus.embedded import BrokerConfig
from odst.peering.mirrors import mirror_request, unreachable_answer

SITE, ORIGIN = "shub", "sspoke"


def request(domain: str = SITE, stream: str = f"PEER_{ORIGIN}") -> bytes:
    """nats-server's CreateConsumerRequest for a mirror (setupMirrorConsumer), as it sends it."""
    return json.dumps({"stream_name": "EVENTS", "config": {
        "name": "JS_MIRROR_abc", "deliver_subject": "$JS.M.xyz", "ack_policy": "none",
        "metadata": {"_nats.mirror.stream": stream, "_nats.mirror.acc": "$G",
                     "_nats.mirror.domain": domain}}}).encode()


def test_this_sites_mirror_request_names_its_origin():
    assert mirror_request(SITE, f"$JS.{ORIGIN}.API.CONSUMER.CREATE.EVENTS", "$JSC.R.q1", request()) == ORIGIN


def test_a_peers_mirror_request_seen_through_the_leaf_tree_is_not_ours():
    subject = f"$JS.{ORIGIN}.API.CONSUMER.CREATE.EVENTS"
    assert mirror_request(SITE, subject, "$JSC.R.q1", request(domain="sother")) is None
    assert mirror_request(SITE, subject, "$JSC.R.q1", request(stream="PEER_sother")) is None


def test_a_request_that_is_not_a_mirrors_is_left_alone():
    subject = f"$JS.{ORIGIN}.API.CONSUMER.CREATE.EVENTS"
    assert mirror_request(SITE, subject, "_INBOX.x.y", request()) is None  # a client's, not a server's
    assert mirror_request(SITE, subject, None, request()) is None
    assert mirror_request(SITE, subject, "$JSC.R.q1", b"not json") is None
    assert mirror_request(SITE, subject, "$JSC.R.q1", b'{"config": {}}') is None


def test_the_unreachable_answer_is_an_error_that_does_not_change_the_request():
    answer = json.loads(unreachable_answer(ORIGIN, SITE))
    assert answer["type"] == "io.nats.jetstream.api.v1.consumer_create_response"
    # 10025 (bad JSON) and 10185 (API level) make nats-server resend without sourcing
    assert answer["error"]["err_code"] not in (10025, 10185)
    assert ORIGIN in answer["error"]["description"] and SITE in answer["error"]["description"]


def test_jetstream_can_start_off_and_keeps_its_domain():
    on = BrokerConfig(site=SITE, store_dir=Path("/x")).render()
    off = BrokerConfig(site=SITE, store_dir=Path("/x"), jetstream=False).render()
    assert "enabled: false" in off and "enabled" not in on
    # the domain is in the config from the start: leaf links deny JetStream across domains
    assert f'domain: "{SITE}"' in off


class _Answer:
    def __init__(self, subject: str):
        self.subject = subject


def test_a_flood_of_answers_from_a_peer_keeps_what_is_remembered_bounded():
    # A registered peer may publish on "$JSC.R.>" (authorization.PEER_SUBJECTS), and every such
    # message reaches MirrorResume._on_answer. Remembered without a bound, and pruned by a scan
    # of all of them on every message once over 1000, a flood of distinct subjects grew the
    # table for 40 s and made each message cost a pass over all of it (the projector's loop).
    import asyncio

    from odst.peering.mirrors import MAX_ANSWERED, MirrorResume

    resume = MirrorResume(site_id=SITE, nc=None)

    async def flood():
        for i in range(5 * MAX_ANSWERED):
            await resume._on_answer(_Answer(f"$JSC.R.flood{i}"))
        await resume._on_answer(_Answer("$JSC.R.mine"))

    asyncio.run(flood())
    assert len(resume._answered) <= MAX_ANSWERED
    assert "$JSC.R.mine" in resume._answered  # the newest answer is the one kept
