"""Files on disk: streaming uploads into temp files, atomic publish, removal, sweeping.

Layout under the store root::

    tmp/<random>.part        uploads and downloads in progress (never served)
    packages/<key>           verified packages: the public distribution directory

A package's file is named by the key of its name (odst.naming.name_key: NFD + case fold),
never by a spelling: every spelling of a name maps to the one file, and one file is one
package. Callers pass any spelling; ``path`` folds it.

Writes go temp file -> fsync -> link into packages/ (no clobber) -> fsync dir.

Both directories are 0700 and package files 0600, owned by ODST's user: a front end that
serves packages/ itself (deploy/nginx/odst.conf) runs as that same user.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import secrets
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ContextManager, Protocol

import structlog

from odst.naming import name_key
from odst.store.hashing import CHUNK_SIZE, Manifest, ManifestHasher, Rechunker, hash_file

log = structlog.get_logger("odst.store")

MAX_INFLIGHT_BLOCKS = 8
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

    def publishing(self, name: str) -> ContextManager[None]: ...

    def is_publishing(self, name: str, max_age_s: float = 600) -> bool: ...

    def publish(self, temp: Path, name: str) -> Path: ...

    def replace(self, temp: Path, name: str) -> Path: ...

    def remove(self, name: str) -> bool: ...

    def adopt_spellings(self, held: dict[str, str]) -> list[str]: ...

    def sweep(self, published: set[str], older_than_s: float = 0) -> list[str]: ...


class Store:
    """The package store on a local file system (the one ``PackageStore``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.packages = self.root / "packages"

    def ensure(self) -> None:
        for d in (self.tmp, self.packages):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            if d.stat().st_mode & 0o077:  # made by an older ODST, or by hand
                d.chmod(0o700)

    def path(self, name: str) -> Path:
        """The file of the package any spelling of ``name`` stands for."""
        return self.packages / name_key(name)

    def new_temp(self, suffix: str = ".part") -> Path:
        return self.tmp / f"{secrets.token_hex(12)}{suffix}"

    def free_bytes(self) -> int:
        st = os.statvfs(self.tmp)
        return st.f_bavail * st.f_frsize

    def _marker(self, name: str) -> Path:
        return self.tmp / (hashlib.sha256(name_key(name).encode("utf-8")).hexdigest() + ".publishing")

    @contextlib.contextmanager
    def publishing(self, name: str):
        """Mark ``name`` as being published (file placed, event not folded yet), for every
        process on this store: the janitor leaves such a file alone."""
        marker = self._marker(name)
        marker.touch()
        try:
            yield
        finally:
            marker.unlink(missing_ok=True)

    def is_publishing(self, name: str, max_age_s: float = 600) -> bool:
        try:
            return time.time() - self._marker(name).stat().st_mtime < max_age_s  # older: a crashed publisher
        except FileNotFoundError:
            return False

    def reserve_bytes(self) -> int:
        """Space kept free for the event log and temp files: 2% of the file system, at most 64 MiB."""
        st = os.statvfs(self.tmp)
        return min(64 << 20, st.f_blocks * st.f_frsize // 50)

    def publish(self, temp: Path, name: str) -> Path:
        """Move a complete, fsynced temp file to packages/<name>; never overwrites."""
        dest = self.path(name)
        os.chmod(temp, PACKAGE_MODE)  # whoever wrote it, and under whatever umask
        os.link(temp, dest)  # FileExistsError if a file is already published there
        os.unlink(temp)
        _fsync_dir(self.packages)
        return dest

    def replace(self, temp: Path, name: str) -> Path:
        """Atomically put a verified temp file at packages/<name>, replacing what was there."""
        dest = self.path(name)
        os.chmod(temp, PACKAGE_MODE)
        os.replace(temp, dest)
        _fsync_dir(self.packages)
        return dest

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
        """Start-up clean-up: drop upload temp files and any file no event ever published
        (``published``: keys, as views.published_names gives them).

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
        for p in [*self.tmp.glob("*.part"), *self.tmp.glob("*.old")]:
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StreamingUpload:
    """Write a stream to a temp file while computing its manifest, off the event loop.

    Bytes arrive in pieces of any size; a hashing.Rechunker re-splits them into
    chunk-sized blocks and each block goes, in order, to three single-thread
    executors, one per lane of the hashing.ManifestHasher: SHA-512 | whole-file
    SHA1 + blake3 | write + chunk SHA1. At most MAX_INFLIGHT_BLOCKS blocks are in
    flight, so memory stays flat and the socket gets back-pressure.
    """

    def __init__(self, path: Path, chunk_size: int = CHUNK_SIZE):
        self.path = Path(path)
        self.chunk_size = chunk_size
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PACKAGE_MODE)
        self._rechunker = Rechunker(chunk_size)
        self._hasher = ManifestHasher(chunk_size)
        self._pending: deque[tuple[asyncio.Future, ...]] = deque()
        self._pools = [ThreadPoolExecutor(1, thread_name_prefix="odst-hash") for _ in range(3)]
        self.size = 0
        self._closed = False

    def _write(self, block: bytes | memoryview) -> None:
        view = memoryview(block)
        while view:
            try:
                n = os.write(self._fd, view)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise StoreFull(f"no space left on the store: {exc.strerror}") from exc
                raise
            view = view[n:]
        self._hasher.add_chunk(block)

    async def _submit(self, block: bytes | memoryview) -> None:
        loop = asyncio.get_running_loop()
        self.size += len(block)
        self._pending.append((
            loop.run_in_executor(self._pools[0], self._hasher.update_sha512, block),
            loop.run_in_executor(self._pools[1], self._hasher.update_whole, block),
            loop.run_in_executor(self._pools[2], self._write, block),
        ))
        while len(self._pending) > MAX_INFLIGHT_BLOCKS:
            await asyncio.gather(*self._pending.popleft())

    async def feed(self, piece: bytes) -> None:
        """Take a piece; blocks of exactly chunk_size go to the hash and write threads."""
        for block in self._rechunker.feed(piece):
            await self._submit(block)

    async def finish(self) -> Manifest:
        if rest := self._rechunker.rest():
            await self._submit(rest)
        while self._pending:
            await asyncio.gather(*self._pending.popleft())
        await asyncio.get_running_loop().run_in_executor(self._pools[2], os.fsync, self._fd)
        self._close()
        return self._hasher.manifest()

    @property
    def received(self) -> int:
        """Bytes taken in so far, including a chunk still being assembled."""
        return self.size + self._rechunker.buffered

    def abort_now(self) -> None:
        """Delete the temp file without waiting (the task is being cancelled)."""
        self._close()
        self.path.unlink(missing_ok=True)

    async def abort(self) -> None:
        """Stop, wait for in-flight work, delete the temp file."""
        while self._pending:
            await asyncio.gather(*self._pending.popleft(), return_exceptions=True)
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            for p in self._pools:
                p.shutdown(wait=False)
