"""An in-memory ChunkSource for tests: the third implementation of the contract in
tests/system/test_contracts.py, with knobs to corrupt, fail or lose chosen chunks."""

from __future__ import annotations

import blake3

from odst.replicator.transport import ChunkUnavailable, RunsUnsupported, TransportFailed


class MemorySource:
    """Serves one content's chunks from memory, one per request or in runs (``RunSource``);
    can corrupt or fail chosen chunks, cut runs short, or serve no runs (an older peer).
    Counts fetches (``fetched``: every chunk handed out or refused) and run requests."""

    kind = "memory"

    def __init__(self, site: str, data: bytes, chunk_size: int, *, corrupt=(), fail=(), missing=False,
                 runs=True, cut_after: int | None = None, cuts: int = 1):
        self.site, self.data, self.chunk_size = site, data, chunk_size
        self.blake3 = blake3.blake3(data).hexdigest()
        self.corrupt, self.fail, self.missing = set(corrupt), set(fail), missing
        self.runs, self.cut_after, self.cuts = runs, cut_after, cuts
        self.fetched: list[int] = []
        self.run_requests: list[tuple[int, int]] = []  # (first, chunks) per run asked for

    async def fetch_run(self, blake3_hex: str, first: int, lengths: list[int]):
        self.run_requests.append((first, len(lengths)))
        if not self.runs and len(lengths) > 1:
            raise RunsUnsupported(f"{self.site} in memory: serves one chunk per request")
        for k, length in enumerate(lengths):
            if self.cut_after is not None and k == self.cut_after and self.cuts > 0:
                self.cuts -= 1
                raise TransportFailed(f"{self.site} in memory: run cut after {k} chunks")
            chunk = await self.fetch(blake3_hex, first + k)
            half = len(chunk) // 2
            yield [chunk[:half], chunk[half:]] if half else [chunk]

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
