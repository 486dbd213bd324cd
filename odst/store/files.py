"""Files on disk: streaming uploads into temp files, atomic publish, removal, sweeping.

Layout under the store root::

    tmp/<random>.part        uploads and downloads in progress (never served)
    packages/<key>           verified packages: the public distribution directory

A package's file is named by the key of its name (odst.naming.name_key: NFD + case fold),
never by a spelling: every spelling of a name maps to the one file, and one file is one
package. Callers pass any spelling; ``path`` folds it.

Writes go temp file -> fsync -> link into packages/ (no clobber) -> fsync dir; an upload
(``publishing_upload``) links first and fsyncs the file, then the directory, before its event
is appended: a file nobody published yet is the sweep's (see ``sweep``), and on ext4 the
file's fsync then commits the link too, so the directory's costs next to nothing.

Both directories are 0700 and package files 0600, owned by ODST's user: a front end that
serves packages/ itself (deploy/nginx/odst.conf) runs as that same user.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import queue
import secrets
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ContextManager, Iterable, Protocol

import structlog

from odst.errors import PackageNameInvalid
from odst.naming import name_key
from odst.store.hashing import CHUNK_SIZE, Manifest, ManifestHasher, hash_file

log = structlog.get_logger("odst.store")

PACKAGE_MODE = 0o600
CONTENT_ATTR = "user.odst.blake3"  # which content a file holds, carried by its inode


def tag(path: Path, blake3: str) -> None:
    """Label a file (before it is renamed into packages/) with the content it holds, so a
    download that opened it knows what it serves even while a replacement swaps the name to
    another inode. A file system without user xattrs gets no label (see ``content_tag``)."""
    try:
        os.setxattr(path, CONTENT_ATTR, blake3.encode("ascii"))
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise
        log.warning("store file system keeps no xattrs: downloads during a replacement name the "
                    "content from the read model only", error=exc.strerror)


def content_tag(fd: int) -> str | None:
    """The blake3 a file was labelled with by ``tag``, or None (older file, no xattr support)."""
    try:
        return os.getxattr(fd, CONTENT_ATTR).decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None


class StoreFull(Exception):
    """No space left on the store's file system."""


class PackageStore(Protocol):
    """The package store as the gateway, the replicator and the site use it (contract:
    tests/system/test_contracts.py): temp files under ``tmp`` are never visible under a package
    name; ``publish`` never overwrites, ``replace`` swaps atomically; ``sweep`` drops what
    no event published. Names are checked by ``odst.naming`` before they get here."""

    tmp: Path

    def ensure(self) -> None: ...

    def path(self, name: str) -> Path: ...

    def new_temp(self, suffix: str = ".part") -> Path: ...

    def free_bytes(self) -> int: ...

    def reserve_bytes(self) -> int: ...

    def publishing(self, name: str, file: Path | None = None) -> ContextManager[None]: ...

    def is_publishing(self, name: str, max_age_s: float = 600) -> bool: ...

    def left_behind(self, name: str, blake3: str) -> bool: ...

    def publish(self, temp: Path, name: str) -> Path: ...

    def publishing_upload(self, temp: Path, name: str) -> contextlib.AbstractAsyncContextManager[Path]: ...

    def publish_small(self, temp: Path, fd: int, name: str) -> int | None: ...

    def published_upload(self, name: str) -> contextlib.AbstractAsyncContextManager[Path]: ...

    def unpublish(self, name: str, inode: int) -> None: ...

    def replace(self, temp: Path, name: str) -> Path: ...

    def replace_many(self, items: list[tuple[Path, str]]) -> list[Path | OSError]: ...

    def remove(self, name: str) -> bool: ...

    def adopt_spellings(self, held: dict[str, str]) -> list[str]: ...

    def sweep(self, published: set[str], older_than_s: float = 0) -> list[str]: ...


class Store:
    """The package store on a local file system (the one ``PackageStore``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.packages = self.root / "packages"
        self._thread_sync = ThreadGroupSync(self.packages)
        self._reserve: int | None = None  # reserve_bytes, once known

    def ensure(self) -> None:
        for d in (self.tmp, self.packages):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o077:  # made by an older ODST, or by hand
                d.chmod(0o700)

    def path(self, name: str) -> Path:
        """The file of the package any spelling of ``name`` stands for: always a file of
        packages/ (PackageNameInvalid for a name that would be another one, or none)."""
        key = name_key(name)
        if "/" in key or "\0" in key or key in ("", ".", ".."):
            raise PackageNameInvalid(f"package name {name!r} is not a file name")
        return self.packages / key

    def new_temp(self, suffix: str = ".part") -> Path:
        return self.tmp / f"{secrets.token_hex(12)}{suffix}"

    def free_bytes(self) -> int:
        st = os.statvfs(self.tmp)
        return st.f_bavail * st.f_frsize

    def _marker(self, name: str) -> Path:
        return self.tmp / (hashlib.sha256(name_key(name).encode("utf-8")).hexdigest() + ".publishing")

    @contextlib.contextmanager
    def publishing(self, name: str, file: Path | None = None):
        """Mark ``name`` as being published (file placed, event not folded yet), for every
        process on this store: the janitor leaves such a file alone. With ``file`` (the file
        about to be put in place as ``name``: the replicator's batches) the name's marker is a
        second name of that file (a hard link, as ``publish_small`` makes), not a file of its
        own: no inode is made and freed per file. On ext4 without a journal each file created
        steps past every inode freed in the last seconds, reading its table block (perf: a
        fifth of a catch-up's CPU went there, with a marker made and removed per package
        pulled); such a marker's time is the file's last write. A name another publisher holds
        is marked with a marker of this one's own beside it (``_claim_marker``); each removes
        only its own."""
        own = _claim_marker(self._marker(name), file)
        try:
            yield
        finally:
            own.unlink(missing_ok=True)

    def is_publishing(self, name: str, max_age_s: float = 600) -> bool:
        """A marker of the name younger than ``max_age_s`` (older: a crashed publisher's): the
        name's own, or one a second publisher made while that was held (``_claim_marker``)."""
        marker = self._marker(name)
        now = time.time()
        for found in (marker, *self.tmp.glob(f"{marker.stem}.*.publishing")):
            try:
                if now - found.stat().st_mtime < max_age_s:
                    return True
            except FileNotFoundError:
                pass
        return False

    def left_behind(self, name: str, blake3: str) -> bool:
        """The file under ``name`` holds ``blake3`` (its label) and no publisher marks it: what an
        upload of those bytes left when the log did not answer (AppendUnconfirmed keeps the
        file), or a crash between the link and the event. An upload of the same bytes may take
        it for its own; any other content there is not this upload's to touch."""
        if self.is_publishing(name):
            return False
        try:
            fd = os.open(self.path(name), os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            return content_tag(fd) == blake3
        finally:
            os.close(fd)

    def reserve_bytes(self) -> int:
        """Space kept free for the event log and temp files: 2% of the file system, at most 64 MiB
        (the file system's size, read once: not a statvfs per upload)."""
        if self._reserve is None:
            st = os.statvfs(self.tmp)
            self._reserve = min(64 << 20, st.f_blocks * st.f_frsize // 50)
        return self._reserve

    def publish(self, temp: Path, name: str) -> Path:
        """Move a complete, fsynced temp file to packages/<name>; never overwrites."""
        dest = self.path(name)
        os.chmod(temp, PACKAGE_MODE)  # whoever wrote it, and under whatever umask
        os.link(temp, dest)  # FileExistsError if a file is already published there
        os.unlink(temp)
        _fsync_dir(self.packages)
        return dest

    @contextlib.asynccontextmanager
    async def publishing_upload(self, temp: Path, name: str):
        """``publishing(name)`` around ``publish`` of a temp file written but not fsynced
        (``StreamingUpload.finish(fsync=False)``), for an upload, in ONE hand-off to a pool thread and with no file operation on the event loop
        but the marker's removal (each may wait for the journal while other uploads' fsyncs
        commit it): the marker is made, the temp file linked in (FileExistsError if a file is
        there: nothing else changed), dropped and fsynced, then packages/ fsynced together with
        every upload that linked meanwhile (``ThreadGroupSync``). The block runs with the file
        durable under its name (the event's append); the marker goes when it ends."""
        dest, own = await asyncio.get_running_loop().run_in_executor(_STORE_POOL, self._mark_and_link, temp, name)
        try:
            yield dest
        finally:
            own.unlink(missing_ok=True)

    def publish_small(self, temp: Path, fd: int, name: str) -> int | None:
        """On a pool thread, in the job that wrote ``temp`` (``StreamingUpload.finish_publishing``,
        ``fd`` still open on it): what ``publishing_upload`` does, in the same order, without a
        hand-off of its own: the marker made (O_EXCL), the temp file linked in as ``name``,
        fsynced (through ``fd``), packages/ fsynced with every upload that linked meanwhile;
        returns the file's inode. None, with nothing changed, if the name's marker or file is there (another publisher,
        a package already stored): the caller goes the long way. Done before the upload is
        decided, so the caller ends it with ``published_upload`` or ``unpublish``.

        The marker is a second name of the upload's own file (a hard link: as exclusive as
        O_CREAT|O_EXCL), not a file of its own: no inode made and freed per upload, and an open
        and a close fewer (ext4's allocator steps past each inode freed in the last seconds,
        reading its table block: perf showed that in a run of small uploads). Its mtime is the
        upload's last write, so ``is_publishing`` sees it fresh; the upload's end removes the
        name, not the file. Another publisher of the name meanwhile marks it with a marker of
        its own (``_claim_marker``), leaving this one and its file's time alone."""
        marker = self._marker(name)
        dest = self.path(name)
        try:
            os.link(temp, marker)
        except FileExistsError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_mode & 0o7777 != PACKAGE_MODE:  # made with PACKAGE_MODE: only an odd umask takes bits off
                os.fchmod(fd, PACKAGE_MODE)
            try:
                os.link(temp, dest)
            except FileExistsError:
                marker.unlink(missing_ok=True)
                return None
            os.unlink(temp)
            try:
                os.fsync(fd)
                self._thread_sync.sync()
            except BaseException:
                dest.unlink(missing_ok=True)
                raise
        except BaseException:
            marker.unlink(missing_ok=True)
            raise
        return st.st_ino

    @contextlib.asynccontextmanager
    async def published_upload(self, name: str):
        """The rest of ``publishing_upload`` for a file ``publish_small`` published: the block runs
        with the file durable under its name and the marker held; the marker goes when it ends."""
        try:
            yield self.path(name)
        finally:
            self._marker(name).unlink(missing_ok=True)

    def unpublish(self, name: str, inode: int) -> None:
        """Undo ``publish_small`` of an upload refused once decided: its file (if the name still
        holds that ``inode``) and its marker go. An unannounced file left by a crash here is
        swept at the next start, as any other."""
        try:
            if os.stat(self.path(name)).st_ino == inode:
                self.path(name).unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        self._marker(name).unlink(missing_ok=True)

    def _mark_and_link(self, temp: Path, name: str) -> tuple[Path, Path]:
        dest = self.path(name)
        own = _claim_marker(self._marker(name))
        try:
            os.chmod(temp, PACKAGE_MODE)
            os.link(temp, dest)  # FileExistsError if a file is already published there
            os.unlink(temp)
            try:
                _fsync_file(dest)
                self._thread_sync.sync()
            except BaseException:
                dest.unlink(missing_ok=True)
                raise
        except BaseException:
            own.unlink(missing_ok=True)  # (another publisher's marker stays: its file is not folded yet)
            raise
        return dest, own

    def replace(self, temp: Path, name: str) -> Path:
        """Atomically put a verified temp file at packages/<name>, replacing what was there."""
        dest = self.path(name)
        os.chmod(temp, PACKAGE_MODE)
        os.replace(temp, dest)
        _fsync_dir(self.packages)
        return dest

    def replace_many(self, items: list[tuple[Path, str]]) -> list[Path | OSError]:
        """``replace`` for several (temp, name): each renamed in place, then ONE fsync of
        packages/ makes them all durable before this returns (as ``replace`` does for one).
        Per item its path, or the OSError that left it out (the others still go)."""
        out: list[Path | OSError] = []
        for temp, name in items:
            dest = self.path(name)
            try:
                os.chmod(temp, PACKAGE_MODE)
                os.replace(temp, dest)
            except OSError as exc:
                out.append(exc)
            else:
                out.append(dest)
        if any(isinstance(r, Path) for r in out):
            _fsync_dir(self.packages)
        return out

    def swap(self, temp: Path, name: str) -> Path | None:
        """Like ``replace``, but keep the previous file as a hard link in tmp/ (returned), so
        the caller can ``swap_back`` if what the swap stands for cannot be recorded."""
        backup = self.new_temp(".old")
        try:
            os.link(self.path(name), backup)
        except FileNotFoundError:
            backup = None
        self.replace(temp, name)
        return backup

    def swap_back(self, backup: Path | None, name: str) -> None:
        """Undo a ``swap``: the previous file again, or none if there was none."""
        if backup is None:
            self.remove(name)
        else:
            self.replace(backup, name)

    def remove(self, name: str) -> bool:
        try:
            os.unlink(self.path(name))
        except FileNotFoundError:
            return False
        _fsync_dir(self.packages)
        return True

    def adopt_spellings(self, held: dict[str, str]) -> list[str]:
        """Start-up, once after an upgrade: files an older ODST named by spelling take their key's
        name (see ``path``). ``held`` maps key -> blake3 of the content the read model says this
        site holds. Where several files map to one key (spellings that were two packages), each
        is hashed and only the one holding ``held[key]`` is kept; the others are left to
        ``sweep``. Returns what was renamed, as 'old -> new'."""
        groups: dict[str, list[Path]] = {}
        for p in self.packages.iterdir():
            groups.setdefault(name_key(p.name), []).append(p)
        renamed = []
        for key, files in groups.items():
            if len(files) == 1 and files[0].name == key:
                continue
            keep = files[0] if len(files) == 1 else next(
                (p for p in files if key in held and hash_file(p).blake3 == held[key]), None)
            if keep is None or keep.name == key:
                continue
            os.replace(keep, self.packages / key)
            renamed.append(f"{keep.name} -> {key}")
        if renamed:
            _fsync_dir(self.packages)
            log.warning("package files renamed to the keys of their names", files=renamed)
        return renamed

    def sweep(self, published: set[str], older_than_s: float = 0) -> list[str]:
        """Start-up clean-up: drop upload temp files, publishing markers a killed publisher left
        (``publishing``) and any file no event ever published (``published``: keys, as
        views.published_names gives them).

        With other processes on the same store, only files untouched for
        ``older_than_s`` are taken: a younger one may be another gateway's upload.
        """
        removed: list[str] = []
        cutoff = time.time() - older_than_s

        def old(p: Path) -> bool:
            try:
                return p.stat().st_mtime <= cutoff
            except FileNotFoundError:
                return False
        for p in [*self.tmp.glob("*.part"), *self.tmp.glob("*.old"), *self.tmp.glob("*.publishing")]:
            if not old(p):
                continue
            p.unlink(missing_ok=True)
            removed.append(f"tmp/{p.name}")
        for p in self.packages.iterdir():
            if p.name not in published and old(p):
                p.unlink(missing_ok=True)
                removed.append(f"packages/{p.name}")
        if removed:
            log.warning("swept files left by an interrupted write", files=removed)
        return removed


def _claim_marker(marker: Path, file: Path | None = None) -> Path:
    """Mark a name as being published by this publisher; returns the marker to remove when done:
    the name's ``marker`` (made as a hard link to ``file`` if given, else as an empty file), or,
    while another publisher holds that, one of this publisher's own beside it
    (``<marker>.<random>.publishing``). Each publisher removes only its own, so the name stays
    marked while any of them publishes (a shared marker taken away by whichever ended first
    left the other's file unmarked: the janitor could sweep it before its fold)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        if file is not None:
            os.link(file, marker)
        else:
            os.close(os.open(marker, flags, 0o600))
        return marker
    except FileExistsError:
        own = marker.with_name(f"{marker.stem}.{secrets.token_hex(8)}.publishing")
        os.close(os.open(own, flags, 0o600))
        return own


class ThreadGroupSync:
    """fsync one directory on behalf of many callers on threads: ``sync`` returns once an fsync
    of the directory that started after the call has ended; whoever finds none running starts
    one, the others wait for it (several links, one fsync). The directory stays open from the
    first fsync on (closed with this object; the store's directories are never replaced while
    it runs): an open and a close fewer per round, each a syscall a pool thread gives the GIL
    up for and, with the GIL busy, a wait to get it back."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._cv = threading.Condition()
        self._started = 0  # fsyncs started
        self._done = 0  # fsyncs ended (their outcome in _failed)
        self._running = False
        self._failed: dict[int, BaseException] = {}

    def sync(self) -> None:
        with self._cv:
            mine = self._started + 1  # the first fsync to start from now on
            while self._done < mine:
                if self._running:
                    self._cv.wait()
                    continue
                self._running = True
                self._started += 1
                round_, error = self._started, None
                self._cv.release()
                try:
                    if self._fd is None:
                        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
                        weakref.finalize(self, os.close, self._fd)
                    _fsync_open_dir(self._fd)
                except BaseException as exc:  # noqa: BLE001 - every waiter of this round gets it
                    error = exc
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._done = round_
                    if error is not None:  # kept: a waiter of this round may wake after the next
                        self._failed[round_] = error
                    self._cv.notify_all()
            if mine in self._failed:
                raise self._failed[mine]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_open_dir(fd: int) -> None:
    """fsync a directory ``ThreadGroupSync`` holds open."""
    os.fsync(fd)


# Tuned on a 2-core VM (bench/run.py): a 1 MiB write(2) of bytes that are no longer in the
# CPU cache costs ~3x the CPU of four 256 KiB ones, and each hash reading a piece while another
# hash just read it finds it in cache; a hand-off to a thread costs ~20-50 us, so pieces travel
# in batches.
BATCH_BYTES = 256 << 10  # pieces handed to the hash/write threads together; the largest write(2)
SMALL_BYTES = 256 << 10  # a body no larger is written, hashed and fsynced in one hand-off
MAX_BACKLOG = 8 << 20  # bytes handed to the threads and not done yet: memory stays flat
WRITEBACK_BYTES = 8 << 20  # start the disk write of every this many bytes (the final fsync waits less)
# A large body goes to its temp file with O_DIRECT (``_DirectWrites``), as the puller's chunks
# do: buffered, ext4's page-cache copy, buffer heads and writeback cost 0.47 of the upload's
# 3.9 CPU-s/GiB (perf, 1 GiB PUT on the 2-core VM). The bytes are copied into reused
# page-aligned blocks of DIRECT_BYTES (a copy of bytes just hashed, still in cache), which a
# thread of their own writes while the hashing thread fills the next of DIRECT_BLOCKS.
DIRECT_ALIGN = 4096  # O_DIRECT's unit of offset, length and memory address
DIRECT_BYTES = 4 << 20  # 1 MiB: 0.20-0.22 CPU-s/GiB written, 4 MiB: 0.16 (buffered: 0.40-0.84)
DIRECT_BLOCKS = 3  # one filled, one written, one spare: 12 MiB per large upload

# Small uploads share these threads (no thread is started per upload); several fsyncs in flight
# at once are one journal commit on ext4/xfs.
_STORE_POOL = ThreadPoolExecutor(8, thread_name_prefix="odst-store")


def _libc(name: str, argtypes: list):
    """libc's function ``name`` taking ``argtypes`` and returning an int (errno kept), or None
    where there is none (not Linux, or an older libc)."""
    import ctypes.util
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


def _start_writeback():
    """``sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE)``: start writing those dirty pages
    to disk now, without waiting, so the fsync at the end has little left to do. None where the
    call does not exist (not Linux): then the fsync does it all, as before."""
    import ctypes
    fn = _libc("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    if fn is None:
        return None

    def start(fd: int, offset: int, n: int) -> None:
        fn(fd, offset, n, 2)  # SYNC_FILE_RANGE_WRITE; a failure leaves the work to fsync
    return start


_writeback = _start_writeback()
start_writeback = _writeback  # the same, for the puller's chunk writes (None where unsupported)


def _preallocate():
    """``fallocate(fd, 0, 0, size)``: the file's blocks allocated at once, before its chunks
    are written at their offsets by several threads. Into a sparse file, concurrent O_DIRECT
    writes each allocate and contend for the inode (ext4 on a 2-core VM, 1 GiB in 1 MiB writes
    from four threads: 0.58-0.61 s sparse, 0.51-0.56 s preallocated; one thread 0.52-0.56 s
    either way). The space is also taken up front: a full disk fails the pull at its start.
    No-op where the call is missing or the file system has none (the writes allocate then, as
    before); glibc's posix_fallocate is not used, as it would write zeros over the whole file
    there instead."""
    import ctypes
    fn = _libc("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64])
    if fn is None:
        return lambda fd, size: None

    def preallocate(fd: int, size: int) -> None:
        if size and fn(fd, 0, 0, size) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err))  # ENOSPC: the pull fails now, not mid-way
    return preallocate


preallocate = _preallocate()


def _store_error(exc: OSError) -> Exception:
    """A write's OSError as the upload reports it: no space is StoreFull (507), anything else itself."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StoreFull(f"no space left on the store: {exc.strerror}")
    return exc


def open_direct(path: Path) -> int:
    """A second descriptor of a (just created) temp file for O_DIRECT writes, or -1 where the
    file system (or the platform) has none: then it is written buffered (an upload's body, a
    pull's chunks)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return -1


class _DirectWrites:
    """A large body's bytes, given in order in pieces of any size (``add``, on the hashing
    thread), written to the temp file with O_DIRECT from DIRECT_BLOCKS reused page-aligned
    blocks of DIRECT_BYTES: ``add`` copies into the current block and hands each full one to a
    thread of its own, which writes it and gives it back (``add`` waits for a free one: the
    writes pace the hashing). ``finish`` writes the last block's aligned part the same way and
    returns its unaligned rest, for a buffered write. The writer owns ``fd`` and closes it when
    it ends. A failed write is kept (``error``) and raised by the next ``add`` or by ``finish``;
    the writer still gives blocks back, so ``add`` never waits for ever."""

    def __init__(self, fd: int):
        self._fd = fd
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(DIRECT_BLOCKS):
            self._free.put(mmap.mmap(-1, DIRECT_BYTES))
        self._full: queue.SimpleQueue = queue.SimpleQueue()
        self._block: mmap.mmap | None = None
        self._at = 0  # bytes in the current block
        self._offset = 0  # the file offset of the current block
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="odst-write", daemon=True)
        self._thread.start()

    def add(self, piece: bytes | memoryview) -> None:
        view = memoryview(piece)
        while view:
            if self._block is None:
                self._block = self._free.get()
            if self.error is not None:
                raise self.error
            n = min(len(view), DIRECT_BYTES - self._at)
            self._block[self._at:self._at + n] = view[:n]
            self._at += n
            view = view[n:]
            if self._at == DIRECT_BYTES:
                self._full.put((self._block, DIRECT_BYTES, self._offset))
                self._block, self._at = None, 0
                self._offset += DIRECT_BYTES

    def finish(self) -> tuple[bytes, int]:
        """After the last ``add``: the writer done (its error raised), and (the bytes left past
        the last DIRECT_ALIGN boundary, their file offset) for the caller to write buffered."""
        rest, at = b"", self._offset
        if self._block is not None:
            aligned = self._at - self._at % DIRECT_ALIGN
            rest, at = self._block[aligned:self._at], self._offset + aligned
            if aligned:
                self._full.put((self._block, aligned, self._offset))
        self.stop()
        self._thread.join()
        if self.error is not None:
            raise self.error
        return rest, at

    def stop(self) -> None:
        """No more blocks: the writer ends (and closes its descriptor) after those queued."""
        self._full.put(None)

    def _run(self) -> None:
        try:
            while (item := self._full.get()) is not None:
                block, length, offset = item
                if self.error is None:
                    try:
                        self._write(block, length, offset)
                    except BaseException as exc:  # noqa: BLE001 - raised to the upload by add/finish
                        self.error = exc
                self._free.put(block)
        finally:
            os.close(self._fd)
            self._unmap()

    def _unmap(self) -> None:
        """The blocks given back now, at once: the upload and its lanes refer to each other, so
        left to the garbage collector its 12 MiB outlived it until a full collection (seen
        reaching 245 MB after 20 uploads). Stopped, no ``add`` runs any more (the hashing lane
        has ended, or ``finish`` took the last bytes): the block it held goes too."""
        blocks = [self._block] if self._block is not None else []
        self._block = None
        while True:
            try:
                blocks.append(self._free.get_nowait())
            except queue.Empty:
                break
        for block in blocks:
            with contextlib.suppress(BufferError):  # still viewed somewhere: the collector's then
                block.close()

    def _write(self, block: mmap.mmap, length: int, offset: int) -> None:
        view = memoryview(block)[:length]
        while view:
            try:
                n = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self._direct_off():
                    raise _store_error(exc) from exc
                continue  # a file system that opened with O_DIRECT but refuses its writes
            view, offset = view[n:], offset + n

    def _direct_off(self) -> bool:
        """Clear O_DIRECT on the descriptor (the writes go on buffered); False if it was clear."""
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        if not flags & os.O_DIRECT:
            return False
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
        log.info("O_DIRECT write refused; writing the upload buffered")
        return True


class _Lane:
    """One thread applying ``step`` to each batch handed to it, in order; ``done`` counts the
    bytes of the batches it finished. After a failure it only counts (``error`` says why)."""

    def __init__(self, name: str, step, on_done):
        self.step, self.on_done = step, on_done
        self.done = 0
        self.exited = False
        self.error: BaseException | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def put(self, batch: list, n: int) -> None:
        self._queue.put((batch, n))

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                batch, n = item
                if self.error is None:
                    try:
                        self.step(batch)
                    except BaseException as exc:  # noqa: BLE001 - reported by the upload
                        self.error = exc
                self.done += n
                self.on_done(None)
        finally:
            self.exited = True
            self.on_done(self)


class StreamingUpload:
    """Write a stream to a temp file while computing its manifest (and the Jamf digests asked
    for), off the event loop, reading each byte into the CPU once per thread.

    Pieces arrive in any size and are never re-split or joined. A body of at most SMALL_BYTES
    is written, hashed, labelled (``tag``) and fsynced in one hand-off to a shared pool. A larger
    one goes, in batches of BATCH_BYTES, to two threads of its own: SHA-512 (+ Jamf digests) and
    blake3 | whole-file SHA1, chunk SHA1s and the write: with O_DIRECT through a third thread
    (``_DirectWrites``) where the store's file system takes it, else buffered (in pieces of at
    most BATCH_BYTES) with the disk write of every WRITEBACK_BYTES started early. At most MAX_BACKLOG bytes wait for
    the threads, so memory stays flat and the socket gets back-pressure. ``finish`` labels the
    file with its blake3 and fsyncs it: the file is durable when it returns (unless asked not
    to: then the caller fsyncs it, as ``Store.publishing_upload`` does).

    The temp file is created by the first thread that writes to it (a small body's pool job,
    or the first hand-off to the lanes), never by the event loop: creating a file waits for
    the file system's journal while other uploads' fsyncs commit it.
    """

    def __init__(self, path: Path, chunk_size: int = CHUNK_SIZE, extra_digests: Iterable[str] = (), *,
                 batch_bytes: int = BATCH_BYTES, small_bytes: int = SMALL_BYTES):
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.batch_bytes, self.small_bytes = batch_bytes, small_bytes
        self._fd: int | None = None  # opened by _open, on the first thread that writes
        self._fsync = True  # finish(fsync=False): the caller fsyncs the file
        self._aborted = False
        self._users = 1  # who still holds the fd: this object, and a thread writing to it
        self._fd_lock = threading.Lock()
        self._hasher = ManifestHasher(chunk_size, extra_digests)
        self._batch: list[bytes] = []
        self._batched = 0
        self._lanes: list[_Lane] = []
        self._direct: _DirectWrites | None = None  # a large body's O_DIRECT writes, if the store takes them
        self._written = 0  # by the writer lane
        self._synced_to = 0  # writeback started up to here
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future | None = None
        self._wait_below = 0
        self.size = 0  # bytes handed to the threads
        self._closed = False

    # ------------------------------------------------------------ the threads' side

    def _open(self) -> None:
        """Create the temp file (once; on a pool thread for a small body). An upload aborted
        meanwhile finds its temp file gone: one made after the abort is removed here."""
        with self._fd_lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PACKAGE_MODE)
        if self._aborted:
            self.path.unlink(missing_ok=True)
            raise UploadAborted()

    def _write(self, piece: bytes | memoryview) -> None:
        view = memoryview(piece)
        while view:
            try:
                n = os.write(self._fd, view[:self.batch_bytes])
            except OSError as exc:
                raise _store_error(exc) from exc
            view = view[n:]
        self._written += len(piece)

    def _hash_a(self, batch: list) -> None:
        for piece in batch:
            self._hasher.update_sha512_blake3(piece)

    def _hash_b_write(self, batch: list) -> None:
        if self._direct is not None:
            for piece in batch:  # each piece hashed twice and copied while it is in this CPU's cache
                self._hasher.update_sha1s(piece)
                self._direct.add(piece)
            return
        for piece in batch:
            self._hasher.update_sha1s(piece)
            self._write(piece)
        if _writeback is not None and self._written - self._synced_to >= WRITEBACK_BYTES:
            _writeback(self._fd, self._synced_to, self._written - self._synced_to)
            self._synced_to = self._written

    def _lane_done(self, exited: _Lane | None) -> None:
        """On a lane's thread, after each batch and once when it ends: wake the event loop if
        it waits for this."""
        if exited is not None and exited.step == self._hash_b_write:
            self._release_fd()  # the writer's hold
            if self._aborted and self._direct is not None:
                self._direct.stop()  # (finish() stops it once the last block is queued)
        waiter = self._waiter
        if waiter is not None and (exited is not None or self._backlog() <= self._wait_below
                                   or any(lane.error for lane in self._lanes)):
            self._loop.call_soon_threadsafe(_wake, waiter)

    def _backlog(self) -> int:
        return self.size - min((lane.done for lane in self._lanes), default=self.size)

    def _release_fd(self) -> None:
        with self._fd_lock:
            self._users -= 1
            if self._users == 0 and self._fd is not None:
                os.close(self._fd)

    def _small(self, batch: list) -> Manifest:
        """The whole of a small body, on a pool thread: write, hash, label, fsync (holding the fd)."""
        try:
            self._write_hashed(batch)
        except BaseException:
            self._release_fd()
            raise
        return self._last()

    def _write_hashed(self, batch: list) -> None:
        self._open()
        for piece in batch:
            self._write(piece)
            self._hasher.update_sha512_blake3(piece)
            self._hasher.update_sha1s(piece)

    def _small_published(self, batch: list, publish) -> tuple[Manifest, int | None]:
        """``_small`` and ``_last`` (unfsynced) and then ``publish(path, fd)``, in one pool job."""
        try:
            self._write_hashed(batch)
            manifest = self._hasher.manifest()
            tag(self.path, manifest.blake3)
            return manifest, publish(self.path, self._fd)
        finally:
            self._release_fd()

    def _last(self) -> Manifest:
        """After the lanes (or a small body's writes), on a pool thread: label and fsync (holding
        the fd; for a large body the writer lane started most of the writeback already)."""
        try:
            if self._direct is not None:
                self._write_rest(*self._direct.finish())
            manifest = self._hasher.manifest()
            tag(self.path, manifest.blake3)
            if self._fsync:
                os.fsync(self._fd)
            return manifest
        finally:
            self._release_fd()

    def _write_rest(self, rest: bytes, offset: int) -> None:
        """The bytes of a body written with O_DIRECT that end past its last aligned block."""
        while rest:
            try:
                n = os.pwrite(self._fd, rest, offset)
            except OSError as exc:
                raise _store_error(exc) from exc
            rest, offset = rest[n:], offset + n

    async def _on_pool(self, job, *args) -> Manifest:
        with self._fd_lock:
            self._users += 1  # the job's hold: a cancelled wait must not close the fd under it
        done = _STORE_POOL.submit(job, *args)
        try:
            return await asyncio.wrap_future(done)
        except asyncio.CancelledError:
            if done.cancel() or done.cancelled():  # never ran (the pool was busy): its hold is ours
                self._release_fd()
            raise

    # ------------------------------------------------------------ the event loop's side

    def _raise_lane_error(self) -> None:
        for lane in self._lanes:
            if lane.error is not None:
                raise lane.error

    async def _wait(self, below: int) -> None:
        """Until at most ``below`` bytes wait for the threads (or one failed)."""
        while self._backlog() > below:
            self._raise_lane_error()
            self._wait_below = below
            self._waiter = self._loop.create_future()
            if self._backlog() > below and not any(lane.error for lane in self._lanes):
                await self._waiter  # a lane wakes it (the check above closes the race)
            self._waiter = None
        self._raise_lane_error()

    def _hand_off(self) -> None:
        if not self._lanes:
            self._loop = asyncio.get_running_loop()
            self._open()  # a large body: once, here, before the lanes write
            direct = open_direct(self.path)
            if direct >= 0:
                try:
                    self._direct = _DirectWrites(direct)
                except BaseException:  # no memory for its blocks, no thread: written buffered
                    os.close(direct)
                    log.warning("O_DIRECT writer not started; writing the upload buffered", exc_info=True)
            with self._fd_lock:
                self._users += 1  # the writer lane's
            self._lanes = [_Lane("odst-hash-a", self._hash_a, self._lane_done),
                           _Lane("odst-hash-b", self._hash_b_write, self._lane_done)]
        batch, n = self._batch, self._batched
        self._batch, self._batched = [], 0
        self.size += n
        for lane in self._lanes:
            lane.put(batch, n)

    async def feed(self, piece: bytes | memoryview) -> None:
        """Take a piece (kept, not copied, until the threads are done with it: a memoryview's
        buffer must not change while it is held)."""
        if not piece:
            return
        self._batch.append(piece)
        self._batched += len(piece)
        if self._lanes:
            if self._batched >= self.batch_bytes:
                self._hand_off()
                if self.size - min(lane.done for lane in self._lanes) > MAX_BACKLOG:
                    await self._wait(MAX_BACKLOG // 2)
        elif self._batched > self.small_bytes:  # not a small body after all: start the threads
            self._hand_off()

    async def finish(self, *, fsync: bool = True) -> Manifest:
        """Every byte written, hashed, labelled with its blake3 and (unless ``fsync`` is False:
        then the caller must) fsynced: the manifest."""
        self._fsync = fsync
        if not self._lanes:
            batch, self._batch = self._batch, []
            self.size, self._batched = self._batched, 0
            manifest = await self._on_pool(self._small, batch)
        else:
            if self._batch:
                self._hand_off()
            await self._wait(0)
            for lane in self._lanes:
                lane.stop()
            manifest = await self._on_pool(self._last)
        self._close()
        return manifest

    async def finish_publishing(self, store: "Store", name: str) -> tuple[Manifest, int | None]:
        """``finish(fsync=False)``, and for a small body, in the same hand-off to the pool,
        ``store.publish_small(name)``: (manifest, the published file's inode) — the marker held, to be
        ended with ``store.published_upload`` or ``store.unpublish`` — or (manifest, None) when
        the body was large or the name was taken (the temp file unfsynced, as ``finish`` leaves
        it). One pool job and one wake of the event loop instead of two for a small upload."""
        if self._lanes:
            return await self.finish(fsync=False), None
        self._fsync = False
        batch, self._batch = self._batch, []
        self.size, self._batched = self._batched, 0
        with self._fd_lock:
            self._users += 1  # the job's hold, as _on_pool takes it
        result = await asyncio.get_running_loop().run_in_executor(
            _STORE_POOL, self._small_published, batch, lambda temp, fd: store.publish_small(temp, fd, name))
        self._close()
        return result

    @property
    def extra_digests(self) -> dict[str, str]:
        """After finish(): the Jamf Pro hashes asked for besides SHA-512 ({} when none)."""
        return self._hasher.extra_digests()

    @property
    def received(self) -> int:
        """Bytes taken in so far, including those not handed to the threads yet."""
        return self.size + self._batched

    def abort_now(self) -> None:
        """Delete the temp file without waiting (the task is being cancelled); a thread still
        busy with it finishes on an unlinked file, and the last one out closes it."""
        self._aborted = True
        for lane in self._lanes:
            lane.error = lane.error or UploadAborted()
            lane.stop()
        self._stop_direct()
        self._close()
        self.path.unlink(missing_ok=True)

    async def abort(self) -> None:
        """Stop, wait for in-flight work, delete the temp file."""
        self._aborted = True
        for lane in self._lanes:
            lane.error = lane.error or UploadAborted()
            lane.stop()
        if self._lanes:
            self._loop = asyncio.get_running_loop()
            while not all(lane.exited for lane in self._lanes):
                self._wait_below = -1
                self._waiter = self._loop.create_future()
                if not all(lane.exited for lane in self._lanes):
                    await self._waiter
                self._waiter = None
        self._stop_direct()
        self._close()
        self.path.unlink(missing_ok=True)

    def _stop_direct(self) -> None:
        """Aborted once the hashing lane has ended (as ``finish`` does, which an abort may come
        in place of: ``finish`` cancelled while its last job waited for a pool thread): the
        O_DIRECT writer ends and lets its descriptor and blocks go. While that lane runs, it
        stops the writer itself as it ends (``_lane_done``): stopped earlier, its ``add`` could
        wait for ever for a block. A second stop is harmless."""
        if self._direct is not None and all(lane.exited for lane in self._lanes
                                            if lane.step == self._hash_b_write):
            self._direct.stop()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release_fd()


class UploadAborted(Exception):
    """The upload was abandoned; its threads skip what is left."""


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
