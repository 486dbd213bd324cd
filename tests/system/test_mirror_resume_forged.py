"""MirrorResume's door: look-alike consumer requests from a peer (odst.peering.mirrors).

A registered peer's leaf link may publish on ``$JS.*.API.CONSUMER.CREATE.EVENTS`` with a
``$JSC.R.`` reply (odst.bus.authorization.PEER_SUBJECTS: a mirror's request crosses it), and
the request's metadata, which MirrorResume reads to tell its own mirrors' requests, is the
sender's to write. A request naming an origin this site has no mirror of must not make the
site's connection work for it: each such watch polled the origin every 0.25 s for 20 s (80
requests a look-alike, 256 watched at once: ~1000 requests a second on the projector's loop
for a few hundred messages every 20 s) and then answered the sender's reply subject.
Real nats-server; the site's own connection and a second one in the peer's place.
"""

from __future__ import annotations

import asyncio
import json

import nats
from nats.js import api

from harness.wait import until
from odst.peering.mirrors import MirrorResume, mirror_name

HERE, REAL = "shere", "sreal"


def request(origin: str) -> bytes:
    """A mirror's CreateConsumerRequest (nats-server's setupMirrorConsumer) naming this site."""
    return json.dumps({"stream_name": "EVENTS", "config": {
        "name": "JS_MIRROR_x", "deliver_subject": "$JS.M.x", "ack_policy": "none",
        "metadata": {"_nats.mirror.stream": mirror_name(origin), "_nats.mirror.acc": "$G",
                     "_nats.mirror.domain": HERE}}}).encode()


def test_look_alike_requests_for_origins_not_mirrored_here_are_not_watched(nats_server):
    async def story() -> list[str]:
        site = await nats.connect(nats_server.url)
        peer = await nats.connect(nats_server.url)
        try:
            # this site mirrors REAL (a stream of that name is all MirrorResume can look for)
            await site.jetstream().add_stream(api.StreamConfig(name=mirror_name(REAL),
                                                               subjects=["not.used"]))
            asked: list[str] = []  # which origins the site's connection asked "is your log there?"

            async def count(msg):
                asked.append(msg.subject.split(".")[1])
            await peer.subscribe("$JS.*.API.STREAM.INFO.EVENTS", cb=count)
            await peer.flush()
            resume = await MirrorResume(site_id=HERE, nc=site).start()
            try:
                for i in range(40):
                    await peer.publish(f"$JS.sfake{i}.API.CONSUMER.CREATE.EVENTS", request(f"sfake{i}"),
                                       reply=f"$JSC.R.forged{i}")
                # last, a request for the origin mirrored here: watched, so its origin is asked
                # about; the look-alikes before it came first on the one subscription
                await peer.publish(f"$JS.{REAL}.API.CONSUMER.CREATE.EVENTS", request(REAL),
                                   reply="$JSC.R.real")
                await peer.flush()
                await until(lambda: REAL in asked, 10, "the real mirror's origin to be asked about")
                await peer.flush()
                return asked
            finally:
                await resume.stop()
        finally:
            await peer.close()
            await site.close()

    asked = asyncio.run(story())
    assert [o for o in asked if o != REAL] == [], f"look-alike origins watched: {sorted(set(asked))}"
