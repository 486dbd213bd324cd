"""The puller against in-memory sources (the same ChunkSource contract the real transports pass,
see test_contracts.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import blake3
import pytest

from odst.replicator import puller as puller_module
from odst.replicator.puller import DIRECT_ALIGN, Puller, TransferFailed, Want
from odst.replicator.runclient import ChunkBuffer
from odst.store.hashing import manifest_of
from tests.sources import MemorySource

CHUNK = 1024


def want_for(data: bytes) -> Want:
    m = manifest_of([data], CHUNK)
    return Want.of(m, name="x.pkg", stage="prod", origin="sa", uploaded_ts=1, uploaded_by="t")


@pytest.fixture
def data():
    return random.Random(7).randbytes(20 * CHUNK + 17)


def pull(tmp_path, data, sources, **kw):
    bad = []
    p = Puller(want_for(data), [(s, 0.0) for s in sources], tmp_path, streams=4,
               on_bad_source=lambda site, reason, index: bad.append(site), **kw)
    return asyncio.run(p.run()), bad


def test_pulls_from_several_sources_and_verifies(tmp_path, data):
    a, b = MemorySource("sa", data, CHUNK), MemorySource("sb", data, CHUNK)
    path, bad = pull(tmp_path, data, [a, b])
    assert path.read_bytes() == data and not bad
    assert sorted(a.fetched + b.fetched) == list(range(21))  # each chunk fetched once


def test_a_corrupt_chunk_is_dropped_refetched_elsewhere_and_reported(tmp_path, data):
    evil = MemorySource("sevil", data, CHUNK, corrupt=range(21))
    good = MemorySource("sgood", data, CHUNK)
    path, bad = pull(tmp_path, data, [evil, good])
    assert path.read_bytes() == data
    assert bad and set(bad) == {"sevil"}
    assert hashlib.sha1(path.read_bytes()).hexdigest() == want_for(data).sha1


def test_unreachable_and_missing_sources_are_routed_around(tmp_path, data):
    down = MemorySource("sdown", data, CHUNK, fail=range(21))
    empty = MemorySource("sempty", data, CHUNK, missing=True)
    good = MemorySource("sgood", data, CHUNK)
    path, bad = pull(tmp_path, data, [down, empty, good])
    assert path.read_bytes() == data and not bad


def test_gives_up_when_no_source_has_good_bytes_and_leaves_no_file(tmp_path, data):
    evil = MemorySource("sevil", data, CHUNK, corrupt={3})
    with pytest.raises(TransferFailed, match="chunk 3"):
        pull(tmp_path, data, [evil])
    assert not (tmp_path / "x.pkg").exists()


def test_resume_fetches_only_missing_chunks(tmp_path, data):
    w = want_for(data)
    partial = bytearray(len(data))
    for i in range(0, 21, 2):  # even chunks were verified and written before a crash
        partial[i * CHUNK:(i + 1) * CHUNK] = data[i * CHUNK:(i + 1) * CHUNK]
    partial[CHUNK + 5] = 0x42  # a torn write in chunk 1
    (tmp_path / f"{w.blake3}.repl").write_bytes(bytes(partial))
    src = MemorySource("sa", data, CHUNK)
    path, _ = pull(tmp_path, data, [src])
    assert path.read_bytes() == data
    assert sorted(src.fetched) == list(range(1, 21, 2))


def test_empty_package(tmp_path):
    path, _ = pull(tmp_path, b"", [MemorySource("sa", b"", CHUNK)])
    assert path.read_bytes() == b""
    assert blake3.blake3(b"").hexdigest() == want_for(b"").blake3


# ------------------------------------------------------------------ runs of chunks per request

def test_chunks_come_in_runs_from_a_source_that_serves_them(tmp_path, data):
    src = MemorySource("sa", data, CHUNK)
    path, bad = pull(tmp_path, data, [src])
    assert path.read_bytes() == data and not bad
    assert sorted(src.fetched) == list(range(21))
    assert len(src.run_requests) < 21 and max(n for _, n in src.run_requests) > 1


def test_a_corrupt_chunk_inside_a_run_is_refetched_and_the_rest_of_the_run_kept(tmp_path, data):
    evil = MemorySource("sevil", data, CHUNK, corrupt={5})
    good = MemorySource("sgood", data, CHUNK)
    bad = []
    p = Puller(want_for(data), [(evil, 0.0), (good, 50.0)], tmp_path, streams=1,  # evil is asked first
               on_bad_source=lambda site, reason, index: bad.append((site, index)))
    path = asyncio.run(p.run())
    assert path.read_bytes() == data
    assert bad == [("sevil", 5)]
    assert 6 in evil.fetched and 5 in good.fetched  # the run went on past the bad chunk
    assert sorted(evil.fetched + good.fetched).count(6) == 1  # ... and kept what came after it


def test_a_run_cut_short_keeps_what_came_and_asks_for_the_rest(tmp_path, data):
    src = MemorySource("sa", data, CHUNK, cut_after=3, cuts=2)
    path, bad = pull(tmp_path, data, [src])
    assert path.read_bytes() == data and not bad
    assert sorted(src.fetched) == list(range(21))  # nothing fetched twice


def test_a_source_that_serves_no_runs_is_asked_one_chunk_at_a_time(tmp_path, data):
    old = MemorySource("sold", data, CHUNK, runs=False)
    path, bad = pull(tmp_path, data, [old])
    assert path.read_bytes() == data and not bad
    assert sorted(old.fetched) == list(range(21))
    assert sum(1 for _, n in old.run_requests if n > 1) == 1  # refused once, then never asked again


def test_a_limited_link_is_paced_chunk_by_chunk(tmp_path, data):
    src = MemorySource("sa", data, CHUNK)
    paid: list[int] = []

    async def throttle(peer: str, n: int) -> None:
        paid.append(n)
        await asyncio.sleep(0.01)  # every payment waits: the link is at its limit
    path, _ = pull(tmp_path, data, [src], throttle=throttle)
    assert path.read_bytes() == data
    assert len(paid) == 21 and sum(paid) == len(data)
    assert all(n == 1 for _, n in src.run_requests)  # never more than what was paid for


# ------------------------------------------------------------------ how chunks reach the disk

class BufferSource(MemorySource):
    """Hands each chunk over as the run client does: whole, in a page-aligned ``ChunkBuffer``."""

    async def fetch_run(self, blake3_hex: str, first: int, lengths: list[int]):
        async for pieces in super().fetch_run(blake3_hex, first, lengths):
            chunk = b"".join(pieces)
            buf = ChunkBuffer(len(chunk))
            buf[:] = chunk
            yield [buf]


def test_whole_chunks_in_run_client_buffers_go_direct_and_a_corrupt_one_is_still_refetched(tmp_path):
    size = DIRECT_ALIGN  # chunks the size O_DIRECT takes; the last one short (written buffered)
    data = random.Random(9).randbytes(12 * size + 100)
    want = Want.of(manifest_of([data], size), name="d.pkg", stage="prod", origin="sa", uploaded_ts=1,
                   uploaded_by="t")
    evil, good = BufferSource("sevil", data, size, corrupt={5}), BufferSource("sgood", data, size)
    bad = []
    p = Puller(want, [(evil, 0.0), (good, 50.0)], tmp_path, streams=1,
               on_bad_source=lambda site, reason, index: bad.append((site, index)))
    path = asyncio.run(p.run())
    assert path.read_bytes() == data  # read back through the page cache: the direct writes are there
    assert bad == [("sevil", 5)] and 5 in good.fetched
    assert p.direct_chunks == set(range(12))  # every whole chunk, chunk 5 from the good source


def test_where_o_direct_is_refused_every_chunk_is_written_buffered(tmp_path, monkeypatch):
    monkeypatch.setattr(puller_module, "open_direct", lambda path: -1)  # as on a file system without it
    size = DIRECT_ALIGN
    data = random.Random(10).randbytes(6 * size)
    want = Want.of(manifest_of([data], size), name="b.pkg", stage="prod", origin="sa", uploaded_ts=1,
                   uploaded_by="t")
    p = Puller(want, [(BufferSource("sa", data, size), 0.0)], tmp_path, streams=2)
    assert asyncio.run(p.run()).read_bytes() == data
    assert p.direct_chunks == set()


def test_the_pull_threads_hand_back_each_result_or_error_to_its_own_awaiter():
    workers = puller_module._Workers(2, "test-pull")

    def boom(n):
        raise OSError(28, f"no space left ({n})")

    async def go():
        futs = [workers.run(pow, 2, i) for i in range(20)] + [workers.run(boom, 7)]
        results = await asyncio.gather(*futs, return_exceptions=True)
        cancelled = workers.run(pow, 3, 3)
        cancelled.cancel()  # its outcome comes back to nobody; the threads go on
        return results, await workers.run(pow, 3, 2)
    results, after = asyncio.run(go())
    assert results[:20] == [2 ** i for i in range(20)]
    assert isinstance(results[20], OSError) and "(7)" in str(results[20])
    assert after == 9 and len(workers._threads) == 2


class AllocatedAtFirstFetch(MemorySource):
    """Notes how many bytes of the temp file are allocated when the first chunk is asked for."""

    def __init__(self, path, *args, **kw):
        super().__init__(*args, **kw)
        self.path, self.allocated = path, None

    async def fetch(self, blake3_hex: str, index: int) -> bytes:
        if self.allocated is None:
            self.allocated = self.path.stat().st_blocks * 512
        return await super().fetch(blake3_hex, index)


def test_the_temp_file_is_allocated_whole_before_any_chunk_is_written(tmp_path, data):
    """Threads writing chunks at their offsets into a sparse file contend for its allocation (ext4,
    O_DIRECT: two or four writers slower than one); its blocks are allocated before the first
    fetch. Where the file system cannot (``preallocate`` does nothing), this test is skipped."""
    probe = tmp_path / "probe"
    with open(probe, "wb") as f:
        puller_module.preallocate(f.fileno(), 1 << 16)
    if probe.stat().st_blocks * 512 < 1 << 16:
        pytest.skip("this file system allocates no blocks ahead (fallocate unsupported)")
    src = AllocatedAtFirstFetch(tmp_path / f"{want_for(data).blake3}.repl", "sa", data, CHUNK)
    path, _ = pull(tmp_path, data, [src])
    assert path.read_bytes() == data
    assert src.allocated >= len(data)
