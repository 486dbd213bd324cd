"""One way to wait: poll a condition until it holds or a deadline passes (no sleep-to-synchronise)."""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Callable


class TimedOut(AssertionError):
    """A condition did not hold before its deadline; the message names it and the last error seen."""

    def __init__(self, what: str, timeout: float, last_error: BaseException | None):
        self.what, self.timeout, self.last_error = what, timeout, last_error
        extra = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
        super().__init__(f"timed out after {timeout:.0f}s waiting for {what}{extra}")


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
               what: str = "condition", *, reraise: tuple[type[BaseException], ...] = ()) -> Any:
    """Poll ``predicate`` until it returns something truthy and return that; raise :class:`TimedOut`
    after ``timeout`` seconds. An exception from ``predicate`` (a process still starting, a refused
    connection) counts as "not yet", except those in ``reraise``, which end the wait at once.
    The predicate is always tried once more after the deadline before giving up."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last_error = None
        except reraise:
            raise
        except Exception as exc:
            last_error = exc
        if time.monotonic() > deadline:
            raise TimedOut(what, timeout, last_error)
        time.sleep(interval)


async def until(predicate: Callable[[], Any], timeout: float = 30.0,
                what: str | Callable[[], str] = "condition", interval: float = 0.02) -> Any:
    """``wait_until`` inside a running event loop: poll ``predicate`` (plain or async) without
    blocking the loop; raise :class:`TimedOut` after ``timeout`` seconds. ``what`` may be a
    callable, asked at the deadline (to say what is still missing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimedOut(what() if callable(what) else what, timeout, None)
        await asyncio.sleep(interval)
