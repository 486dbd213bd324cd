"""Red team of the upload door's body reader (gateway/protocol.py ``_BodyInto``) and the embedded
broker's system account (odst/bus/system.py), as an outsider, a writer with a real token and a
registered peer or subscriber with real credentials, against real ``odst serve`` processes."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, module_site, wait_until

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
AUTH = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    with module_site(tmp_path_factory, "door") as site:
        yield site


def put_head(name: str, length: int | str, extra: bytes = b"") -> bytes:
    return (f"PUT /api/v1/packages/{name} HTTP/1.1\r\nHost: t\r\n".encode() + AUTH
            + f"Content-Length: {length}\r\n".encode() + extra + b"\r\n")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def answered(site) -> None:
    """One request answered by the gateway's event loop: reads that were ready before it was
    sent have been taken (the loop serves every ready socket in one turn)."""
    assert httpx.get(f"{site.url}/healthz", timeout=30).status_code == 200


def test_slow_large_uploads_do_not_pin_a_megabyte_each(door):
    """A writer opens 64 uploads announcing 100 MiB each and trickles a few bytes into every
    one. Each body is read into buffers (it is large); a buffer sized for the body's length
    (1 MiB, zero-filled) pinned per few bytes received let one token hold a GiB of the gateway's
    memory with a thousand such connections. Now a slow body holds about what it sent."""
    pid = door.run_info()["pid"]
    conns = []
    try:
        answered(door)
        before = rss_bytes(pid)
        for i in range(64):
            c = socket.create_connection(("127.0.0.1", door.port), timeout=30)
            conns.append(c)
            c.sendall(put_head(f"slow-{i}.pkg", 100 * MiB) + b"x")
        answered(door)
        for _ in range(3):  # the first bytes the body reader takes, after the parser's
            for c in conns:
                c.sendall(b"y")
            answered(door)
        grown = rss_bytes(pid) - before
        assert grown < 24 * MiB, f"64 slow uploads of 4 bytes each grew the gateway by {grown / MiB:.0f} MiB"
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: not list((door.data / "store" / "tmp").glob("*.part")), 15,
               what="the slow uploads' temp files removed")
def read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` responses with a Content-Length body, or fewer if the server closes first."""
    data, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return out
            data += piece
        head, _, data = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                      if line.lower().startswith(b"content-length:"))
        while len(data) < length:
            piece = sock.recv(65536)
            if not piece:
                return out
            data += piece
        out.append((int(head.split(b" ", 2)[1]), data[:length]))
        data = data[length:]
    return out


@pytest.mark.parametrize("size", [100_000, 3 * MiB])
def test_an_upload_pipelined_behind_another_is_answered(door, size):
    """Two uploads and a GET sent in one go on one connection (HTTP/1.1 pipelining). The first
    upload's answer found the parser inside the second's body and took it for its own body
    still coming: the connection was half-closed, the second upload dropped unanswered."""
    body = os.urandom(size)
    names = [f"pipe-{size}-{i}.pkg" for i in range(2)]
    get = f"GET /api/v1/packages/{names[1]} HTTP/1.1\r\nHost: t\r\n".encode() + AUTH + b"\r\n"
    with socket.create_connection(("127.0.0.1", door.port), timeout=30) as s:
        s.sendall(put_head(names[0], size) + body + put_head(names[1], size) + body[::-1] + get)
        answers = read_answers(s, 3)
    assert [status for status, _ in answers] == [201, 201, 200], answers
    with door.client() as admin:
        for name, data in zip(names, [body, body[::-1]]):
            assert admin.get(f"/CasperShare/Packages/{name}").content == data
            assert admin.delete(f"/api/v1/packages/{name}").status_code == 200


def exchange(site, data: bytes, then: bytes = b"") -> int:
    """Send ``data`` (then ``then``, once the server may have answered early): the status of
    the one answer read back (0: none, the connection closed)."""
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as s:
        s.sendall(data)
        try:
            s.sendall(then)
        except OSError:  # answered early and closed: what it said is still readable
            pass
        try:
            answers = read_answers(s, 1)
        except ConnectionResetError:
            return 0
    return answers[0][0] if answers else 0


def test_a_request_hidden_in_an_upload_body_is_never_executed(door):
    """Held (what was tried): a DELETE repeated through a large body (read into buffers) and a
    small one (the parser's); Content-Length twice, with Transfer-Encoding, with leading zeros,
    not a number; an early 401 or 409 with the DELETE sent behind the declared body; a body
    cut short. The victim package stays, a refused or cut upload leaves no package, no file."""
    with door.client() as admin:
        assert admin.put("/api/v1/packages/victim.pkg", content=b"v" * 1000).status_code == 201
    smuggled = b"DELETE /api/v1/packages/victim.pkg HTTP/1.1\r\nHost: t\r\n" + AUTH + b"\r\n"

    def hidden(n: int) -> bytes:
        return (smuggled * (n // len(smuggled) + 1))[:n]

    big, small = hidden(3 * MiB), hidden(100_000)
    assert exchange(door, put_head("hid-big.pkg", len(big)) + big) == 201
    assert exchange(door, put_head("hid-small.pkg", len(small)) + small) == 201
    assert exchange(door, put_head("zeros.pkg", f"000{len(big)}") + big) == 201
    for extra in [f"Content-Length: {len(big)}\r\n".encode(), b"Content-Length: 10\r\n",
                  b"Transfer-Encoding: chunked\r\n"]:
        assert exchange(door, put_head("two.pkg", len(big), extra) + big) == 400
    for length in ["+300000", "3e5", "0x493e0", "300000,300000"]:
        assert exchange(door, put_head("nan.pkg", length) + big) == 400
    no_token = put_head("anon.pkg", len(big)).replace(AUTH, b"Authorization: Bearer nope\r\n")
    assert exchange(door, no_token + big[:1000], big[1000:] + smuggled) == 401
    assert exchange(door, put_head("victim.pkg", len(big)) + big[:1000], big[1000:] + smuggled) == 409
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as s:  # cut short
        s.sendall(put_head("cut.pkg", len(big)) + big[:len(big) // 2])
        answered(door)
    with door.client() as admin:
        assert admin.get("/api/v1/packages/victim.pkg").status_code == 200
        for name in ["two.pkg", "nan.pkg", "anon.pkg", "cut.pkg"]:
            assert admin.get(f"/api/v1/packages/{name}").status_code == 404, name
        for name in ["hid-big.pkg", "hid-small.pkg", "zeros.pkg", "victim.pkg"]:
            assert admin.delete(f"/api/v1/packages/{name}").status_code == 200
    wait_until(lambda: not list((door.data / "store" / "tmp").glob("*.part")), 15,
               what="the cut upload's temp file removed")
