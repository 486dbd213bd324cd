"""A pull's lease (``Replicator._take_lease``) on a real nats-server's KV bucket."""

from __future__ import annotations

import asyncio
import types

import nats
from nats.js import api

from odst.replicator.replicator import LEASE_BUCKET, Replicator

CONTENT = "ab" * 32


def test_a_lease_that_expires_while_create_looks_it_up_is_taken(nats_server):
    """A replicator killed mid-pull leaves its lease until the bucket's TTL. The other one's
    create collides with it (wrong last sequence), and nats-py's create then looks the lease
    up to see whether it was deleted; expired in between, the lookup finds nothing and create
    raised KeyNotFoundError. The worker's batch failed and was acked: the package waited for
    the next full pass (CI: test_roles_share_one_site timed out). Now the content, free, is
    leased at once. The expiry is made to fall exactly there: the lookup waits until the
    lease's message has aged out (a bucket with a 1 s TTL; the stream takes no deletes)."""
    async def run():
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            kv = await js.create_key_value(api.KeyValueConfig(bucket=LEASE_BUCKET, ttl=1, history=1,
                                                              storage=api.StorageType.MEMORY))
            await kv.create(CONTENT, b"killed:1")
            real_get = kv._get

            async def expiring_get(key, *args, **kwargs):
                kv._get = real_get  # once: create's look-up
                deadline = asyncio.get_running_loop().time() + 20
                while asyncio.get_running_loop().time() < deadline:  # until its TTL has run out
                    try:
                        await js.get_last_msg(f"KV_{LEASE_BUCKET}", f"$KV.{LEASE_BUCKET}.{key}")
                    except nats.js.errors.NotFoundError:
                        break
                    await asyncio.sleep(0.05)
                return await real_get(key, *args, **kwargs)

            kv._get = expiring_get
            worker = types.SimpleNamespace(_leased_here=set(), _leases=kv, owner="alive:2")
            revision = await Replicator._take_lease(worker, CONTENT)
            entry = await kv.get(CONTENT)
            return revision, entry.revision, entry.value, worker._leased_here
        finally:
            await nc.close()

    revision, stored_revision, owner, marked = asyncio.run(run())
    assert owner == b"alive:2" and revision == stored_revision
    assert marked == {CONTENT}  # this process's mark, removed by the pull that ends
