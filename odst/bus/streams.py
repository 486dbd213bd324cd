"""JetStream streams and key-value buckets that ODST creates when they are missing."""

from __future__ import annotations

import nats.js.errors
from nats.js import api

from odst.bus import NO_SUITABLE_PEERS, until_ready

READY_S = 90.0  # how long a cluster may take to place a new stream (a node starting, a leader election)


async def find_stream(js, name: str) -> api.StreamInfo | None:
    """The stream's info, or None if the broker has no stream of that name."""
    try:
        return await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return None


def _placement_failed(exc: nats.js.errors.BadRequestError) -> bool:
    """A 400 that says the cluster cannot place the stream yet (a node down or still
    starting), not that another process made it first: ``until_ready`` retries it."""
    return exc.err_code == NO_SUITABLE_PEERS


async def ensure_stream(js, config: api.StreamConfig, timeout: float = READY_S) -> api.StreamInfo:
    """The stream named by ``config``, created with ``config`` if missing.

    An existing stream is returned as it is, whatever its configuration: comparing and
    restoring settings is the caller's business (see ``EventLog.ensure_stream``). Another
    process creating the same stream at the same moment is not an error, and a cluster
    that cannot place it yet is waited for, up to ``timeout`` seconds.
    """
    async def once():
        info = await find_stream(js, config.name)
        if info is not None:
            return info
        try:
            return await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if _placement_failed(exc):
                raise
            info = await find_stream(js, config.name)  # another process created it first
            if info is None:
                raise
            return info
    return await until_ready(once, timeout)


async def ensure_key_value(js, config: api.KeyValueConfig, timeout: float = READY_S):
    """The key-value bucket named by ``config``, created with ``config`` if missing
    (tolerant of a concurrent creator and of a cluster not ready yet, as ``ensure_stream``)."""
    async def once():
        try:
            return await js.key_value(config.bucket)
        except nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError as exc:
            if _placement_failed(exc):
                raise
            return await js.key_value(config.bucket)  # another process created it first
    return await until_ready(once, timeout)
