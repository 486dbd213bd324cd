"""The gateway facing the network without nginx, private files, and who may read /metrics.

Threat: anyone who reaches the HTTP port. They must not be able to hold the gateway's
memory with endless or numerous headers, keep connections open by never finishing a
request head or by never sending anything, or read the site's metrics; another local user
must not be able to read the data directory, whatever umask the site was started with.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time

import httpx

from tests.conftest import read_status_line, wait_until

HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
MiB = 1 << 20


def ask(site, head: bytes, timeout: float = 30) -> bytes:
    """Send a raw request head; return the status line of the answer."""
    with socket.create_connection(("127.0.0.1", site.port), timeout=timeout) as s:
        s.sendall(head)
        return read_status_line(s, timeout)[1].split(b"\r\n")[0]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_oversized_or_numerous_headers_are_refused_with_431(site):
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))  # 70 KiB
    assert ask(site, HEAD + fields + b"\r\n") == b"HTTP/1.1 431 Request Header Fields Too Large"
    many = b"".join(b"X-%d: 1\r\n" % i for i in range(10_000))  # 90 KB, but 10,000 fields
    assert ask(site, HEAD + many + b"\r\n") == b"HTTP/1.1 431 Request Header Fields Too Large"
    few = b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    assert ask(site, HEAD + few + b"\r\n") == b"HTTP/1.1 431 Request Header Fields Too Large"

    # Just inside the limits: a big SSO cookie and 90 fields pass.
    cookie = b"Cookie: sso=" + b"c" * 60_000 + b"\r\n"
    assert ask(site, HEAD + cookie + b"".join(b"X-%d: 1\r\n" % i for i in range(90)) + b"\r\n") == \
        b"HTTP/1.1 200 OK"

    # A 16 MiB header: refused once 64 KiB of it came (what follows is read and dropped).
    assert ask(site, HEAD + b"X-Big: " + b"b" * (16 * MiB) + b"\r\n\r\n") == \
        b"HTTP/1.1 431 Request Header Fields Too Large"
    with site.client() as c:  # and the site is none the worse
        assert c.get("/healthz").status_code == 200
        assert c.put("/api/v1/packages/after-flood.pkg", content=b"x" * 3 * MiB).status_code == 201


async def _until_closed(reader: asyncio.StreamReader, t0: float) -> tuple[float, bytes]:
    """Read until the server closes; when it did (seconds after t0) and what it said."""
    said = b""
    try:
        while data := await reader.read(65536):
            said += data
    except ConnectionError:
        pass
    return time.monotonic() - t0, said


def test_slow_heads_idle_and_kept_alive_connections_are_closed(make_site):
    site = make_site(env={"ODST_HTTP_KEEPALIVE_S": "2"}).start()  # head timeout: the default 10 s

    async def slow():
        t0 = time.monotonic()
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        w.write(HEAD + b"X-Slow: ")
        closed = asyncio.ensure_future(_until_closed(r, t0))
        sent = 0
        while not closed.done():  # one byte a second, for ever
            try:
                w.write(b"s")
                sent += 1
            except ConnectionError:
                break
            await asyncio.wait([closed], timeout=1)
        w.close()
        return (*await closed, sent)

    async def idle():
        t0 = time.monotonic()
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        result = await asyncio.wait_for(_until_closed(r, t0), 60)
        w.close()
        return result

    async def kept_alive():
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        w.write(HEAD + b"\r\n")
        status = await r.readline()
        while (await r.readline()).strip():  # the fields, then the body by its length
            pass
        t0 = time.monotonic()
        result = await asyncio.wait_for(_until_closed(r, t0), 60)
        w.close()
        return status, result

    async def trickled_body():
        """An upload without a token announcing 1 GB and trickling it: answered 401 at once,
        then the connection ends instead of draining the announced body for ever."""
        t0 = time.monotonic()
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        w.write(b"PUT /api/v1/packages/x.pkg HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nx")
        closed = asyncio.ensure_future(_until_closed(r, t0))
        while not closed.done():
            w.write(b"x")
            await asyncio.wait([closed], timeout=0.5)
        w.close()
        return await closed

    async def main():
        return await asyncio.wait_for(asyncio.gather(slow(), idle(), kept_alive(), trickled_body()), 90)

    (slow_at, slow_said, sent), (idle_at, idle_said), (status, (ka_at, ka_said)), (body_at, body_said) = \
        asyncio.run(main())
    assert body_said.startswith(b"HTTP/1.1 401 ") and body_at < 2 + 5, (body_at, body_said)
    assert 9 <= slow_at < 10 + 5 and sent >= 8, (slow_at, sent)
    assert slow_said.startswith(b"HTTP/1.1 408 "), slow_said
    assert 9 <= idle_at < 10 + 5 and idle_said == b"", (idle_at, idle_said)
    assert status.startswith(b"HTTP/1.1 200") and ka_at < 2 + 5 and ka_said.endswith(b"}"), (ka_at, ka_said)
    assert httpx.get(f"{site.url}/healthz").status_code == 200


def test_400_hostile_connections_leave_memory_bounded_and_are_all_closed(site):
    """150 trickle a header, 150 send nothing, 100 send an endless (64 MiB) header: the
    gateway's RSS stays bounded, normal requests are served meanwhile, and every hostile
    connection is closed by the server."""
    pid = site.proc.pid
    baseline = rss_mib(pid)
    peak = [baseline]

    async def sample():
        while True:
            peak[0] = max(peak[0], rss_mib(pid))
            await asyncio.sleep(0.1)  # a sampling period, not a synchronisation

    async def hostile(kind: str):
        t0 = time.monotonic()
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        closed = asyncio.ensure_future(_until_closed(r, t0))
        try:
            if kind == "slow":
                w.write(HEAD + b"X-Slow: ")
                while not closed.done():
                    w.write(b"s")
                    await asyncio.wait([closed], timeout=1)
            elif kind == "big":
                w.write(HEAD + b"X-Big: ")
                block = b"b" * MiB
                for _ in range(64):
                    if closed.done():
                        break
                    w.write(block)
                    await w.drain()
        except ConnectionError:
            pass
        result = await closed
        w.close()
        return kind, *result

    async def main():
        sampler = asyncio.ensure_future(sample())
        tasks = [asyncio.ensure_future(hostile(kind))
                 for kind, n in (("slow", 150), ("idle", 150), ("big", 100)) for _ in range(n)]
        async with httpx.AsyncClient(base_url=site.url, timeout=10) as client:
            # served while every hostile connection is open
            healthy = (await client.get("/healthz")).status_code
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        sampler.cancel()
        return healthy, results

    healthy, results = asyncio.run(main())
    assert healthy == 200
    by_kind: dict[str, list] = {}
    for kind, at, said in results:
        by_kind.setdefault(kind, []).append((at, said))
    assert len(by_kind["slow"]) == 150 and all(said.startswith(b"HTTP/1.1 408 ") for _, said in by_kind["slow"])
    assert len(by_kind["idle"]) == 150 and all(said == b"" for _, said in by_kind["idle"])
    assert len(by_kind["big"]) == 100 and all(said.startswith(b"HTTP/1.1 431 ") for _, said in by_kind["big"])
    # before: 20 unfinished 64 MiB headers alone took the gateway from 83 to 1,363 MiB
    assert peak[0] < 250, f"gateway RSS {baseline:.0f} -> {peak[0]:.0f} MiB"
    assert httpx.get(f"{site.url}/healthz").status_code == 200


def test_data_directory_and_secrets_are_private_whatever_the_umask(make_site):
    site = make_site(env={"ODST_ADMIN_TOKEN": ""})  # so the token is generated into admin-token
    old = os.umask(0)
    try:
        site.data.mkdir(mode=0o777)  # as an older version or an installer might have left it
        assert stat.S_IMODE(site.data.stat().st_mode) == 0o777
        site.start()
    finally:
        os.umask(old)
    token = (site.data / "admin-token").read_text().strip()
    with site.client(token=token) as c:
        assert c.put("/api/v1/packages/private.pkg", content=b"p" * 5000).status_code == 201
    wait_until(lambda: (site.data / "store" / "packages" / "private.pkg").exists(), 10, what="the package file")

    # every file and directory below is checked; these at least must be there
    named = ["read-model.sqlite", "sessions.sqlite", "nats", "run/site.json", "admin-token", "admin-password",
             "site.key", "store", "store/packages", "store/packages/private.pkg"]
    for name in named:
        assert (site.data / name).exists(), name
    open_to_others = []
    for root, dirs, files in os.walk(site.data):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            try:
                mode = stat.S_IMODE(os.lstat(name).st_mode)
            except FileNotFoundError:  # a broker temp file, gone meanwhile
                continue
            if mode & 0o077:
                open_to_others.append(f"{oct(mode)} {os.path.relpath(name, site.data)}")
    assert not open_to_others, open_to_others
    assert stat.S_IMODE(site.data.stat().st_mode) == 0o700
    assert stat.S_IMODE((site.data / "store/packages/private.pkg").stat().st_mode) == 0o600


def test_metrics_need_a_token_unless_made_public(make_site):
    site = make_site().start()
    assert httpx.get(f"{site.url}/metrics").status_code == 401
    assert httpx.get(f"{site.url}/metrics", headers={"Authorization": "Bearer not-a-token"}).status_code == 401
    with site.client() as admin:
        r = admin.post("/api/v1/tokens", json={"name": "prometheus", "role": "auditor"})
        assert r.status_code == 201, r.text
        scraper = r.json()["token"]
        assert admin.get("/metrics").status_code == 200
    r = httpx.get(f"{site.url}/metrics", headers={"Authorization": f"Bearer {scraper}"})
    assert r.status_code == 200 and "odst_packages" in r.text
    site.stop()

    public = make_site("public", env={"ODST_METRICS_PUBLIC": "true"}).start()
    r = httpx.get(f"{public.url}/metrics")
    assert r.status_code == 200 and "odst_packages" in r.text
    assert httpx.get(f"{public.url}/api/v1/packages").status_code == 401  # only /metrics is opened
