"""One contract per port, run against every implementation of it, with real parts.

* ``ChunkSource`` (odst.replicator.transport): HTTP and NATS from a real linked site, and
  the tests' in-memory ``MemorySource`` (tests/sources.py) the puller's tests rely on.
* ``Appender`` (odst.events.log): ``EventLog`` on a real nats-server.
* ``PackageStore`` (odst.store.files): ``Store`` on real directories.
* ``ProjectionStatus`` (odst.projections.status): ``Projector``, and ``ReadModelWatcher``
  reading the read model a ``Projector`` writes, on a real nats-server.

A new implementation of a port joins its list of factories here and must pass as it stands.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

import blake3
import nats
import pytest

from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import EVENTS_STREAM, Appended, Appender, EventLog, LogDamaged
from odst.events.signing import SiteKey
from odst.projections.projector import Projector
from odst.projections.status import ProjectionStatus
from odst.projections.watcher import ReadModelWatcher
from odst.replicator.transport import (ChunkSource, ChunkUnavailable, HttpChunkSource, NatsChunkSource,
                                       TransportFailed, http_session)
from odst.naming import name_key
from odst.store.files import PACKAGE_MODE, PackageStore, Store
from odst.store.hashing import manifest_of
from odst.store.hashing import CHUNK_SIZE
from harness.wait import until
from tests.conftest import SiteProcess, free_port, open_log, site_nats, write_random
from tests.sources import MemorySource
from tests.system.test_replication import register, site_id, upload


def staged(i: int) -> ev.PackageStaged:
    return ev.PackageStaged(name=f"p{i}.pkg", stage="test")


# --- ChunkSource ------------------------------------------------------------------------

@dataclass
class Served:
    """Site A holds one content; site B is registered with A (A trusts B's key)."""
    a: SiteProcess
    b: SiteProcess
    a_id: str
    blake3: str
    data: bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    root = tmp_path_factory.mktemp("contract-pair")
    leaf = free_port()
    a = SiteProcess(data=root / "a", port=free_port(),
                    extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"])
    b = SiteProcess(data=root / "b", port=free_port(),
                    extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"])
    try:
        a.start()
        b.start()
        register(a, b)
        src = write_random(root / "p.pkg", 2 * CHUNK_SIZE + 5, seed=2)  # the last chunk is short
        pkg = upload(a, "c.pkg", src)
        yield Served(a, b, site_id(a), pkg["blake3"], src.read_bytes())
    finally:
        for s in (b, a):
            s.stop()


@dataclass
class Sources:
    good: ChunkSource  # asks as a site the server trusts
    unreachable: ChunkSource  # a server nobody answers for
    stranger: ChunkSource | None  # asks with a key the server does not trust (signed transports)


@contextlib.asynccontextmanager
async def http_sources(s: Served, tmp: Path) -> AsyncIterator[Sources]:
    key = SiteKey.load_or_create(s.b.data / "site.key")
    stranger = SiteKey.load_or_create(tmp / "stranger.key")
    async with http_session() as http:
        yield Sources(HttpChunkSource(s.a_id, s.a.url, key, http),
                      HttpChunkSource(s.a_id, f"http://127.0.0.1:{free_port()}", key, http),
                      HttpChunkSource(s.a_id, s.a.url, stranger, http))


@contextlib.asynccontextmanager
async def nats_sources(s: Served, tmp: Path) -> AsyncIterator[Sources]:
    key = SiteKey.load_or_create(s.b.data / "site.key")
    stranger = SiteKey.load_or_create(tmp / "stranger.key")
    nc = await site_nats(s.b.data)
    try:
        yield Sources(NatsChunkSource(s.a_id, nc, key),
                      NatsChunkSource("snobodyhere", nc, key, timeout=2.0),
                      NatsChunkSource(s.a_id, nc, stranger))
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def memory_sources(s: Served, tmp: Path) -> AsyncIterator[Sources]:
    everything = range(-1, 4)
    yield Sources(MemorySource(s.a_id, s.data, CHUNK_SIZE),
                  MemorySource(s.a_id, s.data, CHUNK_SIZE, fail=everything), None)


CHUNK_SOURCES = {"http": http_sources, "nats": nats_sources, "memory": memory_sources}


@pytest.fixture(params=sorted(CHUNK_SOURCES))
def chunk_sources(request, tmp_path):
    """(kind, an async context manager of its Sources); the memory one needs no sites."""
    kind = request.param
    if kind == "memory":
        data = write_random(tmp_path / "p.pkg", 2 * CHUNK_SIZE + 5, seed=2).read_bytes()
        s = Served(None, None, "smemory", blake3.blake3(data).hexdigest(), data)
    else:
        s = request.getfixturevalue("served")
    return kind, s, lambda: CHUNK_SOURCES[kind](s, tmp_path)


def test_a_chunk_source_returns_each_chunk_exactly(chunk_sources):
    kind, s, sources = chunk_sources

    async def run():
        async with sources() as src:
            assert src.good.kind == kind and src.good.site == s.a_id
            return [await src.good.fetch(s.blake3, i) for i in range(3)]
    chunks = asyncio.run(run())
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, 5]
    assert b"".join(chunks) == s.data


def test_a_chunk_source_says_unavailable_for_unknown_content_or_index(chunk_sources):
    _, s, sources = chunk_sources

    async def run():
        async with sources() as src:
            for content, index in [("0" * 64, 0), (s.blake3, 3), (s.blake3, -1)]:
                with pytest.raises(ChunkUnavailable):
                    await src.good.fetch(content, index)
    asyncio.run(run())


def test_a_chunk_source_that_cannot_be_reached_says_transport_failed(chunk_sources):
    """Not ChunkUnavailable: the puller may retry an unreachable source, never a refusing one."""
    _, s, sources = chunk_sources

    async def run():
        async with sources() as src:
            with pytest.raises(TransportFailed):
                await src.unreachable.fetch(s.blake3, 0)
    asyncio.run(run())


@pytest.mark.parametrize("chunk_sources", ["http", "memory"], indirect=True)  # NATS serves one chunk a request
def test_a_run_source_streams_a_run_chunk_by_chunk(chunk_sources):
    """``RunSource.fetch_run``: the chunks of one request, each as pieces of exactly its length."""
    kind, s, sources = chunk_sources

    async def run():
        async with sources() as src:
            chunks = [b"".join(pieces) async for pieces in src.good.fetch_run(s.blake3, 0, [CHUNK_SIZE, CHUNK_SIZE, 5])]
            tail = [b"".join(pieces) async for pieces in src.good.fetch_run(s.blake3, 1, [CHUNK_SIZE, 5])]
            with pytest.raises(ChunkUnavailable):
                async for _ in src.good.fetch_run(s.blake3, 2, [5, CHUNK_SIZE]):
                    pass
            return chunks, tail
    chunks, tail = asyncio.run(run())
    assert [len(c) for c in chunks] == [CHUNK_SIZE, CHUNK_SIZE, 5] and b"".join(chunks) == s.data
    assert b"".join(tail) == s.data[CHUNK_SIZE:]


@pytest.mark.parametrize("chunk_sources", ["http", "nats"], indirect=True)  # the memory one signs nothing
def test_a_signed_chunk_source_is_refused_under_a_key_the_server_does_not_trust(chunk_sources):
    kind, s, sources = chunk_sources

    async def run():
        async with sources() as src:
            with pytest.raises(ChunkUnavailable, match="403"):
                await src.stranger.fetch(s.blake3, 0)
    asyncio.run(run())


# --- Appender (the event log) -------------------------------------------------------------

@contextlib.asynccontextmanager
async def jetstream_log(url: str, key: SiteKey, chain_state=None) -> AsyncIterator[Appender]:
    nc = await nats.connect(url)
    try:
        yield EventLog(nc.jetstream(), key, chain_state=chain_state)
    finally:
        await nc.close()


APPENDERS = {"jetstream": jetstream_log}


@pytest.fixture(params=sorted(APPENDERS))
def appender(request, nats_server, tmp_path):
    """A factory of appenders on one log (several may write to it, as several gateways do)."""
    key = SiteKey.load_or_create(tmp_path / "site.key")
    make = APPENDERS[request.param]
    return key, lambda **kw: make(nats_server.url, key, **kw), nats_server.url


async def stored(url: str, seq: int) -> bytes:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().get_msg(EVENTS_STREAM, seq)).data
    finally:
        await nc.close()


def test_an_empty_log_has_the_genesis_head_and_ensuring_it_twice_changes_nothing(appender):
    _, log_of, _ = appender

    async def run():
        async with log_of() as log:
            first, second = await log.ensure_stream(), await log.ensure_stream()
            return first, second, await log.head(), log.replicas
    assert asyncio.run(run()) == ([], [], (0, 0, codec.GENESIS), 1)


def test_appends_chain_in_order_and_return_the_signed_bytes_stored(appender):
    key, log_of, url = appender

    async def run() -> tuple[list[Appended], tuple, list[bytes]]:
        async with log_of() as log:
            await log.ensure_stream()
            out = [await log.append(staged(i), actor="contract") for i in range(3)]
            head = await log.head()
        return out, head, [await stored(url, a.seq) for a in out]
    out, head, bodies = asyncio.run(run())
    prev = codec.GENESIS
    for n, (a, body) in enumerate(zip(out, bodies), start=1):
        assert (a.seq, a.envelope.seq, a.envelope.prev) == (n, n, prev)
        assert a.envelope.origin == key.site_id and a.envelope.actor == "contract"
        assert a.payload == body
        assert codec.open_signed(body, key.public_key) == a.envelope
        prev = codec.chain_hash(body)
    assert head == (3, 3, prev)


def test_a_writer_with_a_stale_head_rechains_instead_of_forking(appender):
    """Expected-last-sequence: the second writer's append lands between two of the first's."""
    key, log_of, url = appender

    async def run():
        async with log_of() as a, log_of() as b:
            await a.ensure_stream()
            first = await a.append(staged(1), actor="a")  # a now holds head 1
            between = await b.append(staged(2), actor="b")
            after = await a.append(staged(3), actor="a")  # a's head is stale
        return first, between, after
    first, between, after = asyncio.run(run())
    assert (between.seq, between.envelope.seq, between.envelope.prev) == (2, 2, codec.chain_hash(first.payload))
    assert (after.seq, after.envelope.seq, after.envelope.prev) == (3, 3, codec.chain_hash(between.payload))


def test_a_republished_event_id_is_stored_once_and_the_chain_goes_on(appender):
    """The log's retries are idempotent because the stream drops a second message with the
    same Nats-Msg-Id (the event id) within its duplicate window."""
    key, log_of, url = appender

    async def run():
        async with log_of() as log:
            await log.ensure_stream()
            first = await log.append(staged(1), actor="t")
            nc = await nats.connect(url)
            try:
                ack = await nc.jetstream().publish(
                    f"odst.{key.site_id}.ev.PackageStaged", first.payload, stream=EVENTS_STREAM,
                    headers={"Nats-Msg-Id": first.envelope.id})
            finally:
                await nc.close()
            second = await log.append(staged(2), actor="t")
        return first, ack, second
    first, ack, second = asyncio.run(run())
    assert ack.duplicate and ack.seq == first.seq
    assert (second.seq, second.envelope.seq, second.envelope.prev) == (2, 2, codec.chain_hash(first.payload))


def test_a_log_shorter_than_the_read_model_refuses_appends(appender):
    """Never a second history over a cut one: the read model has folded more than the stream holds."""
    _, log_of, _ = appender

    async def run():
        async with log_of(chain_state=lambda: (5, 5, "f" * 64)) as log:
            await log.ensure_stream()
            with pytest.raises(LogDamaged, match="seq 5"):
                await log.append(staged(1), actor="t")
            with pytest.raises(LogDamaged):
                await log.head()
        async with log_of() as fresh:
            return await fresh.head()
    assert asyncio.run(run()) == (0, 0, codec.GENESIS)  # nothing was appended


# --- PackageStore ----------------------------------------------------------------------

STORES: dict[str, Callable[[Path], PackageStore]] = {"filesystem": Store}


@pytest.fixture(params=sorted(STORES))
def store(request, tmp_path) -> PackageStore:
    s = STORES[request.param](tmp_path / "store")
    s.ensure()
    return s


def visible(store: PackageStore) -> set[str]:
    """What a front end serving packages/ would list."""
    return {p.name for p in store.path("x").parent.iterdir()}


def written(store: PackageStore, body: bytes) -> Path:
    temp = store.new_temp()
    temp.write_bytes(body)
    return temp


def test_store_directories_are_private_even_when_made_loosely(tmp_path):
    for name, make in STORES.items():
        (tmp_path / name / "packages").mkdir(parents=True, mode=0o755)
        s = make(tmp_path / name)
        s.ensure()
        for d in (s.tmp, s.path("x").parent):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_a_temp_file_is_never_visible_until_published_and_then_only_under_its_name(store):
    """Under the key of its name (odst.naming.name_key): every spelling of it is that one file."""
    temp = written(store, b"payload")
    other = store.new_temp()
    assert temp != other and temp.parent == other.parent == store.tmp
    assert visible(store) == set()
    dest = store.publish(temp, "Fïrefox 3.pkg")
    assert dest == store.path("Fïrefox 3.pkg") and dest.read_bytes() == b"payload"
    assert stat.S_IMODE(dest.stat().st_mode) == PACKAGE_MODE
    assert not temp.exists() and visible(store) == {name_key("Fïrefox 3.pkg")}
    for spelling in ("FÏREFOX 3.PKG", unicodedata.normalize("NFD", "fïrefox 3.pkg")):
        assert store.path(spelling) == dest
    with pytest.raises(FileExistsError):  # another spelling can never become a second file
        store.publish(written(store, b"other"), "FÏREFOX 3.pkg")
    assert store.remove("FÏREFOX 3.PKG") and visible(store) == set()


def test_files_an_older_odst_named_by_spelling_are_adopted_under_their_keys(store):
    """Start-up after an upgrade: a lone file takes its key's name; of several spellings of one
    key, the one holding the content the read model says is held is kept (hashed to tell)."""
    packages = store.path("x").parent
    (packages / "Lone.pkg").write_bytes(b"lone")
    (packages / "Two.pkg").write_bytes(b"kept")
    (packages / "TWO.PKG").write_bytes(b"other")
    renamed = store.adopt_spellings({"two.pkg": manifest_of([b"kept"]).blake3})
    assert sorted(renamed) == ["Lone.pkg -> lone.pkg", "Two.pkg -> two.pkg"]
    assert store.path("LONE.pkg").read_bytes() == b"lone" and store.path("two.pkg").read_bytes() == b"kept"
    assert store.sweep({"lone.pkg", "two.pkg"}) == ["packages/TWO.PKG"]
    assert visible(store) == {"lone.pkg", "two.pkg"}


def test_publish_never_overwrites_and_replace_does(store):
    store.publish(written(store, b"one"), "a.pkg")
    temp = written(store, b"two")
    with pytest.raises(FileExistsError):
        store.publish(temp, "a.pkg")
    assert store.path("a.pkg").read_bytes() == b"one" and temp.exists()
    store.replace(temp, "a.pkg")
    assert store.path("a.pkg").read_bytes() == b"two" and not temp.exists()
    assert stat.S_IMODE(store.path("a.pkg").stat().st_mode) == PACKAGE_MODE


def test_replace_many_places_each_and_reports_the_one_that_fails(store):
    """replace_many (a batch of pulled files, one directory fsync): each file replaces what was
    at its name with the package mode; one whose temp file is gone is reported alone."""
    store.publish(written(store, b"old"), "a.pkg")
    temps = [(written(store, b"new a"), "a.pkg"), (store.tmp / "gone.part", "b.pkg"),
             (written(store, b"new c"), "C.pkg")]
    out = store.replace_many(temps)
    assert out[0] == store.path("a.pkg") and out[2] == store.path("c.pkg")
    assert isinstance(out[1], FileNotFoundError)
    assert store.path("a.pkg").read_bytes() == b"new a" and store.path("c.pkg").read_bytes() == b"new c"
    assert not store.path("b.pkg").exists() and not temps[0][0].exists() and not temps[2][0].exists()
    assert stat.S_IMODE(store.path("c.pkg").stat().st_mode) == PACKAGE_MODE


def test_grouped_publishes_land_every_file_and_never_overwrite(store):
    """publishing_upload (many uploads at once sharing a directory fsync): each file under its
    own name, a taken name refused as by publish, and a second round after the first works too."""
    async def publish(temp, name):
        async with store.publishing_upload(temp, name):
            pass

    async def run():
        temps = {f"g{i}.pkg": written(store, f"body {i}".encode()) for i in range(12)}
        await asyncio.gather(*(publish(t, n) for n, t in temps.items()))
        loser = written(store, b"late")
        with pytest.raises(FileExistsError):
            await publish(loser, "G3.pkg")
        await publish(written(store, b"again"), "h.pkg")
        return loser
    loser = asyncio.run(run())
    assert visible(store) == {f"g{i}.pkg" for i in range(12)} | {"h.pkg"}
    assert store.path("g3.pkg").read_bytes() == b"body 3" and loser.exists()
    assert stat.S_IMODE(store.path("g7.pkg").stat().st_mode) == PACKAGE_MODE


def test_remove_says_whether_there_was_a_file(store):
    store.publish(written(store, b"x"), "a.pkg")
    assert store.remove("a.pkg") is True
    assert store.remove("a.pkg") is False
    assert visible(store) == set()


def test_sweep_drops_only_old_temp_files_and_unpublished_packages(store):
    old = time.time() - 3600
    keep = store.publish(written(store, b"k"), "kept.pkg")
    stray = store.publish(written(store, b"s"), "stray.pkg")
    young_stray = store.publish(written(store, b"y"), "young.pkg")
    part, young_part = written(store, b"p"), written(store, b"q")
    resumable = store.new_temp(".repl")  # a pull's partial file: the replicator resumes it
    resumable.write_bytes(b"r")
    for p in (keep, stray, part, resumable):
        os.utime(p, (old, old))
    removed = store.sweep({"kept.pkg"}, older_than_s=60)
    assert sorted(removed) == sorted([f"tmp/{part.name}", "packages/stray.pkg"])
    assert keep.exists() and young_stray.exists() and young_part.exists() and resumable.exists()
    assert sorted(store.sweep({"kept.pkg"})) == sorted([f"tmp/{young_part.name}", "packages/young.pkg"])
    assert visible(store) == {"kept.pkg"}


def test_a_name_being_published_is_marked_for_other_processes_until_done(store):
    assert not store.is_publishing("a.pkg")
    with store.publishing("a.pkg"):
        assert store.is_publishing("a.pkg") and not store.is_publishing("b.pkg")
        assert visible(store) == set()  # the marker is not a package
        markers = [p for p in store.tmp.iterdir()]
        old = time.time() - 3600
        for m in markers:
            os.utime(m, (old, old))
        assert not store.is_publishing("a.pkg")  # a crashed publisher's marker expires
    assert not store.is_publishing("a.pkg") and not any(store.tmp.iterdir())


def test_free_space_and_reserve_are_real_figures(store):
    assert store.free_bytes() > 0
    assert 0 < store.reserve_bytes() <= 64 << 20


# --- ProjectionStatus ------------------------------------------------------------------

@dataclass
class Projection:
    log: EventLog  # appends to the folded stream
    status: ProjectionStatus  # what is under test
    writer: Projector  # what folds (the same object for a Projector)


@contextlib.asynccontextmanager
async def folding(url: str, key: SiteKey, db: Path) -> AsyncIterator[tuple[EventLog, Projector]]:
    nc, js, log = await open_log(url, key)
    writer = Projector(js, db, {key.site_id: key.public_key}, [EVENTS_STREAM])
    writer.start()
    founded = await log.append(ev.SiteFounded(site=key.site_id, public_key=key.public_key.hex(), name="C"),
                               actor="system")
    try:
        assert await writer.wait_for(EVENTS_STREAM, founded.seq, 30)
        yield log, writer
    finally:
        await writer.stop()
        writer.conn.close()
        await nc.close()


@contextlib.asynccontextmanager
async def projector(url: str, key: SiteKey, db: Path) -> AsyncIterator[Projection]:
    async with folding(url, key, db) as (log, writer):
        yield Projection(log, writer, writer)


@contextlib.asynccontextmanager
async def watcher(url: str, key: SiteKey, db: Path) -> AsyncIterator[Projection]:
    """The writer stands for the projector process; the watcher sees only its read model."""
    async with folding(url, key, db) as (log, writer):
        w = ReadModelWatcher(log.js, db)
        await w.wait_ready(key.site_id, timeout=30, bootstrap_s=0)
        w.start()
        try:
            yield Projection(log, w, writer)
        finally:
            await w.stop()


PROJECTIONS = {"projector": projector, "watcher": watcher}


@pytest.fixture(params=sorted(PROJECTIONS))
def projection(request, nats_server, tmp_path):
    key = SiteKey.load_or_create(tmp_path / "site.key")
    make = PROJECTIONS[request.param]
    return request.param, lambda: make(nats_server.url, key, tmp_path / "read.sqlite")


def test_checkpoint_and_wait_for_follow_what_is_folded(projection):
    _, rig = projection

    async def run():
        async with rig() as p:
            assert p.status.checkpoint("NOSUCHSTREAM") == 0
            last = [await p.log.append(staged(i), actor="t") for i in range(3)][-1]
            reached = await p.status.wait_for(EVENTS_STREAM, last.seq, timeout=30)
            return last.seq, reached, p.status.checkpoint(EVENTS_STREAM)
    seq, reached, checkpoint = asyncio.run(run())
    assert reached and checkpoint == seq == 4  # SiteFounded, then three


def test_wait_for_a_seq_never_stored_gives_false_after_its_timeout(projection):
    _, rig = projection

    async def run():
        async with rig() as p:
            began = time.monotonic()
            reached = await p.status.wait_for(EVENTS_STREAM, 99, timeout=0.3)
            return reached, time.monotonic() - began
    reached, took = asyncio.run(run())
    assert reached is False and 0.25 <= took < 10


def test_wait_changed_wakes_when_something_is_folded(projection):
    _, rig = projection

    async def run():
        async with rig() as p:
            waiting = asyncio.ensure_future(p.status.wait_changed(60))
            await asyncio.sleep(0)  # let it take note of the present state (a yield, not a wait)
            began = time.monotonic()
            await p.log.append(staged(1), actor="t")
            await asyncio.wait_for(waiting, 30)
            return time.monotonic() - began
    assert asyncio.run(run()) < 30


def test_wait_changed_returns_quietly_after_its_timeout(projection):
    _, rig = projection

    async def run():
        async with rig() as p:
            began = time.monotonic()
            await p.status.wait_changed(0.3)
            return time.monotonic() - began
    assert 0.25 <= asyncio.run(run()) < 10


def test_lag_counts_what_is_stored_and_not_yet_folded(projection):
    _, rig = projection

    async def run():
        async with rig() as p:
            caught_up = await p.status.lag()
            await p.writer.stop()  # folding stops; the log goes on
            for i in range(2):
                await p.log.append(staged(i), actor="t")
            return caught_up, await p.status.lag()
    caught_up, behind = asyncio.run(run())
    assert caught_up == {EVENTS_STREAM: 0}
    assert behind == {EVENTS_STREAM: 2}


def test_error_is_none_while_folding_works_and_names_a_stream_that_fails(projection):
    """A ReadModelWatcher (a gateway- or replicator-only process) reports the projector
    process's error too: the projector records it in the read model."""
    kind, rig = projection

    async def run():
        async with rig() as p:
            await p.log.append(staged(1), actor="t")
            assert await p.status.wait_for(EVENTS_STREAM, 2, timeout=30)
            assert p.status.error is None
            for status in {id(s): s for s in (p.writer, p.status)}.values():
                status.add_stream("NOSUCHSTREAM")  # the projector process is told of it too
            await until(lambda: p.status.error is not None, 10, "the failing stream to be reported")
            return p.status.error
    error = asyncio.run(run())
    assert "NotFound" in error and "NOSUCHSTREAM" in error
