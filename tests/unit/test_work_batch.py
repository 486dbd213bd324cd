"""A replicator worker's take of work items (``_up_to_a_batch``): at most WORK_BATCH pulls."""

from __future__ import annotations

import asyncio
import json

from odst.replicator.replicator import WORK_BATCH, _up_to_a_batch


class Item:
    """A work item as a fetch gives it: its JSON, and whether it was handed back."""

    def __init__(self, pulls: int):
        self.data = json.dumps({"pulls": [[f"p{i}.pkg", f"{i:064x}"] for i in range(pulls)]}).encode()
        self.naked = False

    async def nak(self) -> None:
        self.naked = True


def test_a_worker_takes_at_most_a_batch_and_hands_back_the_rest():
    """A catch-up queues its changes as batches of WORK_BATCH and a remainder; a worker whose
    first item was a remainder took every batch fetched with it (~1,000 pulls seen), and the
    other lanes had nothing. Now it keeps items up to WORK_BATCH pulls and hands the rest back."""
    items = [Item(5), Item(1), Item(WORK_BATCH), Item(1), Item(WORK_BATCH)]
    kept = asyncio.run(_up_to_a_batch(items))
    assert kept == items[:2]
    assert [i.naked for i in items] == [False, False, True, True, True]


def test_single_items_are_taken_together_up_to_a_batch():
    items = [Item(1) for _ in range(WORK_BATCH + 3)]
    kept = asyncio.run(_up_to_a_batch(items))
    assert kept == items[:WORK_BATCH] and all(i.naked for i in items[WORK_BATCH:])
    assert asyncio.run(_up_to_a_batch([big := Item(WORK_BATCH + 5)])) == [big]  # a first item is always taken
