"""A site's mirrors resume within seconds of its broker's restart (odst.peering.mirrors.MirrorResume).

Two real nats-servers linked by a leaf node, as ``odst serve`` runs them (odst.bus.embedded):
the origin ``sorigin`` dials the mirroring site ``shere``. ``shere`` is stopped and started
again the way a site starts it: JetStream off, its connection listening for its mirrors'
consumer requests, then JetStream on. The mirror asks the origin 0.1-0.2 s after its restore,
before the origin's leaf link is back (it redials every second); nats-server alone would
wait 30 s on that request and then 10 s more (~40 s). The bound below is well under that.
"""

from __future__ import annotations

import asyncio
import time

import nats
from nats.js import api

from harness.ports import free_port
from harness.wait import until
from odst.bus.embedded import BrokerConfig, EmbeddedBroker, wait_for_jetstream
from odst.peering.mirrors import MirrorResume, mirror_name

HERE, ORIGIN = "shere", "sorigin"
RESUMED_WITHIN_S = 15  # nats-server's own schedule: ~40 s


async def mirror_messages(js) -> int:
    try:
        return (await js.stream_info(mirror_name(ORIGIN))).state.messages
    except Exception:
        return -1


async def start_here(broker: EmbeddedBroker) -> tuple:
    """As odst.bootstrap does: broker without JetStream, listen, then JetStream on."""
    nc = await nats.connect(broker.start(defer_jetstream=True))
    resume = await MirrorResume(site_id=HERE, nc=nc).start()
    broker.enable_jetstream()
    await wait_for_jetstream(nc)
    return nc, resume


def test_a_restarted_sites_mirror_resumes_in_seconds_not_on_natss_schedule(tmp_path):
    leaf = free_port()
    here = EmbeddedBroker(BrokerConfig(site=HERE, store_dir=tmp_path / "here" / "nats",
                                       leaf_listen=f"127.0.0.1:{leaf}"), tmp_path / "here" / "run")
    origin = EmbeddedBroker(BrokerConfig(site=ORIGIN, store_dir=tmp_path / "origin" / "nats",
                                         leaf_remotes=[f"nats-leaf://127.0.0.1:{leaf}"]),
                            tmp_path / "origin" / "run")

    async def story() -> float:
        nc_o = await nats.connect(origin.start())
        js_o = nc_o.jetstream()
        await js_o.add_stream(api.StreamConfig(name="EVENTS", subjects=[f"odst.{ORIGIN}.ev.>"]))
        for i in range(3):
            await js_o.publish(f"odst.{ORIGIN}.ev.x", f"before {i}".encode())

        nc, resume = await start_here(here)
        js = nc.jetstream()
        await until(lambda: _reachable(nc), 30, f"the leaf link from {ORIGIN}")  # the first time, a plain start
        await js.add_stream(api.StreamConfig(name=mirror_name(ORIGIN), mirror=api.StreamSource(
            name="EVENTS", external=api.ExternalStream(api=f"$JS.{ORIGIN}.API"))))
        await until(lambda: _has(js, 3), 30, f"{ORIGIN}'s first events in the mirror")

        await resume.stop()
        await nc.close()
        here.stop()
        for i in range(2):  # while the mirroring site is down
            await js_o.publish(f"odst.{ORIGIN}.ev.x", f"during {i}".encode())

        started = time.monotonic()
        nc, resume = await start_here(here)
        js = nc.jetstream()
        try:
            await until(lambda: _has(js, 5), RESUMED_WITHIN_S, "the mirror to resume after its site's restart")
            return time.monotonic() - started
        finally:
            await resume.stop()
            await nc.close()
            await nc_o.close()

    try:
        took = asyncio.run(story())
        print(f"\nmirror resumed {took:.2f} s after its site's broker started again")
    finally:
        here.stop()
        origin.stop()


async def _has(js, n: int) -> bool:
    return await mirror_messages(js) == n


async def _reachable(nc) -> bool:
    try:
        await nc.request(f"$JS.{ORIGIN}.API.STREAM.INFO.EVENTS", b"", timeout=1)
        return True
    except Exception:
        return False
