"""The one hasher (odst.store.hashing): any size, any way the bytes are split, the same hashes as hashlib."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import blake3
import pytest
from hypothesis import given, settings, strategies as st

from odst.store.files import StreamingUpload
from odst.store.hashing import (CHUNK_SIZE, ChunkHashes, ManifestBuilder, Rechunker, WholeHash, chunk_count, chunk_ok,
                                chunk_span, hash_file, manifest_of)

SMALL_CHUNK = 64  # the same code with a small chunk keeps the properties cheap to explore


def reference(data: bytes, chunk: int):
    chunks = [hashlib.sha1(data[i:i + chunk]).hexdigest() for i in range(0, len(data), chunk)]
    return (len(data), hashlib.sha1(data).hexdigest(), hashlib.sha512(data).hexdigest(),
            blake3.blake3(data).hexdigest(), chunks)


def splits(data: bytes, cuts: list[int]):
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@given(st.binary(max_size=1000), st.lists(st.integers(min_value=0), max_size=20))
def test_manifest_matches_hashlib_however_the_bytes_are_split(data, cuts):
    m = manifest_of(splits(data, cuts), SMALL_CHUNK)
    assert (m.size, m.sha1, m.sha512, m.blake3, list(m.chunks)) == reference(data, SMALL_CHUNK)
    assert len(m.chunks) == chunk_count(len(data), SMALL_CHUNK)


@given(st.binary(max_size=1000), st.lists(st.integers(min_value=0), max_size=20))
def test_chunk_hashes_of_pieces_are_the_chunks_sha1s_however_the_bytes_are_split(data, cuts):
    hashes = ChunkHashes(SMALL_CHUNK)
    for piece in splits(data, cuts):
        hashes.update(piece)
    assert hashes.finish() == reference(data, SMALL_CHUNK)[4]


@given(st.integers(min_value=0, max_value=10 * SMALL_CHUNK))
def test_chunk_spans_tile_the_file(size):
    spans = [chunk_span(i, size, SMALL_CHUNK) for i in range(chunk_count(size, SMALL_CHUNK))]
    assert sum(n for _, n in spans) == size
    assert all(0 < n <= SMALL_CHUNK for _, n in spans)
    assert [o for o, _ in spans] == list(range(0, size, SMALL_CHUNK))


def test_real_chunk_size_boundaries():
    for size in (0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE, 3 * CHUNK_SIZE - 1):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        m = manifest_of([data])
        assert (m.size, m.sha1, m.sha512, m.blake3, list(m.chunks)) == reference(data, CHUNK_SIZE)
        assert m.chunk_size == CHUNK_SIZE
    assert manifest_of([b""]).chunks == ()


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=30))
def test_streaming_upload_writes_the_bytes_and_agrees_with_the_reference(tmp_path_factory, data, cuts):
    path = tmp_path_factory.mktemp("up") / "x.part"

    async def run():
        up = StreamingUpload(path, chunk_size=SMALL_CHUNK)
        for piece in splits(data, cuts):
            await up.feed(piece)
        return await up.finish()

    m = asyncio.run(run())
    assert path.read_bytes() == data
    assert (m.size, m.sha1, m.sha512, m.blake3, list(m.chunks)) == reference(data, SMALL_CHUNK)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.integers(min_value=0), max_size=30), st.integers(1, 400),
       st.integers(0, 500))
def test_streaming_upload_through_its_threads_agrees_with_the_reference(tmp_path_factory, data, cuts, batch, small):
    """Bodies over ``small_bytes`` go to the two hash/write threads in batches: the same bytes
    on disk and the same manifest however they are split and batched."""
    path = tmp_path_factory.mktemp("up") / "x.part"

    async def run():
        up = StreamingUpload(path, chunk_size=SMALL_CHUNK, batch_bytes=batch, small_bytes=small)
        for piece in splits(data, cuts):
            await up.feed(piece)
        assert up.received == len(data)
        return await up.finish()

    m = asyncio.run(run())
    assert path.read_bytes() == data
    assert (m.size, m.sha1, m.sha512, m.blake3, list(m.chunks)) == reference(data, SMALL_CHUNK)


def test_streaming_upload_of_megabytes_in_uvicorn_sized_pieces(tmp_path):
    """Real chunk size, more than MAX_BACKLOG in flight (back-pressure), writeback started:
    the file and the manifest are the reference's, and the file carries its blake3 label."""
    from odst.store.files import MAX_BACKLOG, content_tag
    data = random.Random(7).randbytes(MAX_BACKLOG + 3 * CHUNK_SIZE + 12345)
    path = tmp_path / "big.part"

    async def run():
        up = StreamingUpload(path)
        for i in range(0, len(data), 256_000):
            await up.feed(data[i:i + 256_000])
        return await up.finish()

    m = asyncio.run(run())
    assert path.read_bytes() == data
    assert (m.size, m.sha1, m.sha512, m.blake3, list(m.chunks)) == reference(data, CHUNK_SIZE)
    with open(path, "rb") as f:
        assert content_tag(f.fileno()) in (m.blake3, None)  # None: a file system without xattrs


@pytest.mark.parametrize("size", [100, 3 * CHUNK_SIZE])
def test_streaming_upload_abort_after_a_failed_write_leaves_nothing(tmp_path, size):
    """A write that fails (the store full) is reported by finish and loses the temp file on abort,
    on the small path and on the threads' path alike."""
    from odst.store.files import StoreFull
    path = tmp_path / "z.part"

    async def run():
        up = StreamingUpload(path)
        up._open()  # noqa: SLF001 - the temp file, as the first write would make it
        assert path.exists()
        os.close(up._fd)  # noqa: SLF001 - the write fails as on a full disk: EBADF instead of ENOSPC
        up._fd = os.open("/dev/full", os.O_WRONLY)  # noqa: SLF001
        with pytest.raises((StoreFull, OSError)):
            for i in range(0, size, 65536):
                await up.feed(b"x" * min(65536, size - i))
            await up.finish()
        await up.abort()

    asyncio.run(run())
    assert not path.exists()


def test_streaming_upload_writes_a_large_body_with_o_direct(tmp_path):
    """A body past several DIRECT_BYTES blocks, of a length no multiple of DIRECT_ALIGN, in
    pieces that straddle the blocks: written with O_DIRECT where the store's file system takes
    it (the aligned blocks), its tail buffered; the file is exactly the bytes sent."""
    from odst.store.files import DIRECT_ALIGN, DIRECT_BYTES
    data = random.Random(11).randbytes(3 * DIRECT_BYTES + 5 * DIRECT_ALIGN + 777)
    path = tmp_path / "direct.part"

    async def run():
        up = StreamingUpload(path)
        for i in range(0, len(data), 255_999):
            await up.feed(data[i:i + 255_999])
            if up._direct is None and up._lanes:  # noqa: SLF001 - the buffered path, not this test's
                pytest.skip("this file system takes no O_DIRECT")
        return await up.finish()

    m = asyncio.run(run())
    assert path.read_bytes() == data
    assert (m.size, m.sha1, m.sha512, m.blake3, list(m.chunks)) == reference(data, CHUNK_SIZE)


def test_streaming_upload_reports_a_failed_direct_write_and_aborts(tmp_path):
    """An O_DIRECT write that fails (the store full: /dev/full under the writer) is raised to the
    upload as StoreFull, and abort ends every thread and leaves no temp file."""
    from odst.store.files import DIRECT_BYTES, SMALL_BYTES, StoreFull
    PIECE = SMALL_BYTES + 1
    path = tmp_path / "full.part"

    async def run():
        up = StreamingUpload(path)
        await up.feed(b"x" * PIECE)  # past SMALL_BYTES: the threads start
        if up._direct is None:  # noqa: SLF001
            pytest.skip("this file system takes no O_DIRECT")
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, up._direct._fd)  # noqa: SLF001 - the writer's next write fails as on a full disk
        os.close(full)
        with pytest.raises(StoreFull):
            for _ in range(0, 4 * DIRECT_BYTES, PIECE):
                await up.feed(b"y" * PIECE)
            await up.finish()
        await up.abort()
        return up

    up = asyncio.run(run())
    assert not path.exists()
    up._direct._thread.join()  # noqa: SLF001 - the writer ended (it was stopped, not left waiting)
    assert all(lane.exited for lane in up._lanes)  # noqa: SLF001


def test_streaming_upload_abort_leaves_nothing(tmp_path):
    path = tmp_path / "y.part"

    async def run():
        up = StreamingUpload(path)
        await up.feed(b"x" * (CHUNK_SIZE + 5))
        await up.abort()

    asyncio.run(run())
    assert not path.exists()


def test_builder_reports_running_size():
    b = ManifestBuilder(SMALL_CHUNK)
    b.update(b"a" * 100)
    b.update(memoryview(b"b" * 28))
    assert b.size == 128
    assert len(b.finish().chunks) == 2


@given(st.binary(max_size=1000), st.lists(st.integers(min_value=0), max_size=20))
def test_rechunker_gives_the_same_blocks_however_the_bytes_are_split(data, cuts):
    r = Rechunker(SMALL_CHUNK)
    blocks = [bytes(b) for piece in splits(data, cuts) for b in r.feed(piece)]
    assert all(len(b) == SMALL_CHUNK for b in blocks)
    assert r.buffered == len(data) % SMALL_CHUNK
    rest = r.rest()
    assert blocks + ([rest] if rest else []) == [data[i:i + SMALL_CHUNK] for i in range(0, len(data), SMALL_CHUNK)]
    assert r.buffered == 0 and r.rest() == b""


@given(st.binary(max_size=1000), st.lists(st.integers(min_value=0), max_size=20))
def test_whole_hash_matches_hashlib_however_the_bytes_are_split(data, cuts):
    whole = WholeHash()
    for piece in splits(data, cuts):
        whole.update(piece)
    assert (whole.size, whole.sha1, whole.blake3) == (len(data), hashlib.sha1(data).hexdigest(),
                                                      blake3.blake3(data).hexdigest())


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=0, max_value=199))
def test_chunk_check_takes_the_chunk_and_refuses_a_changed_or_cut_one(data, at):
    sha1 = hashlib.sha1(data).hexdigest()
    assert chunk_ok(data, len(data), sha1)
    at %= len(data)
    flipped = data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]
    assert not chunk_ok(flipped, len(data), sha1)
    assert not chunk_ok(data[:at], len(data), hashlib.sha1(data[:at]).hexdigest())  # short, though self-consistent


@settings(max_examples=25)
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=700))
def test_hash_file_matches_the_manifest_whatever_the_read_size(tmp_path_factory, data, read_size):
    path = tmp_path_factory.mktemp("f") / "pkg"
    path.write_bytes(data)
    whole = hash_file(path, read_size)
    m = manifest_of([data], SMALL_CHUNK)
    assert (whole.size, whole.sha1, whole.blake3) == (m.size, m.sha1, m.blake3)


def test_one_manifest_travels_from_upload_to_event_to_puller_unchanged_on_the_wire():
    """The upload's Manifest goes TO each event with one function and comes back FROM it with
    another; the events' bytes are exactly those of the field-by-field events logs already hold."""
    import msgspec

    from odst.events import catalogue as ev
    from odst.replicator.puller import Want
    from odst.store.hashing import Manifest

    m = manifest_of([bytes(range(256)) * 9000])  # three chunks
    assert len(m.chunks) == 3
    by_hand = dict(size=m.size, sha1=m.sha1, sha512=m.sha512, blake3=m.blake3, chunk_size=m.chunk_size,
                   chunks=list(m.chunks))
    events = [
        (ev.PackageUploaded(name="a.pkg", **m.event_fields(), stage="test"),
         ev.PackageUploaded(name="a.pkg", stage="test", **by_hand)),
        (ev.PackageReplaced(name="a.pkg", **m.event_fields(), stage="prod", replaces="b" * 64, generation=2),
         ev.PackageReplaced(name="a.pkg", stage="prod", replaces="b" * 64, generation=2, **by_hand)),
        (ev.PackageAvailable(name="a.pkg", **m.event_fields(), stage="prod", origin="s1", uploaded_ts=5),
         ev.PackageAvailable(name="a.pkg", stage="prod", origin="s1", uploaded_ts=5, **by_hand)),
    ]
    for built, old in events:
        assert msgspec.json.encode(built) == msgspec.json.encode(old)
        assert Manifest.of(built) == m
    want = Want.of(Manifest.of(events[0][0]), name="a.pkg", stage="test", origin="s1", uploaded_ts=5,
                   uploaded_by="admin")
    assert isinstance(want, Manifest) and Manifest.of(want) == m
    assert (want.name, want.stage, want.origin) == ("a.pkg", "test", "s1")
    with pytest.raises(AttributeError):
        want.size = 1  # frozen: the manifest a transfer verifies against cannot change under it


def test_the_content_events_keep_their_fields_order_and_bytes():
    """PackageUploaded / Replaced / Available declare the manifest once (ContentEvent); their
    fields, order and encoding are those every existing log holds."""
    import msgspec

    from odst.events import catalogue as ev

    m = dict(size=3, sha1="s", sha512="x", blake3="b", chunk_size=1024, chunks=["c"])
    manifest = '"name":"a.pkg","size":3,"sha1":"s","sha512":"x","blake3":"b","chunk_size":1024,"chunks":["c"]'
    cases = [
        (ev.PackageUploaded(name="a.pkg", **m), '{"type":"PackageUploaded",' + manifest + ',"stage":"prod"}'),
        (ev.PackageReplaced(name="a.pkg", **m, stage="prod", replaces="o", generation=2),
         '{"type":"PackageReplaced",' + manifest + ',"stage":"prod","replaces":"o","generation":2}'),
        (ev.PackageAvailable(name="a.pkg", **m, stage="prod", origin="s1", uploaded_ts=5),
         '{"type":"PackageAvailable",' + manifest + ',"stage":"prod","origin":"s1","uploaded_ts":5,"uploaded_by":""}'),
    ]
    for event, wire in cases:
        assert msgspec.json.encode(event).decode() == wire
        assert msgspec.json.decode(wire.encode(), type=ev.AnyEvent) == event


def _held_descriptors(path) -> list[str]:
    out = []
    for n in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            continue
        if target.startswith(str(path)):
            out.append(target)
    return out


def test_a_large_uploads_blocks_are_unmapped_when_it_ends(tmp_path, monkeypatch):
    """The O_DIRECT writer's 4 MiB blocks go when the upload ends, finished or aborted, not
    when the garbage collector next sweeps the upload and its lanes (which refer to each
    other): 12 MiB an upload, seen reaching 245 MB after 20."""
    import mmap
    import types

    from odst.store import files
    made: list = []

    def recording(*args):
        block = mmap.mmap(*args)
        made.append(block)
        return block

    monkeypatch.setattr(files, "mmap", types.SimpleNamespace(mmap=recording))
    data = random.Random(12).randbytes(2 * files.DIRECT_BYTES + 999)

    async def upload(path, finish: bool):
        up = StreamingUpload(path)
        for i in range(0, len(data), 255_999):
            await up.feed(data[i:i + 255_999])
        if up._direct is None:  # noqa: SLF001
            pytest.skip("this file system takes no O_DIRECT")
        if finish:
            await up.finish()
        else:
            await up.abort()
        up._direct._thread.join(10)  # noqa: SLF001 - the writer has ended
        return up

    asyncio.run(upload(tmp_path / "done.part", finish=True))
    assert (tmp_path / "done.part").read_bytes() == data
    assert len(made) == files.DIRECT_BLOCKS and all(block.closed for block in made)
    made.clear()
    asyncio.run(upload(tmp_path / "aborted.part", finish=False))
    assert len(made) == files.DIRECT_BLOCKS and all(block.closed for block in made)


def test_a_finish_cancelled_while_the_store_pool_is_busy_leaves_no_thread_or_descriptor(tmp_path):
    """The server stopping: an upload's finish is cancelled while its last job waits for a busy
    store pool, and abort_now follows (as the gateway does). The O_DIRECT writer ends and no
    descriptor of the temp file stays open (the job never ran, so its hold is given back)."""
    import threading

    from odst.store import files
    path = tmp_path / "big.part"

    async def run():
        gate = threading.Event()
        busy = [files._STORE_POOL.submit(gate.wait) for _ in range(files._STORE_POOL._max_workers)]  # noqa: SLF001
        try:
            up = StreamingUpload(path)
            await up.feed(os.urandom(files.DIRECT_BYTES + 12345))  # past SMALL_BYTES: lanes, O_DIRECT writer
            if up._direct is None:  # noqa: SLF001
                pytest.skip("this file system takes no O_DIRECT")
            finishing = asyncio.create_task(up.finish())
            deadline = asyncio.get_running_loop().time() + 30
            while not all(lane.exited for lane in up._lanes):  # noqa: SLF001 - finish stopped them; its job waits
                assert asyncio.get_running_loop().time() < deadline, "finish did not stop the lanes"
                await asyncio.sleep(0.01)
            finishing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await finishing
            up.abort_now()
        finally:
            gate.set()
            for job in busy:
                job.result()
        return up

    up = asyncio.run(run())
    up._direct._thread.join(10)  # noqa: SLF001
    assert not up._direct._thread.is_alive()  # noqa: SLF001
    assert _held_descriptors(path) == []
    assert not path.exists()
