"""A pull cancelled (a package deleted or withdrawn, a lease lost, shutdown) while its chunk
writes wait for the shared pull threads (odst.replicator.puller._Workers) must not write
anything once its temp file's descriptors are closed: the numbers are reused by the next
open() of this process, and a 1 MiB pwrite then lands in whatever file got them."""

from __future__ import annotations

import asyncio
import os
import random
import threading

from odst.replicator import puller as puller_module
from odst.replicator.puller import Puller, Want
from odst.store.hashing import manifest_of
from tests.sources import MemorySource

CHUNK = 4096


def test_a_cancelled_pulls_queued_writes_never_reach_a_reused_descriptor(tmp_path):
    pool = puller_module._threads()
    data = random.Random(3).randbytes(8 * CHUNK)
    want = Want.of(manifest_of([data], CHUNK), name="c.pkg", stage="prod", origin="sa", uploaded_ts=1,
                   uploaded_by="t")
    # one chunk per request (an older peer, the NATS transport): each write is awaited alone
    source = MemorySource("sa", data, CHUNK, runs=False)
    gate, busy = threading.Event(), threading.Barrier(pool.n + 1)

    def hold():  # every pull thread busy: the pull's writes queue up behind these
        busy.wait()
        gate.wait()

    async def story() -> list[bytes]:
        holders = [pool.run(hold) for _ in range(pool.n)]
        await asyncio.to_thread(busy.wait)
        p = Puller(want, [(source, 0.0)], tmp_path / "pull", streams=2)
        (tmp_path / "pull").mkdir()
        task = asyncio.create_task(p.run())
        for _ in range(2000):  # each of the two streams has a write waiting for a thread
            if pool._jobs.qsize() >= 2:
                break
            await asyncio.sleep(0.005)
        assert pool._jobs.qsize() >= 2
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its descriptors are closed now
        # the next files this process opens get those numbers
        victims = [tmp_path / f"victim{i}" for i in range(4)]
        fds = [os.open(v, os.O_RDWR | os.O_CREAT, 0o600) for v in victims]
        try:
            gate.set()
            await asyncio.gather(*holders)
            drained = threading.Barrier(pool.n)  # every thread at once: whatever was queued is done
            await asyncio.gather(*[pool.run(drained.wait) for _ in range(pool.n)])
        finally:
            for fd in fds:
                os.close(fd)
        return [v.read_bytes() for v in victims]

    try:
        contents = asyncio.run(story())
    finally:
        gate.set()
    assert all(c == b"" for c in contents), [len(c) for c in contents]
