"""downloads.ReadModelWatch: the read model's data_version for one stat of its write-ahead log,
never a version older than the last commit (real SQLite files in WAL mode, two connections)."""

from __future__ import annotations

import os
import time

from odst.gateway.downloads import ReadModelWatch
from odst.projections.db import connect


def _setup(tmp_path):
    path = tmp_path / "read-model.db"
    writer = connect(path)
    writer.execute("CREATE TABLE t (x)")
    reader = connect(path, readonly=True)
    asked: list[str] = []
    reader.set_trace_callback(lambda sql: asked.append(sql) if "data_version" in sql else None)
    return writer, reader, asked


def test_every_commit_moves_the_version_it_answers(tmp_path):
    writer, reader, asked = _setup(tmp_path)
    watch = ReadModelWatch(reader, clock=lambda: time.time_ns() + 10**12)  # the log looks old
    assert watch.wal == f"{tmp_path / 'read-model.db'}-wal"
    seen = {watch.version()}
    for i in range(50):  # commits back to back, within one timestamp tick of each other
        writer.execute("INSERT INTO t VALUES (?)", (i,))
        v = watch.version()
        assert v not in seen, f"commit {i} not seen"
        seen.add(v)
    assert len(asked) == 51  # each changed log: the PRAGMA


def test_an_unchanged_old_log_costs_no_pragma_and_a_recent_one_does(tmp_path):
    writer, reader, asked = _setup(tmp_path)
    writer.execute("INSERT INTO t VALUES (1)")
    now = [time.time_ns()]
    watch = ReadModelWatch(reader, clock=lambda: now[0])
    v = watch.version()
    # the log was written a moment before the read: within the margin, the PRAGMA every time
    assert watch.version() == v and watch.version() == v
    assert len(asked) == 3
    now[0] += 10**12  # read again long after the last write: from then on one stat suffices
    assert watch.version() == v
    assert len(asked) == 4
    assert watch.version() == v and watch.version() == v
    assert len(asked) == 4
    writer.execute("INSERT INTO t VALUES (2)")  # the log moves: the PRAGMA, and the new version
    assert watch.version() != v
    assert len(asked) == 5


def test_a_log_with_the_same_size_and_mtime_but_read_within_the_margin_is_asked(tmp_path):
    """A commit that leaves size and mtime as they were (a log restarted after a checkpoint,
    in the same timestamp tick) is only possible within the margin of the last read, where
    the watch always asks."""
    writer, reader, asked = _setup(tmp_path)
    writer.execute("INSERT INTO t VALUES (1)")
    wal = f"{tmp_path / 'read-model.db'}-wal"
    st = os.stat(wal)
    watch = ReadModelWatch(reader, clock=lambda: st.st_mtime_ns + ReadModelWatch.MARGIN_NS // 2)
    v = watch.version()
    writer.execute("INSERT INTO t VALUES (2)")
    os.truncate(wal, st.st_size)  # what a restarted log of the same length looks like
    os.utime(wal, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(wal).st_size == st.st_size
    assert watch.version() != v  # asked, not remembered
    assert len(asked) == 2


def test_no_log_always_asks(tmp_path):
    path = tmp_path / "plain.db"
    import sqlite3
    plain = sqlite3.connect(path, isolation_level=None)
    plain.execute("CREATE TABLE t (x)")
    watch = ReadModelWatch(plain)
    assert watch.wal is None
    v = watch.version()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("INSERT INTO t VALUES (1)")
    assert watch.version() != v
