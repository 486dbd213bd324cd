"""The read model's WAL is checkpointed by a thread of its own (projector.WalCheckpointer),
not inside a fold's COMMIT on the event loop: what it copies back is every frame no reader
still needs, a reader's snapshot holds it back without waiting, and the database file then
holds every fold (real SQLite files)."""

from __future__ import annotations

import sqlite3
import threading

from odst.projections.db import connect, open_read_model
from odst.projections.projector import WalCheckpointer


def fill(conn, n: int, first: int = 0) -> None:
    conn.execute("BEGIN IMMEDIATE")
    for i in range(first, first + n):
        conn.execute("INSERT INTO checkpoints(stream, seq) VALUES (?, ?)", (f"S{i}", i))
    conn.execute("COMMIT")


def test_a_thread_checkpoints_what_the_writer_left_in_the_wal(tmp_path):
    path = tmp_path / "rm.sqlite"
    writer = open_read_model(path)
    writer.execute("PRAGMA wal_autocheckpoint=0")  # as the projector's connection
    fill(writer, 5000)
    assert (tmp_path / "rm.sqlite-wal").stat().st_size > 0
    checkpointer = WalCheckpointer(path)
    result = []
    t = threading.Thread(target=lambda: result.append(checkpointer.run()))
    t.start()
    t.join(60)
    busy, frames, copied = result[0]
    assert busy == 0 and frames > 0 and copied == frames
    # the database file alone now has every row (immutable: SQLite reads no WAL)
    db_file = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    assert db_file.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 5000
    db_file.close()
    checkpointer.close()
    writer.close()


def test_a_readers_snapshot_holds_frames_back_without_waiting(tmp_path):
    path = tmp_path / "rm.sqlite"
    writer = open_read_model(path)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    fill(writer, 10)
    reader = connect(path, readonly=True)
    reader.execute("BEGIN")
    assert reader.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 10  # its snapshot
    fill(writer, 10, first=10)  # written after the reader's snapshot: not copied while it reads
    checkpointer = WalCheckpointer(path)
    busy, frames, copied = checkpointer.run()  # returns at once (PASSIVE)
    assert frames > copied >= 0
    reader.execute("COMMIT")
    busy, frames, copied = checkpointer.run()
    assert copied == frames
    assert reader.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 20
    checkpointer.close()
    reader.close()
    writer.close()
