"""Store.publishing_upload and ThreadGroupSync: an upload's publish in one hand-off, on a real
file system (no process)."""

from __future__ import annotations

import asyncio
import itertools
import os
import stat
import threading
import time

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
    real = files._fsync_open_dir  # noqa: SLF001

    def now() -> int:
        with tick:
            return next(clock)

    def counted(fd):
        start = now()
        real(fd)
        rounds.append((start, now()))
    monkeypatch.setattr(files, "_fsync_open_dir", counted)
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
    real = files._fsync_open_dir  # noqa: SLF001

    def flaky(fd):
        if failures:
            raise failures.pop()
        real(fd)
    monkeypatch.setattr(files, "_fsync_open_dir", flaky)
    group = ThreadGroupSync(tmp_path)
    with pytest.raises(OSError, match="Input/output"):
        group.sync()
    group.sync()  # the next round succeeds


# --- a small upload written and published in one pool job (StreamingUpload.finish_publishing) ---

class CountingPool:
    """The store's pool, counting the jobs handed to it."""

    def __init__(self, pool):
        self.pool, self.jobs = pool, 0

    def submit(self, fn, *args, **kw):
        self.jobs += 1
        return self.pool.submit(fn, *args, **kw)


def finish_publishing(store: Store, name: str, data: bytes, **kw):
    async def run():
        up = StreamingUpload(store.new_temp(), **kw)
        await up.feed(data)
        return up.path, *(await up.finish_publishing(store, name))
    return asyncio.run(run())


def test_a_small_upload_is_written_linked_and_fsynced_in_one_job_in_order(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.ensure()
    pool = CountingPool(files._STORE_POOL)  # noqa: SLF001
    monkeypatch.setattr(files, "_STORE_POOL", pool)
    order: list[str] = []
    real_fsync, real_dir = files.os.fsync, files._fsync_open_dir  # noqa: SLF001
    dest = store.path("Small.pkg")

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):  # _fsync_open_dir's own, recorded there
            return real_fsync(fd)
        order.append("file fsync, linked" if dest.exists() and store.is_publishing("small.pkg") else "file fsync")
        real_fsync(fd)

    def fsync_dir(fd):
        assert os.path.samestat(os.fstat(fd), os.stat(store.packages))
        order.append("dir fsync packages")
        real_dir(fd)
    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files, "_fsync_open_dir", fsync_dir)
    temp, manifest, inode = finish_publishing(store, "Small.pkg", b"small body")
    assert pool.jobs == 1
    assert order == ["file fsync, linked", "dir fsync packages"]  # marker, link, file, then directory
    assert inode == dest.stat().st_ino and dest.read_bytes() == b"small body" and not temp.exists()
    assert files.content_tag(os.open(dest, os.O_RDONLY)) == manifest.blake3
    assert oct(dest.stat().st_mode & 0o777) == oct(files.PACKAGE_MODE)
    assert store.is_publishing("small.pkg")  # held until the event is out

    async def after():
        async with store.published_upload("Small.pkg") as path:
            assert path == dest
    asyncio.run(after())
    assert not store.is_publishing("small.pkg") and list(store.tmp.iterdir()) == []


def test_a_taken_name_or_a_large_body_goes_the_long_way_untouched(tmp_path):
    store = Store(tmp_path)
    store.ensure()
    store.path("taken.pkg").write_bytes(b"theirs")
    temp, manifest, inode = finish_publishing(store, "TAKEN.pkg", b"mine")
    assert inode is None and temp.read_bytes() == b"mine" and store.path("taken.pkg").read_bytes() == b"theirs"
    assert not store.is_publishing("taken.pkg")  # the marker it made is gone again
    temp.unlink()
    store._marker("busy.pkg").touch()  # noqa: SLF001 - another process is publishing this name
    temp, _, inode = finish_publishing(store, "busy.pkg", b"mine")
    assert inode is None and temp.exists() and not store.path("busy.pkg").exists()
    assert store.is_publishing("busy.pkg")  # theirs, left alone
    temp.unlink()
    temp, manifest, inode = finish_publishing(store, "large.pkg", b"x" * 300_000, small_bytes=1024)
    assert inode is None and temp.stat().st_size == 300_000 and not store.path("large.pkg").exists()
    assert manifest.size == 300_000


def test_an_upload_refused_once_decided_takes_back_only_its_own_file(tmp_path):
    store = Store(tmp_path)
    store.ensure()
    _, _, inode = finish_publishing(store, "r.pkg", b"refused")
    store.unpublish("r.pkg", inode)
    assert not store.path("r.pkg").exists() and not store.is_publishing("r.pkg")
    _, _, inode = finish_publishing(store, "s.pkg", b"mine")
    other = store.tmp / "pulled.part"
    other.write_bytes(b"pulled meanwhile")
    os.replace(other, store.path("s.pkg"))  # e.g. a pull put its verified file there
    store.unpublish("s.pkg", inode)
    assert store.path("s.pkg").read_bytes() == b"pulled meanwhile" and not store.is_publishing("s.pkg")


def test_a_small_uploads_marker_is_a_second_name_of_its_file_and_goes_as_a_name(tmp_path):
    """publish_small marks the name with a hard link to the upload's own file (no inode of its
    own): while the event goes out the marker and the package are one inode; another publisher
    of the name finds it taken and leaves that file's time alone; the upload's end takes the
    marker's name and leaves the package whole, with one name."""
    store = Store(tmp_path)
    store.ensure()
    _, _, inode = finish_publishing(store, "Linked.pkg", b"linked body")
    dest, marker = store.path("Linked.pkg"), store._marker("linked.pkg")  # noqa: SLF001
    assert os.stat(marker).st_ino == os.stat(dest).st_ino == inode and os.stat(dest).st_nlink == 2
    past = time.time() - 120
    os.utime(dest, (past, past))
    with store.publishing("LINKED.pkg"):  # e.g. a pull of the name, in another process
        assert store.is_publishing("linked.pkg")
    assert os.stat(dest).st_mtime == past  # its marker was not "refreshed" through the file
    assert store.is_publishing("linked.pkg")  # the other publisher did not take it away

    async def after():
        async with store.published_upload("Linked.pkg"):
            pass
    asyncio.run(after())
    assert not store.is_publishing("linked.pkg") and list(store.tmp.iterdir()) == []
    assert dest.read_bytes() == b"linked body" and os.stat(dest).st_nlink == 1


def test_a_killed_small_publishers_marker_is_swept_as_a_name(tmp_path):
    """A publisher killed after publish_small leaves its marker, a link to the package file:
    the sweep takes the marker's name; the file stays if its event was folded (published),
    and goes like any unannounced file if it was not."""
    for folded in (True, False):
        store = Store(tmp_path / str(folded))
        store.ensure()
        finish_publishing(store, "k.pkg", b"killed")
        old = time.time() - 3600
        os.utime(store.path("k.pkg"), (old, old))  # the marker's time too: one inode
        store.sweep({"k.pkg"} if folded else set())
        assert list(store.tmp.iterdir()) == [] and not store.is_publishing("k.pkg")
        assert store.path("k.pkg").exists() == folded
        if folded:
            assert store.path("k.pkg").read_bytes() == b"killed" and os.stat(store.path("k.pkg")).st_nlink == 1
