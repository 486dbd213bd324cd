"""The one hasher: manifests, chunk checks and whole-file verification, pure over bytes and files.

A manifest is what a package is known by everywhere (upload, event, pull, scrub):
its size, SHA1 of the whole file and of every 1 MiB chunk, SHA-512 and blake3.

* ``Rechunker`` re-splits pieces of any size (uvicorn hands out at most 256,000
  bytes, sometimes tiny ones) into blocks of exactly ``chunk_size``.
* ``ManifestHasher`` folds bytes into a manifest. Its lanes share no state, so the upload
  runs two on threads of their own (``update_sha512_blake3`` | ``update_sha1s``, pieces of
  any size); ``ManifestBuilder`` runs them in line over blocks.
* ``ChunkHashes``: the chunk SHA1s of pieces of any size, without re-splitting them.
* ``chunk_ok`` is the chunk check (length + SHA1) a puller applies to every chunk
  (``pieces_ok``: the same over a chunk received in pieces, never joined).
* ``WholeHash`` / ``hash_file`` give the whole-file SHA1 + blake3 a scrub compares with the
  manifest; a pull, whose every chunk already passed its SHA1, checks the blake3 alone
  (``WholeHash(sha1=False)``).

Nothing here does I/O except ``hash_file``, which reads one file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import blake3
import msgspec

CHUNK_SIZE = 1 << 20  # the ODS protocol's 1 MiB chunk
FILE_READ_SIZE = 4 << 20  # block size when re-hashing a stored file
JAMF_DIGESTS = {"SHA_512": "sha512", "SHA3_512": "sha3_512", "MD5": "md5"}  # Jamf Pro hashType -> hashlib


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """The one manifest type: built by the upload, carried (field by field, unchanged on the
    wire) by ``PackageUploaded`` / ``PackageReplaced`` / ``PackageAvailable``, read back from
    the read model (``views.manifest``) and pulled (``replicator.puller.Want`` is a manifest
    with the name and upload clock it is published under)."""

    size: int
    sha1: str
    sha512: str
    blake3: str
    chunk_size: int
    chunks: tuple[str, ...]

    @classmethod
    def of(cls, source: Any, **more: Any):
        """FROM an event (or another manifest): its six manifest fields, plus ``more`` for a
        subclass's own fields (a ``Want``'s name, stage, ...)."""
        return cls(size=source.size, sha1=source.sha1, sha512=source.sha512, blake3=source.blake3,
                   chunk_size=source.chunk_size, chunks=tuple(source.chunks), **more)

    def event_fields(self) -> dict[str, Any]:
        """TO an event: the keyword arguments of its manifest fields (``chunks`` as the list the
        event carries), so ``ev.PackageUploaded(name=..., stage=..., **m.event_fields())``."""
        return {"size": self.size, "sha1": self.sha1, "sha512": self.sha512, "blake3": self.blake3,
                "chunk_size": self.chunk_size, "chunks": list(self.chunks)}


_BLAKE3_HEX = re.compile(r"[0-9a-f]{64}")


def is_blake3(text: str) -> bool:
    """Is ``text`` a blake3 digest as every ODST writes it (64 lowercase hex digits)? A content
    is named by it in the store's temp files: a peer's event may name anything."""
    return _BLAKE3_HEX.fullmatch(text) is not None


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return (size + chunk_size - 1) // chunk_size


def chunk_span(index: int, size: int, chunk_size: int = CHUNK_SIZE) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` of a file of ``size`` bytes."""
    start = index * chunk_size
    return start, max(0, min(chunk_size, size - start))


def chunk_sha1(block: bytes | memoryview) -> str:
    return hashlib.sha1(block).hexdigest()


def chunk_ok(data: bytes, length: int, expected_sha1: str) -> bool:
    """The chunk check: exactly ``length`` bytes whose SHA1 is the manifest's."""
    return len(data) == length and chunk_sha1(data) == expected_sha1


def pieces_ok(pieces: Iterable[bytes | memoryview], length: int, expected_sha1: str) -> bool:
    """``chunk_ok`` of the pieces joined, without joining them."""
    h, n = hashlib.sha1(), 0
    for piece in pieces:
        h.update(piece)
        n += len(piece)
    return n == length and h.hexdigest() == expected_sha1


class Rechunker:
    """Collect pieces of any size; hand back blocks of exactly ``chunk_size``, then the rest.

    Pieces are kept in a list and joined once per block (one copy of each byte); a
    block is a memoryview into that join.
    """

    def __init__(self, chunk_size: int = CHUNK_SIZE):
        self.chunk_size = chunk_size
        self._buf: list[bytes] = []
        self.buffered = 0  # bytes taken in but not handed back yet

    def feed(self, piece: bytes) -> list[memoryview]:
        """Take a piece; return the whole blocks it completes (often none)."""
        self._buf.append(piece)
        self.buffered += len(piece)
        blocks: list[memoryview] = []
        if self.buffered < self.chunk_size:
            return blocks
        joined = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        view = memoryview(joined)
        offset = 0
        while len(joined) - offset >= self.chunk_size:
            blocks.append(view[offset:offset + self.chunk_size])
            offset += self.chunk_size
        rest = joined[offset:]
        self._buf = [rest] if rest else []
        self.buffered = len(rest)
        return blocks

    def rest(self) -> bytes:
        """The last, short block (empty if none); the rechunker is empty afterwards."""
        rest = b"".join(self._buf)
        self._buf, self.buffered = [], 0
        return rest


class WholeHash:
    """SHA1 and blake3 of a whole file, fed in order: what a scrub verifies. A pull, whose
    chunks each passed their SHA1 already, asks for the blake3 alone (``sha1=False``:
    ``sha1`` is then empty); blake3 is the manifest's signed whole-file hash too."""

    def __init__(self, *, sha1: bool = True) -> None:
        self._sha1 = hashlib.sha1() if sha1 else None
        self._blake3 = blake3.blake3()
        self.size = 0

    def update(self, block: bytes | memoryview) -> None:
        if self._sha1 is not None:
            self._sha1.update(block)
        self._blake3.update(block)
        self.size += len(block)

    def update_sha1(self, block: bytes | memoryview) -> None:
        """SHA1 and size only: with ``update_blake3`` on another thread, the same as ``update``."""
        self._sha1.update(block)
        self.size += len(block)

    def update_blake3(self, block: bytes | memoryview) -> None:
        self._blake3.update(block)

    @property
    def sha1(self) -> str:
        return self._sha1.hexdigest() if self._sha1 is not None else ""

    @property
    def blake3(self) -> str:
        return self._blake3.hexdigest()


def hash_file(path: str | Path, read_size: int = FILE_READ_SIZE,
              pace: Callable[[int], None] | None = None) -> WholeHash:
    """Read a file once and hash it whole (FileNotFoundError if it is gone). ``pace`` is
    called with each block's length (a scrub's rate limit sleeps, or raises to stop, there)."""
    whole = WholeHash()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(read_size):
            whole.update(block)
            if pace is not None:
                pace(len(block))
    return whole


class ChunkHashes:
    """The SHA1 of every ``chunk_size`` chunk of bytes fed in pieces of any size, in order
    (the pieces need not line up with chunks: no re-splitting copy is made)."""

    def __init__(self, chunk_size: int = CHUNK_SIZE):
        self.chunk_size = chunk_size
        self.hashes: list[str] = []
        self._current = hashlib.sha1()
        self._left = chunk_size  # bytes still missing from the current chunk

    def update(self, piece: bytes | memoryview) -> None:
        view = memoryview(piece)
        while len(view) >= self._left:
            self._current.update(view[:self._left])
            self.hashes.append(self._current.hexdigest())
            view = view[self._left:]
            self._current, self._left = hashlib.sha1(), self.chunk_size
        if view:
            self._current.update(view)
            self._left -= len(view)

    def finish(self) -> list[str]:
        """Every chunk's SHA1, the last (short) one included; call once, at the end."""
        if self._left < self.chunk_size:
            self.hashes.append(self._current.hexdigest())
            self._current, self._left = hashlib.sha1(), self.chunk_size
        return self.hashes


class ManifestHasher:
    """Fold bytes, in order, into a Manifest.

    Lanes with separate state, each to be given every byte in order: ``update_sha512``
    (and the extra Jamf digests), ``update_whole`` (SHA1 + blake3) and the chunk SHA1s,
    either ``add_chunk`` with chunk-sized blocks or ``update_chunks`` with pieces of any
    size (one or the other). A caller may run lanes on threads of their own; hashlib and
    blake3 release the GIL on large buffers.
    """

    def __init__(self, chunk_size: int = CHUNK_SIZE, extra: Iterable[str] = ()):
        self.chunk_size = chunk_size
        self._sha512 = hashlib.sha512()
        self._whole = WholeHash()
        self._chunks: list[str] = []
        self._pieces = ChunkHashes(chunk_size)  # update_chunks' state
        # Jamf Pro hash types asked for besides SHA-512 (MD5, SHA3_512): same lane, same pass
        self._extra = {t: hashlib.new(JAMF_DIGESTS[t]) for t in extra if t != "SHA_512"}

    def update_sha512(self, block: bytes | memoryview) -> None:
        self._sha512.update(block)
        for h in self._extra.values():
            h.update(block)

    def extra_digests(self) -> dict[str, str]:
        """{Jamf Pro hash type: hex} of the extra digests (not part of the manifest or any event)."""
        return {t: h.hexdigest() for t, h in self._extra.items()}

    def update_whole(self, block: bytes | memoryview) -> None:
        self._whole.update(block)

    def add_chunk(self, block: bytes | memoryview) -> None:
        self._chunks.append(chunk_sha1(block))

    def update_chunks(self, piece: bytes | memoryview) -> None:
        """The chunk lane for pieces of any size (instead of ``add_chunk``)."""
        self._pieces.update(piece)

    def update_sha512_blake3(self, piece: bytes | memoryview) -> None:
        """SHA-512 (+ extra digests) and blake3: the two cheap-to-pair hashes, for a thread
        that hashes pieces while they are still in its CPU cache (``update_sha1s`` the other)."""
        self.update_sha512(piece)
        self._whole.update_blake3(piece)

    def update_sha1s(self, piece: bytes | memoryview) -> None:
        """The whole-file SHA1, the size and the chunk SHA1s (with ``update_sha512_blake3``:
        every hash once)."""
        self._whole.update_sha1(piece)
        self._pieces.update(piece)

    def add_block(self, block: bytes | memoryview) -> None:
        """All three lanes in line."""
        self.update_sha512(block)
        self.update_whole(block)
        self.add_chunk(block)

    def manifest(self) -> Manifest:
        chunks = self._chunks or self._pieces.finish()
        return Manifest(size=self._whole.size, sha1=self._whole.sha1, sha512=self._sha512.hexdigest(),
                        blake3=self._whole.blake3, chunk_size=self.chunk_size, chunks=tuple(chunks))


class ManifestBuilder:
    """The manifest of bytes given in pieces of any size, in line: update(), then finish()."""

    def __init__(self, chunk_size: int = CHUNK_SIZE):
        self.chunk_size = chunk_size
        self._rechunker = Rechunker(chunk_size)
        self._hasher = ManifestHasher(chunk_size)
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        for block in self._rechunker.feed(bytes(data)):
            self._hasher.add_block(block)

    def finish(self) -> Manifest:
        if rest := self._rechunker.rest():
            self._hasher.add_block(rest)
        return self._hasher.manifest()


def manifest_of(pieces: Iterable[bytes], chunk_size: int = CHUNK_SIZE) -> Manifest:
    b = ManifestBuilder(chunk_size)
    for p in pieces:
        b.update(p)
    return b.finish()


def file_digest(path: str | Path, hash_type: str, expected_blake3: str,
                read_size: int = FILE_READ_SIZE) -> str:
    """A Jamf Pro hash (``SHA_512``, ``SHA3_512``, ``MD5``) of a stored file, read once, and only
    if the file still is the content ``expected_blake3`` names (else ValueError): a record must
    never carry the hash of other bytes than those ODST serves under its name."""
    digest = hashlib.new(JAMF_DIGESTS[hash_type])
    whole = blake3.blake3()
    with open(path, "rb", buffering=0) as f:
        while block := f.read(read_size):
            digest.update(block)
            whole.update(block)
    if whole.hexdigest() != expected_blake3:
        raise ValueError(f"{path} is not the content {expected_blake3[:12]}… (it changed on disk)")
    return digest.hexdigest()
