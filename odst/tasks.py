"""Background asyncio tasks: the one way a component stops the tasks it started."""

from __future__ import annotations

import asyncio


async def cancel(*tasks: asyncio.Task | None) -> None:
    """Cancel each task (None: not started) and wait until all have finished; what they raised
    is dropped."""
    started = [t for t in tasks if t is not None]
    for t in started:
        t.cancel()
    await asyncio.gather(*started, return_exceptions=True)
