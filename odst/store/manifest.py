"""Pure manifest computation: SHA1 of the whole file and of every 1 MiB chunk, SHA-512, blake3.

``ManifestBuilder`` takes bytes in pieces of any size (uvicorn hands out at most
256,000 bytes, sometimes tiny ones) and re-splits them at chunk boundaries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import BinaryIO, Iterable

import blake3

CHUNK_SIZE = 1 << 20  # the ODS protocol's 1 MiB chunk


@dataclass(frozen=True, slots=True)
class Manifest:
    size: int
    sha1: str
    sha512: str
    blake3: str
    chunk_size: int
    chunks: tuple[str, ...]


def chunk_count(size: int, chunk_size: int = CHUNK_SIZE) -> int:
    return (size + chunk_size - 1) // chunk_size


def chunk_span(index: int, size: int, chunk_size: int = CHUNK_SIZE) -> tuple[int, int]:
    """(offset, length) of chunk ``index`` of a file of ``size`` bytes."""
    start = index * chunk_size
    return start, max(0, min(chunk_size, size - start))


class ManifestBuilder:
    """Single-threaded reference implementation; feed with update(), close with finish()."""

    def __init__(self, chunk_size: int = CHUNK_SIZE):
        self.chunk_size = chunk_size
        self._sha1 = hashlib.sha1()
        self._sha512 = hashlib.sha512()
        self._blake3 = blake3.blake3()
        self._chunk = hashlib.sha1()
        self._in_chunk = 0
        self._chunks: list[str] = []
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self._sha1.update(data)
        self._sha512.update(data)
        self._blake3.update(data)
        self.size += len(data)
        view = memoryview(data)
        while view:
            take = min(len(view), self.chunk_size - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == self.chunk_size:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk = hashlib.sha1()
                self._in_chunk = 0

    def finish(self) -> Manifest:
        chunks = list(self._chunks)
        if self._in_chunk:
            chunks.append(self._chunk.hexdigest())
        return Manifest(self.size, self._sha1.hexdigest(), self._sha512.hexdigest(),
                        self._blake3.hexdigest(), self.chunk_size, tuple(chunks))


def manifest_of(pieces: Iterable[bytes], chunk_size: int = CHUNK_SIZE) -> Manifest:
    b = ManifestBuilder(chunk_size)
    for p in pieces:
        b.update(p)
    return b.finish()


def manifest_of_file(f: BinaryIO, chunk_size: int = CHUNK_SIZE) -> Manifest:
    return manifest_of(iter(lambda: f.read(chunk_size), b""), chunk_size)
