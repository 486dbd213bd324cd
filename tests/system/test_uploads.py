"""Uploads under concurrency, end to end against a real ``odst serve``: the small-body path (one
hand-off, shared threads), the threaded path (bodies over 256 KiB) and the grouped directory fsync
must each land every byte under the right name, and a race for one name must have one winner."""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor

import blake3
import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, read_http_response

pytestmark = pytest.mark.timeout(120)

KiB = 1024


def put(site, name: str, data: bytes) -> httpx.Response:
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as c:
        return c.put(f"/api/v1/packages/{name}", content=data)


def uploaded_events(site, name: str | None = None) -> list[dict]:
    with site.client() as c:
        params = {"limit": 1000, "type": "PackageUploaded", **({"name": name} if name else {})}
        return c.get("/api/v1/events", params=params).json()["events"]


def test_concurrent_uploads_of_distinct_names_all_land_whole(site):
    # 8 KiB bodies (the small path), an empty one, and bodies past 256 KiB (the threaded path)
    sizes = [8 * KiB] * 40 + [0, 300 * KiB, 1024 * KiB + 1, 3 * 1024 * KiB + 17]
    bodies = {f"many-{i:03d}.pkg": random.Random(i).randbytes(n) for i, n in enumerate(sizes)}
    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(bodies, pool.map(lambda n: put(site, n, bodies[n]), bodies)))
    assert {n: r.status_code for n, r in answers.items()} == {n: 201 for n in bodies}, \
        [r.text for r in answers.values() if r.status_code != 201][:3]
    for name, data in bodies.items():
        pkg = answers[name].json()
        assert (pkg["size"], pkg["sha512"], pkg["blake3"]) == (
            len(data), hashlib.sha512(data).hexdigest(), blake3.blake3(data).hexdigest()), name
        served = httpx.get(f"{site.url}/CasperShare/Packages/{name}", timeout=30)
        assert served.status_code == 200 and served.content == data, name
    assert sorted(e["envelope"]["event"]["name"] for e in uploaded_events(site)) == sorted(bodies)
    store = site.data / "store"
    assert sorted(p.name for p in (store / "packages").iterdir()) == sorted(bodies)
    assert list((store / "tmp").glob("*.part")) == []


@pytest.mark.parametrize("size", [8 * KiB, 600 * KiB], ids=["small", "threaded"])
def test_concurrent_uploads_of_one_name_have_one_winner(site, size):
    """Same name, same size, other content, at once: one 201, every other a 409 naming the package
    (README: "409 different content"); the winner's bytes are served, one event is recorded, and
    the losers leave no file behind. The same content again is a 200, and changes nothing."""
    bodies = [random.Random(1000 + i).randbytes(size) for i in range(6)]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda b: put(site, "race.pkg", b), bodies))
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] + [409] * 5, [r.text for r in answers]
    for r in answers:
        if r.status_code == 409:
            assert "race.pkg" in r.json()["detail"]
    [won] = [bodies[i] for i, r in enumerate(answers) if r.status_code == 201]
    assert httpx.get(f"{site.url}/CasperShare/Packages/race.pkg", timeout=30).content == won
    assert len(uploaded_events(site, "race.pkg")) == 1
    with ThreadPoolExecutor(3) as pool:
        again = list(pool.map(lambda _: put(site, "race.pkg", won), range(3)))
    assert [r.status_code for r in again] == [200] * 3, [r.text for r in again]
    assert len(uploaded_events(site, "race.pkg")) == 1
    store = site.data / "store"
    assert [p.name for p in (store / "packages").iterdir()] == ["race.pkg"]
    assert list((store / "tmp").glob("*.part")) == []


def read_response(sock) -> tuple[int, bytes]:
    """One response from a raw socket, nothing beyond it (the next one is not sent yet)."""
    status, body, rest = read_http_response(sock)
    assert rest == b"", (status, body, rest)
    return status, body


def test_a_body_after_100_continue_in_ragged_pieces_then_a_second_request_on_the_connection(site):
    """The gateway hands the body's pieces to the upload as the parser makes them (no joining):
    a body sent in pieces of 1 byte to 700 KiB after ``Expect: 100-continue`` lands whole, and
    the kept-alive connection then serves the next request with nothing left over."""
    import json
    import socket
    data = random.Random(5).randbytes(3 * 1024 * KiB + 5)
    with socket.create_connection(("127.0.0.1", site.port), timeout=30) as s:
        s.sendall(b"PUT /api/v1/packages/ragged.pkg HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\n"
                  + f"Authorization: Bearer {ADMIN_TOKEN}\r\nContent-Length: {len(data)}\r\n\r\n".encode())
        got = b""
        while b"\r\n\r\n" not in got:
            got += s.recv(1024)
        assert got.startswith(b"HTTP/1.1 100 "), got
        rnd, at = random.Random(6), 0
        while at < len(data):
            n = rnd.choice([1, 7, 4096, 65536, 700 * KiB])
            s.sendall(data[at:at + n])
            at += n
        status, body = read_response(s)
        assert status == 201, body
        assert json.loads(body)["sha512"] == hashlib.sha512(data).hexdigest()
        s.sendall(f"GET /api/v1/packages/ragged.pkg HTTP/1.1\r\nHost: test\r\n"
                  f"Authorization: Bearer {ADMIN_TOKEN}\r\n\r\n".encode())
        status, body = read_response(s)
        assert status == 200 and json.loads(body)["blake3"] == blake3.blake3(data).hexdigest()
    assert httpx.get(f"{site.url}/CasperShare/Packages/ragged.pkg", timeout=30).content == data
