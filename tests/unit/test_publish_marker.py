"""Two publishers of one name on one store (two gateway processes: each has its own per-name
lock, only the store is shared). The loser's link fails (FileExistsError -> 409); it must not
take away the winner's publishing marker, which keeps the janitor (Replicator.remove_deleted,
in the replicator's process) off the winner's linked file until its event is folded: without
the marker that file is "not live" and is removed, and the winner still answers 201."""

from __future__ import annotations

import asyncio
import os

import pytest

from odst.replicator.replicator import remove_unlisted
from odst.store.files import Store, StreamingUpload


def written(store: Store, data: bytes):
    async def run():
        up = StreamingUpload(store.new_temp())
        await up.feed(data)
        await up.finish(fsync=False)
        return up.path
    return asyncio.run(run())


def test_a_losing_publisher_leaves_the_winners_marker(tmp_path):
    winner, loser = Store(tmp_path), Store(tmp_path)  # one store, two processes
    winner.ensure()
    mine, theirs = written(winner, b"winner"), written(loser, b"loser")

    async def run():
        async with winner.publishing_upload(mine, "Same.pkg") as dest:
            # the winner's event is on its way; the other process's upload of the name fails
            with pytest.raises(FileExistsError):
                async with loser.publishing_upload(theirs, "same.pkg"):
                    pass
            return dest, winner.is_publishing("Same.pkg"), dest.read_bytes()
    dest, marked, content = asyncio.run(run())
    assert content == b"winner"
    assert marked, "the losing publisher removed the winner's publishing marker"
    assert not winner.is_publishing("Same.pkg")  # gone once the winner is done
    assert theirs.exists()  # the loser's temp is the loser's to drop (packages.py does)


def test_the_janitor_keeps_an_upload_folded_between_its_reads(tmp_path):
    """Replicator.remove_deleted (remove_unlisted): an upload in another process is folded,
    and unmarks its name, right after the janitor read the live names. The janitor checks the
    markers first, then reads the live names again: the file is kept. (With one read before
    the marker check, it was removed though the upload had answered 201.)"""

    store = Store(tmp_path)
    store.ensure()
    path = written(store, b"just uploaded")
    dest = store.packages / "fresh.pkg"
    os.link(path, dest)  # linked by the upload, its event not folded yet: its name is marked
    marker = store._marker("Fresh.pkg")
    marker.touch()
    assert store.is_publishing("Fresh.pkg")
    orphan = store.packages / "deleted-elsewhere.pkg"
    orphan.write_bytes(b"old")
    live = set()

    def live_keys():
        seen = set(live)
        if marker.exists():  # the upload's fold commits and its marker goes, right after this read
            live.add(dest.name)
            marker.unlink()
        return seen

    assert remove_unlisted(store, live_keys) == ["deleted-elsewhere.pkg"]
    assert dest.read_bytes() == b"just uploaded"
    assert not orphan.exists()


def test_a_second_publisher_of_a_name_leaves_the_first_ones_marker(tmp_path):
    """Store.publishing (replace in place, the replicator): two at once on one name; the one
    that ends first did not make the marker, so the other's file stays marked until it ends."""
    first, second = Store(tmp_path), Store(tmp_path)
    first.ensure()
    with first.publishing("Same.pkg"):
        with second.publishing("same.pkg"):
            pass
        assert first.is_publishing("Same.pkg"), "the second publisher removed the first one's marker"
    assert not first.is_publishing("Same.pkg")


def test_the_first_publisher_ending_first_leaves_the_second_ones_file_marked(tmp_path):
    """The other order: the marker's maker ends while a second publisher of the name (a pull
    beside a replace, in another process) has placed its file and waits for its fold. The
    shared marker went with the first: the janitor then swept the second's file. Now the
    name stays marked until the second ends too; nothing of either is left behind."""
    first, second = Store(tmp_path), Store(tmp_path)
    first.ensure()
    held_by_first, held_by_second = first.publishing("Same.pkg"), second.publishing("same.pkg")
    held_by_first.__enter__()  # the name's marker made
    held_by_second.__enter__()  # while it is there
    second.path("same.pkg").write_bytes(b"placed, not folded yet")
    held_by_first.__exit__(None, None, None)  # the first ends first
    assert first.is_publishing("Same.pkg"), "the first publisher's end unmarked the second one's file"
    assert remove_unlisted(first, set) == [] and second.path("same.pkg").exists()
    held_by_second.__exit__(None, None, None)
    assert not first.is_publishing("Same.pkg") and list(first.tmp.iterdir()) == []
    assert remove_unlisted(first, set) == ["same.pkg"]  # unmarked, unlisted: swept as before


def test_a_pulled_files_marker_is_a_second_name_of_it_and_leaves_no_inode_behind(tmp_path):
    """Store.publishing with the file (the replicator's batches): the marker is a hard link to the file
    being put in place, so it follows it through the rename; its end takes the marker's name
    and leaves the package whole with one name. A second publisher of the name meanwhile
    marks it with a marker of its own and removes only that; so does one that finds the name
    marked by another publisher (an upload)."""
    store, other = Store(tmp_path), Store(tmp_path)  # one store, two processes
    store.ensure()
    temp = written(store, b"pulled body")
    inode = os.stat(temp).st_ino
    with store.publishing("Pulled.pkg", file=temp):
        marker = store._marker("pulled.pkg")  # noqa: SLF001
        assert os.stat(marker).st_ino == inode, "the marker is a file of its own"
        assert store.is_publishing("PULLED.pkg")
        store.replace_many([(temp, "Pulled.pkg")])
        dest = store.path("Pulled.pkg")
        assert os.stat(dest).st_ino == inode and os.stat(dest).st_nlink == 2
        with other.publishing("pulled.pkg", file=written(other, b"another pull")):
            pass
        assert store.is_publishing("pulled.pkg"), "the second publisher removed the first one's marker"
    assert not store.is_publishing("pulled.pkg") and not marker.exists()
    assert dest.read_bytes() == b"pulled body" and os.stat(dest).st_nlink == 1
    with store.publishing("taken.pkg"):  # e.g. an upload of the name holds a marker of its own
        with store.publishing("taken.pkg", file=written(store, b"late pull")):
            pass
        assert store.is_publishing("taken.pkg")
    assert not store.is_publishing("taken.pkg") and not list(store.tmp.glob("*.publishing"))
