"""Uploads side by side through two gateway processes of one site (``http_workers = 2``): they
append to one log, each re-reading the log's head when the other got in first, and every upload
is recorded. (The bench's faster client once saw about 1 in 400 refused as a "cut" log: the head
read the stream before the read model, and the other process's append, folded in between, looked
like a cut. This test did not catch that race in four runs; it guards the contention path.)"""

from __future__ import annotations

import asyncio
import re

from tests.conftest import all_events

UPLOADS, CONNECTIONS = 2000, 8


async def put_many(port: int, token: str, bodies: list[bytes]) -> tuple[dict[int, int], list[str]]:
    """PUT each body over CONNECTIONS keep-alive connections, as fast as answers come (a
    plain client: httpx is slow enough to hide contention). ({status: count}, refusals)."""
    statuses: dict[int, int] = {}
    refusals: list[str] = []
    queue = list(range(len(bodies)))[::-1]

    async def connection():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while queue:
                i = queue.pop()
                writer.write(f"PUT /api/v1/packages/c-{i:05d}.pkg HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             f"Authorization: Bearer {token}\r\nContent-Length: {len(bodies[i])}\r\n\r\n"
                             .encode() + bodies[i])
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                answer = await reader.readexactly(int(length.group(1))) if length else b""
                statuses[status] = statuses.get(status, 0) + 1
                if status != 201:
                    refusals.append(f"c-{i:05d}.pkg: {status} {answer[:300].decode(errors='replace')}")
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    return statuses, refusals


def test_uploads_through_two_gateway_processes_are_all_recorded(make_site):
    site = make_site(env={"ODST_HTTP_WORKERS": "2"}).start()
    bodies = [i.to_bytes(8, "big") * 1024 for i in range(UPLOADS)]
    statuses, refusals = asyncio.run(asyncio.wait_for(put_many(site.port, site.token, bodies), 600))
    assert statuses == {201: UPLOADS}, refusals[:5]
    with site.client() as c:
        uploaded = [e for e in all_events(c) if e["type"] == "PackageUploaded"]
    assert len(uploaded) == UPLOADS
