"""Background asyncio tasks: the one way a component stops the tasks it started."""

from __future__ import annotations

import asyncio

import structlog

log = structlog.get_logger("odst.tasks")

STOP_WAIT_S = 10.0  # a task that has not ended this long after its cancel is left behind, and named


async def cancel(*tasks: asyncio.Task | None, wait: float = STOP_WAIT_S) -> None:
    """Cancel each task (None: not started) and wait until all have finished; what they raised
    is dropped. A task still running ``wait`` seconds later (one that caught its cancel, or awaits
    a broker that is gone) is logged with where it waits, and left: a stop must end."""
    started = [t for t in tasks if t is not None]
    for t in started:
        t.cancel()
    if not started:
        return
    _, pending = await asyncio.wait(started, timeout=wait)
    for t in pending:
        frames = [f"{f.f_code.co_filename.rsplit('/', 1)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                  for f in t.get_stack(limit=8)]
        log.warning("a task did not stop when cancelled; left behind", task=t.get_name(), waiting_in=frames)
    for t in started:
        if t.done() and not t.cancelled():
            t.exception()  # retrieved: what it raised is dropped, not reported as never retrieved
