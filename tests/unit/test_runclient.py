"""The run client (``replicator.runclient``) against a real socket server that says exactly what
each test scripts: honest runs on one kept connection, a Content-Length that lies, a connection
closed in the middle of a chunk, garbage and chunked heads (answered by aiohttp instead), error
statuses, a kept connection the peer had closed, and TLS."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess

import nacl.signing
import pytest

from odst.events.signing import SiteKey
from odst.replicator.runclient import BufferPool, ChunkBuffer, RunClient
from odst.replicator.transport import (ChunkUnavailable, HttpChunkSource, RunsUnsupported, SourceThrottled,
                                       TransportFailed, http_session)

CHUNK = 64 << 10  # chunks of the runs here (the client takes any lengths the manifest gives)
KEY = SiteKey(nacl.signing.SigningKey.generate())


def chunks(n: int, seed: int = 0) -> list[bytes]:
    return [bytes([(seed + i) % 251]) * 7 + os.urandom(CHUNK - 7) for i in range(n)]


def ok(body: bytes, *extra: str, length: int | None = None) -> bytes:
    head = ["HTTP/1.1 200 OK", f"Content-Length: {len(body) if length is None else length}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


CLOSE = object()  # after this answer, the server closes the connection
HANG = object()  # after this answer, the server says nothing more (and keeps the connection)


class Scripted:
    """An HTTP server on 127.0.0.1 that answers the n-th request (over all connections) with
    ``answers[n]``: its bytes, then CLOSE / HANG if given."""

    def __init__(self, answers: list, tls: ssl.SSLContext | None = None):
        self.answers, self.tls = list(answers), tls
        self.connections = 0
        self.requests: list[bytes] = []
        self._hung: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "Scripted":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        for w in self._hung:
            w.close()
        self.server.close()

    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer = self.answers.pop(0)
                for part in answer if isinstance(answer, tuple) else (answer,):
                    if part is CLOSE:
                        writer.close()
                        return
                    if part is HANG:
                        self._hung.append(writer)
                        return
                    writer.write(part)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


async def take(source: HttpChunkSource, lengths: list[int], first: int = 0) -> tuple[list[bytes], Exception | None]:
    """The chunks a run gave (joined) and the error it ended with, if any."""
    got: list[bytes] = []
    try:
        async for pieces in source.fetch_run("b3", first, lengths):
            got.append(b"".join(bytes(p) for p in pieces))
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        return got, exc
    return got, None


def run(coro):
    return asyncio.run(coro)


def test_runs_come_whole_and_in_order_over_one_kept_connection():
    one, two = chunks(3, 1), chunks(2, 9)

    async def go():
        async with Scripted([ok(b"".join(one)), ok(b"".join(two))]) as server, http_session() as http:
            src = HttpChunkSource("peer", server.url(), KEY, http)
            first = await take(src, [CHUNK] * 3)
            second = await take(src, [CHUNK] * 2, first=3)
            return first, second, server, http.connector.runs
    (got1, err1), (got2, err2), server, runs = run(go())
    assert (got1, err1, got2, err2) == (one, None, two, None)
    assert server.connections == 1 and runs.connections == 1
    assert server.requests[0].startswith(b"GET /peer/v1/chunks/b3/0-2 HTTP/1.1\r\n")
    assert server.requests[1].startswith(b"GET /peer/v1/chunks/b3/3-4 HTTP/1.1\r\n")
    assert b"x-odst-site" in server.requests[0].lower() or KEY.site_id.encode() in server.requests[0]


def test_a_short_content_length_gives_the_whole_chunks_it_covers_then_fails():
    data = chunks(3)

    async def go():
        # says two chunks and a half; sends all three: the client reads no further than it said
        body = b"".join(data)
        async with Scripted([ok(body, length=2 * CHUNK + CHUNK // 2)]) as server, http_session() as http:
            return await take(HttpChunkSource("peer", server.url(), KEY, http), [CHUNK] * 3)
    got, err = run(go())
    assert got == data[:2]
    assert isinstance(err, TransportFailed) and "2 of 3" in str(err)


def test_a_long_content_length_then_a_close_keeps_the_chunks_that_came():
    data = chunks(3)

    async def go():
        body = b"".join(data[:2])
        async with Scripted([(ok(body, length=3 * CHUNK), CLOSE), ok(b"".join(data))]) as server, \
                http_session() as http:
            src = HttpChunkSource("peer", server.url(), KEY, http)
            cut = await take(src, [CHUNK] * 3)
            again = await take(src, [CHUNK] * 3)  # a new connection: the cut one is not kept
            return cut, again, server
    (got, err), again, server = run(go())
    assert got == data[:2] and isinstance(err, TransportFailed) and "2 of 3" in str(err)
    assert again == (data, None) and server.connections == 2


def test_a_connection_closed_in_the_middle_of_a_chunk_drops_that_chunk():
    data = chunks(3)

    async def go():
        body = b"".join(data)
        async with Scripted([(ok(body)[:-(CHUNK + CHUNK // 2)], CLOSE)]) as server, http_session() as http:
            return await take(HttpChunkSource("peer", server.url(), KEY, http), [CHUNK] * 3)
    got, err = run(go())
    assert got == data[:1]
    assert isinstance(err, TransportFailed) and "1 of 3" in str(err)


def test_a_peer_that_goes_quiet_mid_chunk_fails_after_the_read_timeout():
    data = chunks(2)

    async def go():
        async with Scripted([(ok(b"".join(data))[:-CHUNK // 2], HANG)]) as server, http_session() as http:
            http.connector.runs.read_timeout = 0.3
            return await take(HttpChunkSource("peer", server.url(), KEY, http), [CHUNK] * 2)
    got, err = run(go())
    assert got == data[:1]
    assert isinstance(err, TransportFailed) and "no bytes" in str(err)


def test_a_puller_busier_than_the_read_timeout_does_not_fail_the_run():
    """The read timeout is the peer's silence while a chunk is awaited, not the time a run takes:
    a puller that holds on to one chunk for longer (a slow disk) still gets the rest."""
    data = chunks(4)

    async def go():
        async with Scripted([ok(b"".join(data))]) as server, http_session() as http:
            http.connector.runs.read_timeout = 0.2
            got = []
            async for pieces in HttpChunkSource("peer", server.url(), KEY, http).fetch_run("b3", 0, [CHUNK] * 4):
                got.append(b"".join(bytes(p) for p in pieces))
                if len(got) == 1:
                    await asyncio.sleep(0.8)  # the scenario (a busy puller), not a synchronisation
            return got
    assert run(go()) == data


def test_garbage_headers_are_asked_again_by_aiohttp_and_fail_cleanly():
    garbage = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nthis is not a header\r\n\r\n0123456789"

    async def go():
        async with Scripted([garbage, garbage]) as server, http_session() as http:
            src = HttpChunkSource("peer", server.url(), KEY, http)
            got = await take(src, [CHUNK] * 2)
            return got, src.direct, len(server.requests)
    (got, err), direct, asked = run(go())
    assert got == [] and isinstance(err, TransportFailed)
    assert direct is False and asked == 2  # once by the run client, once by aiohttp


def test_a_chunked_answer_is_read_by_aiohttp_instead():
    data = chunks(2)
    body = b"".join(data)
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")

    async def go():
        async with Scripted([chunked, chunked]) as server, http_session() as http:
            src = HttpChunkSource("peer", server.url(), KEY, http)
            return await take(src, [CHUNK] * 2), src.direct
    (got, err), direct = run(go())
    assert (got, err) == (data, None) and direct is False


@pytest.mark.parametrize("status, extra, error", [
    (503, "Retry-After: 3", SourceThrottled), (404, "", RunsUnsupported), (403, "", ChunkUnavailable),
    (500, "", TransportFailed)])
def test_error_statuses_are_named_and_the_connection_is_kept(status, extra, error):
    body = b'{"error":"x","detail":"said no"}'
    head = f"HTTP/1.1 {status} No\r\nContent-Length: {len(body)}\r\n{extra + chr(13) + chr(10) if extra else ''}\r\n"
    data = chunks(2)

    async def go():
        async with Scripted([head.encode() + body, ok(b"".join(data))]) as server, http_session() as http:
            src = HttpChunkSource("peer", server.url(), KEY, http)
            return await take(src, [CHUNK] * 2), await take(src, [CHUNK] * 2), server.connections
    (got, err), again, connections = run(go())
    assert got == [] and type(err) is error and "said no" in str(err)
    if status == 503:
        assert err.retry_after == 3.0
    assert again == (data, None) and connections == 1


def test_a_kept_connection_the_peer_closed_is_replaced_without_failing_the_run():
    one, two = chunks(1), chunks(2, 5)

    async def go():
        async with Scripted([(ok(b"".join(one)), CLOSE), ok(b"".join(two))]) as server, http_session() as http:
            src = HttpChunkSource("peer", server.url(), KEY, http)
            first = await take(src, [CHUNK])
            await asyncio.sleep(0)  # let the close arrive (or not: either way the run must work)
            return first, await take(src, [CHUNK] * 2), server.connections
    first, second, connections = run(go())
    assert first == (one, None) and second == (two, None) and connections == 2


def test_a_run_over_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    data = chunks(3)

    async def go():
        async with Scripted([ok(b"".join(data)), ok(b"".join(data))], tls=server_tls) as server:
            trusting = RunClient(ssl_context=ssl.create_default_context(cafile=str(cert)))
            async with http_session() as http:
                http.connector.runs = trusting
                src = HttpChunkSource("peer", server.url(), KEY, http)
                good = await take(src, [CHUNK] * 3), await take(src, [CHUNK] * 3)
            async with http_session() as http:  # the system's trust store: this peer is refused
                bad = await take(HttpChunkSource("peer", server.url(), KEY, http), [CHUNK] * 3)
            return good, bad, trusting.connections
    (one, two), (got, err), connections = run(go())
    assert one == (data, None) and two == (data, None) and connections == 1
    assert got == [] and isinstance(err, TransportFailed)


def test_an_answer_that_ends_with_a_close_is_whole_and_its_connection_not_kept():
    small = [os.urandom(1000) for _ in range(3)]  # the whole answer in the first read, then EOF

    async def go():
        answer = (ok(b"".join(small), "Connection: close"), CLOSE)
        async with Scripted([answer, answer]) as server, http_session() as http:
            src = HttpChunkSource("peer", server.url(), KEY, http)
            first = await take(src, [1000] * 3)
            return first, await take(src, [1000] * 3), server.connections
    first, second, connections = run(go())
    assert first == (small, None) and second == (small, None) and connections == 2


def test_the_buffer_pool_hands_a_buffer_out_again_only_once_it_is_given_back_while_pulls_run():
    pool = BufferPool(size=CHUNK, keep=2)
    pool.hold()
    a, b = pool.take(CHUNK), pool.take(CHUNK)
    assert type(a) is ChunkBuffer and len(a) == CHUNK and a is not b
    short = pool.take(CHUNK - 1)  # a short last chunk is never pooled
    assert type(short) is bytearray and len(short) == CHUNK - 1
    pool.give(short)
    pool.give(bytearray(CHUNK))  # not the pool's: never handed out by it
    pool.give(bytes(CHUNK))
    assert pool.free() == 0
    pool.give(a)
    pool.give(a)  # given twice by mistake: still handed out once
    assert pool.free() == 1
    assert pool.take(CHUNK) is a and pool.reused == 1
    assert pool.take(CHUNK) is not b  # b is still out: a new one
    pool.give(a), pool.give(b), pool.give(ChunkBuffer(CHUNK))
    assert pool.free() == 2  # keep bounds what stays
    pool.release()  # the last pull ended: nothing kept
    assert pool.free() == 0
    pool.give(a)  # and nothing is kept while no pull runs
    assert pool.free() == 0


def test_a_reused_buffer_holds_exactly_the_next_runs_bytes():
    """Buffers of one run given back are the buffers of the next: every byte of them is
    overwritten by the new chunks (nothing of the old run shows through), over a real socket."""
    one, two = chunks(3, 1), chunks(3, 40)
    pool = BufferPool(size=CHUNK)

    async def go():
        client = RunClient(buffers=pool)
        pool.hold()
        try:
            async with Scripted([ok(b"".join(one)), ok(b"".join(two))]) as server:
                url = server.url()
                first: list = []
                async for part in client.get_run(url + "/r/0-2", "/r/0-2", {}, [CHUNK] * 3):
                    first.append(part)
                kept = [bytes(b) for b in first[1:]]
                for buf in first[1:]:
                    pool.give(buf)
                second: list = []
                async for part in client.get_run(url + "/r/3-5", "/r/3-5", {}, [CHUNK] * 3):
                    second.append(part)
                return first, kept, second
        finally:
            pool.release()
            client.close()
    first, kept, second = run(go())
    assert kept == one
    assert second[0].status == 200 and [bytes(b) for b in second[1:]] == two
    assert pool.reused >= 2 and any(b is c for b in first[1:] for c in second[1:])
