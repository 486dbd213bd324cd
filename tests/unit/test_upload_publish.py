"""Store.publishing_upload and ThreadGroupSync: an upload's publish in one hand-off, on a real
file system (no process)."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest

from odst.store import files
from odst.store.files import Store, StreamingUpload, ThreadGroupSync


def written(store: Store, data: bytes):
    async def run():
        up = StreamingUpload(store.new_temp())
        await up.feed(data)
        await up.finish(fsync=False)  # publishing_upload fsyncs it once linked
        return up.path
    return asyncio.run(run())


def test_an_upload_is_marked_while_its_event_goes_out_and_nothing_is_left_after(tmp_path):
    store = Store(tmp_path)
    store.ensure()
    temp = written(store, b"payload")

    async def run():
        async with store.publishing_upload(temp, "A.pkg") as dest:
            seen = (dest, store.is_publishing("a.pkg"), dest.read_bytes(), temp.exists())
        return seen
    dest, marked, content, temp_left = asyncio.run(run())
    assert (dest, marked, content, temp_left) == (store.path("A.pkg"), True, b"payload", False)
    assert not store.is_publishing("A.pkg")
    assert list(store.tmp.iterdir()) == []
    assert oct(dest.stat().st_mode & 0o777) == oct(files.PACKAGE_MODE)


def test_a_name_already_published_is_refused_and_left_alone(tmp_path):
    store = Store(tmp_path)
    store.ensure()
    first = written(store, b"first")
    second = written(store, b"second")

    async def run():
        async with store.publishing_upload(first, "b.pkg"):
            pass
        with pytest.raises(FileExistsError):
            async with store.publishing_upload(second, "B.PKG"):
                raise AssertionError("the block must not run")
    asyncio.run(run())
    assert store.path("b.pkg").read_bytes() == b"first"
    assert not store.is_publishing("b.pkg")
    assert list(store.tmp.iterdir()) == [second]  # the caller's to drop


def test_the_sweep_takes_a_killed_publishers_marker(tmp_path):
    store = Store(tmp_path)
    store.ensure()
    store._marker("c.pkg").touch()  # noqa: SLF001 - what a publisher killed mid-publish leaves
    assert store.is_publishing("c.pkg")
    store.sweep(set())
    assert not store.is_publishing("c.pkg") and list(store.tmp.iterdir()) == []


def test_each_thread_returns_only_after_an_fsync_that_started_after_it_asked(tmp_path, monkeypatch):
    clock = itertools.count()
    tick = threading.Lock()
    rounds: list[tuple[int, int]] = []
    real = files._fsync_dir  # noqa: SLF001

    def now() -> int:
        with tick:
            return next(clock)

    def counted(path):
        start = now()
        real(path)
        rounds.append((start, now()))
    monkeypatch.setattr(files, "_fsync_dir", counted)
    group = ThreadGroupSync(tmp_path)
    calls: list[tuple[int, int]] = []

    def caller():
        asked = now()
        group.sync()
        calls.append((asked, now()))
    threads = [threading.Thread(target=caller) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 16 and 1 <= len(rounds) <= 16
    for asked, returned in calls:
        assert any(asked < start and end < returned for start, end in rounds), (asked, returned, rounds)


def test_a_failed_fsync_reaches_its_caller_and_the_next_round_is_fresh(tmp_path, monkeypatch):
    failures = [OSError(5, "Input/output error")]
    real = files._fsync_dir  # noqa: SLF001

    def flaky(path):
        if failures:
            raise failures.pop()
        real(path)
    monkeypatch.setattr(files, "_fsync_dir", flaky)
    group = ThreadGroupSync(tmp_path)
    with pytest.raises(OSError, match="Input/output"):
        group.sync()
    group.sync()  # the next round succeeds
