"""JetStream streams and key-value buckets that ODST creates when they are missing."""

from __future__ import annotations

import nats.js.errors
from nats.js import api


async def find_stream(js, name: str) -> api.StreamInfo | None:
    """The stream's info, or None if the broker has no stream of that name."""
    try:
        return await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        return None


async def ensure_stream(js, config: api.StreamConfig) -> api.StreamInfo:
    """The stream named by ``config``, created with ``config`` if missing.

    An existing stream is returned as it is, whatever its configuration: comparing and
    restoring settings is the caller's business (see ``EventLog.ensure_stream``). Another
    process creating the same stream at the same moment is not an error.
    """
    info = await find_stream(js, config.name)
    if info is not None:
        return info
    try:
        return await js.add_stream(config)
    except nats.js.errors.BadRequestError:  # another process created it first
        info = await find_stream(js, config.name)
        if info is None:
            raise
        return info


async def ensure_key_value(js, config: api.KeyValueConfig):
    """The key-value bucket named by ``config``, created with ``config`` if missing
    (tolerant of a concurrent creator, as ``ensure_stream``)."""
    try:
        return await js.key_value(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError:  # another process created it first
        return await js.key_value(config.bucket)
