"""The puller against in-memory sources (the same ChunkSource contract the real transports pass,
see test_contracts.py)."""

from __future__ import annotations

import asyncio
import hashlib
import random

import blake3
import pytest

from odst.replicator.puller import Puller, TransferFailed, Want
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
