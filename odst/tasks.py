"""Background asyncio tasks: the one way a component stops the task it started."""

from __future__ import annotations

import asyncio


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel ``task`` (if any) and wait until it has finished; what it raised is dropped."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
