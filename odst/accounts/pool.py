"""Bounded worker pools for the slow parts of sign-in (argon2, LDAP).

They never share the event loop's default executor: Litestar runs sync handlers
and guards there, so a flood of sign-ins queued in it would stall every API
request. Past ``max_waiting`` callers a pool answers 503 at once instead of
queueing without end.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from odst.errors import OdstError

T = TypeVar("T")


class SigninBusy(OdstError):
    status, code = 503, "busy"
    retry_after = 2


class BoundedPool:
    def __init__(self, name: str, workers: int, max_waiting: int):
        self.name = name
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self.max_waiting = max_waiting
        self.waiting = 0

    async def run(self, fn: Callable[..., T], *args) -> T:
        if self.waiting >= self.max_waiting:
            raise SigninBusy(f"too many sign-ins at once ({self.name}); try again in a few seconds")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.waiting -= 1
