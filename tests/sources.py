"""An in-memory ChunkSource for tests: the third implementation of the contract in
tests/system/test_contracts.py, with knobs to corrupt, fail or lose chosen chunks."""

from __future__ import annotations

import blake3

from odst.replicator.transport import ChunkUnavailable, TransportFailed


class MemorySource:
    """Serves one content's chunks from memory; can corrupt or fail chosen chunks. Counts fetches."""

    kind = "memory"

    def __init__(self, site: str, data: bytes, chunk_size: int, *, corrupt=(), fail=(), missing=False):
        self.site, self.data, self.chunk_size = site, data, chunk_size
        self.blake3 = blake3.blake3(data).hexdigest()
        self.corrupt, self.fail, self.missing = set(corrupt), set(fail), missing
        self.fetched: list[int] = []

    async def fetch(self, blake3_hex: str, index: int) -> bytes:
        self.fetched.append(index)
        if index in self.fail:
            raise TransportFailed(f"{self.site} in memory: unreachable")
        if self.missing or blake3_hex != self.blake3:
            raise ChunkUnavailable(f"{self.site} in memory: content not held here")
        offset = index * self.chunk_size
        if index < 0 or offset >= len(self.data):
            raise ChunkUnavailable(f"{self.site} in memory: chunk index out of range")
        chunk = self.data[offset:offset + self.chunk_size]
        if index in self.corrupt:
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        return chunk
