"""One writer per event chain (odst.projections.handoff): with ``http_workers = 2`` the gateway
helper hands its uploads' events to the process that owns the chain, so the two processes never
race for the log's head, every answered upload is in the log once, and the chain is whole, even
when the owner is killed mid-stream. The hand-off subject is the site's own: a subscriber cannot
use it, and what the site's own identity sends there is appended only as a catalogue event,
signed and chained by the owner."""

from __future__ import annotations

import asyncio
import json
import re
import threading

import nats
import nats.errors

from odst.bus.authorization import chain_subject
from tests.conftest import all_events, run_odst, site_nats, site_run_info, wait_until
from tests.system.test_crash import assert_chain
from tests.system.test_subscribers import _add_credential, _connect, _try_connect


async def _put_all(port: int, token: str, names: list[str], connections: int,
                   answered: dict[str, int], stop: threading.Event | None = None) -> None:
    """PUT each name (8 KiB body of its own) over ``connections`` keep-alive connections, as fast
    as answers come; ``answered`` gets each name's status. A dropped connection ends its loop."""
    queue = list(reversed(names))

    async def connection():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            while queue and not (stop and stop.is_set()):
                name = queue.pop()
                body = name.encode().ljust(8192, b".")
                writer.write(f"PUT /api/v1/packages/{name} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             f"Authorization: Bearer {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                answered[name] = int(head.split(b" ", 2)[1])
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(connections)))


def _appends_at_stop(log: str) -> list[dict[str, str]]:
    """Each process's 'event appends this run' line (odst.site.Site.close), as key=value pairs."""
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in log.splitlines() if "event appends this run" in line]


def _start_with_helper(make_site):
    """A site of two gateway processes, both listening (the helper starts after the site is healthy)."""
    site = make_site(env={"ODST_HTTP_WORKERS": "2"}).start()
    wait_until(lambda: "roles=['gateway']" in site.log(10**6), 60, what="the gateway helper to open")
    return site


def _uploaded(events: list[dict]) -> list[str]:
    return [e["envelope"]["event"]["name"] for e in events if e["type"] == "PackageUploaded"]


def test_two_gateway_processes_append_through_one_writer(make_site):
    site = _start_with_helper(make_site)
    names = [f"h-{i:04d}.pkg" for i in range(400)]
    answered: dict[str, int] = {}
    # 16 connections: the kernel spreads them over both processes' accept queues (SO_REUSEPORT)
    asyncio.run(asyncio.wait_for(_put_all(site.port, site.token, names, 16, answered), 300))
    assert answered == {n: 201 for n in names}
    with site.client() as c:
        events = all_events(c)
        site_id = c.get("/api/v1/site").json()["site"]
    assert sorted(_uploaded(events)) == names  # each once
    assert_chain(events, site_id)
    assert site.stop() == 0
    audit = run_odst("audit", "--data", str(site.data))
    assert audit.returncode == 0 and "violations  0" in audit.stdout, audit.stdout + audit.stderr
    counts = _appends_at_stop(site.log(10**7))
    helper = [c for c in counts if c["roles"] == "gateway"]
    assert len(helper) == 1 and len(counts) == 2, counts
    assert int(helper[0].get("handed_on", 0)) > 0 and "direct" not in helper[0], helper
    # no process's append was refused because the other got in first
    assert all("rechained" not in c for c in counts), counts


def test_kill9_of_the_chain_owner_during_uploads_loses_no_answered_upload(make_site):
    site = _start_with_helper(make_site)
    names = [f"k-{i:05d}.pkg" for i in range(20000)]
    answered: dict[str, int] = {}
    stop = threading.Event()
    sender = threading.Thread(target=lambda: asyncio.run(_put_all(site.port, site.token, names, 16, answered, stop)),
                              daemon=True)
    sender.start()
    try:
        wait_until(lambda: sum(s == 201 for s in answered.values()) >= 150, 120,
                   what="150 uploads answered")
        site.kill9()  # the owner of the chain; its helper and broker die with it (PR_SET_PDEATHSIG)
    finally:
        stop.set()
    sender.join(60)
    assert not sender.is_alive()
    done = sorted(n for n, s in answered.items() if s == 201)
    assert len(done) >= 150
    site.start()
    with site.client() as c:
        events = all_events(c)
        site_id = c.get("/api/v1/site").json()["site"]
        listed = {p["name"] for p in c.get("/api/v1/packages", params={"limit": 10000}).json()["packages"]}
    uploaded = _uploaded(events)
    assert len(uploaded) == len(set(uploaded)), "an upload recorded twice"
    assert set(done) <= set(uploaded), sorted(set(done) - set(uploaded))[:5]
    assert set(done) <= listed
    assert_chain(events, site_id)
    assert site.stop() == 0
    audit = run_odst("audit", "--data", str(site.data))
    assert audit.returncode == 0 and "violations  0" in audit.stdout, audit.stdout + audit.stderr


def test_the_hand_off_subject_is_the_sites_own(make_site, tmp_path):
    site = make_site().start()
    url = site_run_info(site.data)["nats"]
    feed = _add_credential(site, tmp_path, "feed")
    wait_until(lambda: asyncio.run(_try_connect(url, feed)) == "ok", 30, what="the broker to accept the credential")
    with site.client() as c:
        site_id = c.get("/api/v1/site").json()["site"]
        before = len(all_events(c))
    event = {"type": "PackageUploaded", "name": "forged.pkg", "size": 1, "sha1": "0" * 40, "sha512": "0" * 128,
             "blake3": "0" * 64, "chunk_size": 1 << 20, "chunks": ["0" * 40], "stage": "prod"}
    request = json.dumps({"actor": "mallory", "wait": 5, "event": event}).encode()

    async def story():
        # a subscriber (read-only credential) is refused the subject outright: no answer, nothing appended
        errors: list[str] = []
        nc = await _connect(url, feed, "feed", errors)
        try:
            try:
                await nc.request(chain_subject(site_id), request, timeout=3)
                raise AssertionError("a subscriber's hand-off was answered")
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                pass
            deadline = asyncio.get_running_loop().time() + 10
            while not any("permissions violation" in e.lower() for e in errors):
                assert asyncio.get_running_loop().time() < deadline, f"no refusal from the broker: {errors}"
                await asyncio.sleep(0.05)
        finally:
            await nc.close()
        # the site's own identity: what is not a catalogue event is refused, and nothing is appended
        own = await site_nats(site.data)
        try:
            for junk in (b"not json", json.dumps({"actor": "x", "wait": 5, "event": {"type": "Nonsense"}}).encode(),
                         json.dumps({"signed": "AAAA", "seq": 1, "prev": ""}).encode()):
                answer = await own.request(chain_subject(site_id), junk, timeout=30)
                assert answer.data[:1] == b"F", answer.data
        finally:
            await own.close()

    asyncio.run(story())
    with site.client() as c:
        after = all_events(c)
    assert len(after) == before
    assert not any(e["envelope"]["event"].get("name") == "forged.pkg" for e in after)
