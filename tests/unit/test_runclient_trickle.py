"""A peer that trickles a chunk (a byte now and then, never quiet for the read timeout) must not
hold a run, and with it the pull, for as long as it likes: before pull5 a chunk awaited for
longer than the read timeout failed its run (asyncio.timeout around each wait) and the puller
asked another source; ``_Quiet`` looked only whether bytes kept coming."""

from __future__ import annotations

import asyncio

from odst.replicator.transport import HttpChunkSource, TransportFailed
from tests.unit.test_runclient import CHUNK, KEY, chunks, http_session, ok, run, take

READ_TIMEOUT = 0.3
TRICKLE_EVERY = READ_TIMEOUT / 6  # never quiet for the read timeout
TRICKLED = 60  # bytes: ~3 s of trickling, many read timeouts' worth


class Trickler:
    """Answers a run with its first chunk whole, then the second a byte at a time, then the rest."""

    def __init__(self, body: bytes):
        self.body = body

    async def __aenter__(self) -> "Trickler":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader, writer) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            head_end = self.body.index(b"\r\n\r\n") + 4
            writer.write(self.body[:head_end + CHUNK])
            await writer.drain()
            at = head_end + CHUNK
            for _ in range(TRICKLED):
                await asyncio.sleep(TRICKLE_EVERY)  # the scenario (a trickle), not a synchronisation
                writer.write(self.body[at:at + 1])
                await writer.drain()
                at += 1
            writer.write(self.body[at:])
            await writer.drain()
            await reader.read()  # until the client closes
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def test_a_peer_trickling_a_chunk_fails_its_run_like_a_quiet_one():
    data = chunks(2)

    async def go():
        async with Trickler(ok(b"".join(data))) as server, http_session() as http:
            http.connector.runs.read_timeout = READ_TIMEOUT
            return await take(HttpChunkSource("peer", server.url(), KEY, http), [CHUNK] * 2)
    got, err = run(go())
    assert got == data[:1], "the trickled chunk was waited for to its end"
    assert isinstance(err, TransportFailed)
