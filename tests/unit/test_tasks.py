"""tasks.cancel: a component's stop ends even when one of its tasks will not."""

from __future__ import annotations

import asyncio

from structlog.testing import capture_logs

from odst import tasks


def test_cancel_waits_for_tasks_that_end_and_drops_what_they_raised():
    async def main():
        async def fails():
            raise ValueError("dropped")
        ended = asyncio.create_task(fails(), name="fails")
        sleeper = asyncio.create_task(asyncio.sleep(60), name="sleeper")
        await asyncio.sleep(0)
        with capture_logs() as logs:
            await tasks.cancel(ended, None, sleeper)
        return ended, sleeper, logs
    ended, sleeper, logs = asyncio.run(main())
    assert ended.done() and isinstance(ended.exception(), ValueError)
    assert sleeper.cancelled()
    assert logs == []


def test_a_task_that_swallows_its_cancel_is_named_and_left_behind():
    async def stubborn(release: asyncio.Event):
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug this guards against: a cancel caught and ignored

    async def main():
        release = asyncio.Event()
        task = asyncio.create_task(stubborn(release), name="stubborn-worker")
        await asyncio.sleep(0)
        with capture_logs() as logs:
            await tasks.cancel(task, wait=0.05)
        still_running = not task.done()
        release.set()
        await task
        return still_running, logs
    still_running, logs = asyncio.run(main())
    assert still_running
    [entry] = logs
    assert entry["log_level"] == "warning" and entry["task"] == "stubborn-worker"
    assert any("stubborn" in frame for frame in entry["waiting_in"])
