"""A peer's HTTP answers are untrusted: a body that never ends is read no further than a chunk,
a redirect is not followed, and a Retry-After of 'nan' is a second, not a sleep for ever (real
sockets on 127.0.0.1)."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from odst.events.signing import SiteKey
from odst.replicator.transport import ChunkUnavailable, HttpChunkSource, TransportFailed, _retry_after
from odst.store.hashing import CHUNK_SIZE


def test_retry_after_that_is_no_number_of_seconds_is_one_second():
    assert [_retry_after(v) for v in ("nan", "inf", "-inf", "x", None)] == [1.0] * 5
    assert (_retry_after("5"), _retry_after("0"), _retry_after("999")) == (5.0, 0.1, 30.0)


async def _peer(answer_head: bytes, endless: bool):
    """A 'peer' that answers every request with ``answer_head`` and then, if ``endless``, a
    body that never ends; returns (server, port, bytes it managed to send)."""
    sent = [0]

    async def handle(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer_head)
        try:
            while endless:
                writer.write(b"x" * 65536)
                await writer.drain()
                sent[0] += 65536
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], sent


@pytest.mark.parametrize("head, endless, raised", [
    (b"HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n", True, ChunkUnavailable),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", True, None),
])
def test_a_peers_answer_is_read_no_further_than_a_chunk(tmp_path, head, endless, raised):
    async def main():
        server, port, sent = await _peer(head, endless)
        async with server, aiohttp.ClientSession() as session:
            source = HttpChunkSource("speer", f"http://127.0.0.1:{port}", SiteKey.load_or_create(tmp_path / "k"),
                                     session)
            if raised is None:
                body = await asyncio.wait_for(source.fetch("0" * 64, 0), 30)
                assert len(body) == CHUNK_SIZE + 1  # more than a chunk: the SHA1 check refuses it
            else:
                with pytest.raises(raised):
                    await asyncio.wait_for(source.fetch("0" * 64, 0), 30)
        return sent[0]

    assert asyncio.run(main()) < 64 * CHUNK_SIZE  # the peer could not make this site take its endless body


def test_a_peers_redirect_is_not_followed(tmp_path):
    """A peer that answers with a redirect to an address of its choosing (inside this site's
    network, say) gets a failed pull, not a request from this site to that address."""
    hits = []

    async def inside_service(reader, writer):
        hits.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        writer.close()

    async def main():
        inside = await asyncio.start_server(inside_service, "127.0.0.1", 0)
        to = f"http://127.0.0.1:{inside.sockets[0].getsockname()[1]}/secret"
        server, port, _ = await _peer(f"HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n".encode(),
                                      False)
        async with server, inside, aiohttp.ClientSession() as session:
            source = HttpChunkSource("speer", f"http://127.0.0.1:{port}", SiteKey.load_or_create(tmp_path / "k"),
                                     session)
            with pytest.raises(TransportFailed):
                await asyncio.wait_for(source.fetch("0" * 64, 0), 30)

    asyncio.run(main())
    assert hits == []
