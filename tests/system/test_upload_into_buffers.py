"""A large upload's body read straight into the protocol's reused buffers (gateway/protocol.py
``_BodyInto``), against a real ``odst serve``: the pieces are memoryviews of a few 1 MiB buffers
that are read into again once nothing holds them, so a buffer reused too early would corrupt
bytes the hash and write threads have not taken yet. Every digest must be the file's, the stored
file must be the sent bytes, a request pipelined behind the body must be answered (the reads stop
at the body's end), and a body cut short must leave nothing."""

from __future__ import annotations

import hashlib
import json
import random
import socket

import blake3
import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, read_http_response, wait_until

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def manifest_of(data: bytes) -> dict:
    return {"size": len(data), "sha1": hashlib.sha1(data).hexdigest(),
            "sha512": hashlib.sha512(data).hexdigest(), "blake3": blake3.blake3(data).hexdigest(),
            "chunks": [hashlib.sha1(data[i:i + MiB]).hexdigest() for i in range(0, len(data), MiB)]}


read_response = read_http_response


def test_a_large_body_lands_whole_and_a_request_pipelined_behind_it_is_answered(site):
    """40 MiB (forty times the buffer, so each buffer is read into again and again while the
    threads lag behind) sent at once with a GET pipelined in the same write: the 201's manifest
    is the body's, the GET that follows it on the connection is answered, and the stored file
    is the body byte for byte."""
    data = random.Random(13).randbytes(40 * MiB + 4321)
    head = (b"PUT /api/v1/packages/into.pkg HTTP/1.1\r\nHost: test\r\n"
            + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode())
    pipelined = (b"GET /api/v1/packages/into.pkg HTTP/1.1\r\nHost: test\r\n"
                 + f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode())
    with socket.create_connection(("127.0.0.1", site.port), timeout=60) as s:
        s.sendall(head + data[:100_000])  # a first piece the parser hands over, before the switch
        s.sendall(data[100_000:] + pipelined)
        status, body, rest = read_response(s)
        assert status == 201, body
        got = json.loads(body)
        assert {k: got[k] for k in ("size", "sha1", "sha512", "blake3", "chunks")} == manifest_of(data)
        status, body, _ = read_response(s, rest)
        assert status == 200 and json.loads(body)["sha512"] == hashlib.sha512(data).hexdigest(), body
    assert (site.data / "store" / "packages" / "into.pkg").read_bytes() == data
    assert list((site.data / "store" / "tmp").glob("*.part")) == []


def test_uploads_on_one_kept_alive_connection_one_after_another(site):
    """Three large bodies and a small one in turn on one connection: each is read into buffers
    of its own request (a fresh parser after each), each lands whole under its own name."""
    bodies = {f"turn-{i}.pkg": random.Random(20 + i).randbytes(n)
              for i, n in enumerate([3 * MiB + 1, 5 * MiB, 100, 2 * MiB - 7])}
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=60) as c:
        for name, data in bodies.items():
            r = c.put(f"/api/v1/packages/{name}", content=data)
            assert r.status_code == 201, r.text
            got = r.json()
            assert {k: got[k] for k in ("size", "sha1", "sha512", "blake3", "chunks")} == manifest_of(data)
    for name, data in bodies.items():
        assert httpx.get(f"{site.url}/CasperShare/Packages/{name}", timeout=30).content == data


def test_a_large_body_cut_short_publishes_nothing_and_the_next_upload_is_whole(site):
    """The client goes away 24 MiB into a 64 MiB body (the buffers cycled many times): no
    package, no event, no temp file; an upload of the same name afterwards lands whole."""
    tmp = site.data / "store" / "tmp"
    cut = random.Random(31).randbytes(24 * MiB)
    s = socket.create_connection(("127.0.0.1", site.port), timeout=60)
    s.sendall(b"PUT /api/v1/packages/cut.pkg HTTP/1.1\r\nHost: test\r\n"
              + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {64 * MiB}\r\n\r\n".encode() + cut)
    wait_until(lambda: list(tmp.glob("*.part")), 10, what="the upload's temp file")
    s.close()
    wait_until(lambda: not list(tmp.glob("*.part")), 15, what="the cut upload's temp file removed")
    with site.client() as c:
        assert c.get("/api/v1/packages/cut.pkg").status_code == 404
        events = c.get("/api/v1/events", params={"type": "PackageUploaded", "limit": 100}).json()["events"]
        assert events == []
    assert not (site.data / "store" / "packages" / "cut.pkg").exists()
    data = random.Random(32).randbytes(9 * MiB + 3)
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                      timeout=60) as c:
        r = c.put("/api/v1/packages/cut.pkg", content=data)
    assert r.status_code == 201, r.text
    assert r.json()["sha512"] == hashlib.sha512(data).hexdigest()
    assert (site.data / "store" / "packages" / "cut.pkg").read_bytes() == data
