"""Group commit: appends that arrive while one is in flight go to the log together.

``GroupCommit`` is an ``Append`` (odst.projections.appender) for many concurrent writers,
such as uploads finishing side by side. While one append (publish, JetStream's ack after its
fsync, the fold) is in flight, the events that arrive queue up; when it is done they are
appended in one ``ConfirmedAppender.append_many``: one round trip to the broker, one wait
for the fold. The next group is published as soon as this one is handed to the broker's
connection (``EventLog.append_many``: chained onto it, sent behind it), while the broker still
stores and fsyncs this one and the projector folds it: rounds overlap, so neither this round's
acks nor its fold hold up the next publish (waiting for the fold: ~1.6 events per round trip at
8 uploads side by side; for the acks: each upload waited ~2 ms for the round before it to be
stored, the broker idle meanwhile). Each caller is still answered only once
ITS event is durable and folded, with its own ``Appended`` or its own ``AppendFailed`` (an event the
broker or the projector refuses fails alone; the others land). Envelopes, chain and
signatures are exactly those one-by-one appends would make (``EventLog.append_many``).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from itertools import groupby

from odst.events import catalogue as ev
from odst.events.log import AppendFailed, Appended
from odst.projections.appender import Append, AppendMany

MAX_BATCH = 64  # events in one append_many: bounds one round trip's size and one failure's reach


class GroupCommit:
    def __init__(self, append: Append, append_many: AppendMany, *, counts: Counter | None = None,
                 max_batch: int = MAX_BATCH, wait_s: float = 30.0):
        self._append, self._append_many = append, append_many
        self.wait_s = wait_s  # a caller's default wait for the fold (Settings.apply_wait_s)
        self.max_batch = max_batch
        self._pending: list[tuple[ev.Event, str, float, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._rounds: set[asyncio.Task] = set()  # rounds published and waiting for their fold
        self.counts = Counter() if counts is None else counts  # rounds made, events they carried (/metrics)

    async def __call__(self, event: ev.Event, *, actor: str, wait: float | None = None) -> Appended:
        """Append ``event`` (in the next group) and wait until the read model applied it.
        Raises AppendFailed as ``ConfirmedAppender.append`` would, for this event alone."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((event, actor, self.wait_s if wait is None else wait, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="group-commit")
        result = await future
        if isinstance(result, AppendFailed):
            raise result
        return result

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            # one actor per append_many (the envelope names it): consecutive runs of one actor
            for actor, run in groupby(batch, key=lambda item: item[1]):
                # the round goes on by itself; the next one starts once this one is published
                # (the log's order is the rounds' order) or over (failed before the broker answered)
                published = loop.create_future()

                def done(_=None, published=published) -> None:
                    if not published.done():
                        published.set_result(None)
                task = loop.create_task(self._commit(actor, list(run), done), name="group-commit-round")
                self._rounds.add(task)
                task.add_done_callback(self._rounds.discard)
                task.add_done_callback(done)
                await published

    async def _commit(self, actor: str, run: list[tuple[ev.Event, str, float, asyncio.Future]],
                      published) -> None:
        events = [item[0] for item in run]
        wait = max(item[2] for item in run)
        self.counts["rounds"] += 1
        self.counts["events"] += len(run)
        try:
            try:  # one event too: EventLog.append_many of one is exactly the one-by-one append
                results: list = await self._append_many(events, actor=actor, wait=wait, on_published=published)
            except AppendFailed:
                # refused as a whole (e.g. one event over the size cap): one by one, so
                # that each caller gets its own answer (the next round waits for these)
                results = []
                for event in events:
                    try:
                        results.append(await self._append(event, actor=actor, wait=wait))
                    except AppendFailed as exc:
                        results.append(exc)
        except BaseException as exc:  # anything else reaches every caller of the run, as it would have
            cancelled = isinstance(exc, asyncio.CancelledError)
            for *_, future in run:
                if not future.done():
                    future.cancel() if cancelled else future.set_exception(exc)
            if cancelled:
                raise
            return
        for (*_, future), result in zip(run, results):
            if not future.done():  # its caller may have gone (cancelled)
                future.set_result(result)
