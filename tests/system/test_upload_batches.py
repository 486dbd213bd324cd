"""Uploads side by side, as the group commit and the store's upload publish take them
(odst.projections.batch, Store.publishing_upload): rounds that overlap (the next published
while the one before waits for its fold) keep one chain and fail an event alone; a kill -9
in the middle of a stream of small uploads loses none that was answered 201, and leaves no
file nobody announced. Real nats-server, real ``odst serve``, real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading

import httpx
import pytest

from odst.events import catalogue as ev
from odst.events.log import EVENT_MAX_BYTES, AppendFailed, Appended
from odst.naming import name_key
from odst.projections.batch import GroupCommit
from tests.conftest import ADMIN_TOKEN, founded_log, wait_until
from tests.system.test_crash import procs_using, store_files
from tests.system.test_eventlog import assert_one_chain, messages

pytestmark = pytest.mark.timeout(120)

KiB = 1024


def test_rounds_published_while_the_one_before_waits_for_its_fold_keep_one_chain(nats_server, tmp_path):
    """Four appends go first; twelve more queue while they are in flight (one over the event
    size cap): every event but that one is stored, folded and chained in the order the rounds
    were published; its caller alone gets AppendFailed; more than one round was made."""
    async def run():
        async with founded_log(nats_server.url, tmp_path) as (js, key, _, writer, reader):
            group = GroupCommit(writer.append, writer.append_many)
            first = [asyncio.ensure_future(group(ev.PackageStaged(name=f"a{i}.pkg", stage="test"), actor="t"))
                     for i in range(4)]
            await asyncio.sleep(0)  # the first round is on its way
            events = [ev.PackageStaged(name=f"b{i}.pkg", stage="test") for i in range(12)]
            events[7] = ev.PackageStaged(name="x" * (EVENT_MAX_BYTES + 1), stage="test")
            later = [asyncio.ensure_future(group(e, actor="t")) for e in events]
            results = await asyncio.gather(*first, *later, return_exceptions=True)
            folded = [r[0] for r in reader.execute(
                "SELECT subject_name FROM events WHERE type='PackageStaged' ORDER BY stream_seq")]
            return results, dict(group.counts), folded, await messages(js, 16), key

    results, counts, folded, msgs, key = asyncio.run(run())
    refused = results[4 + 7]
    assert isinstance(refused, AppendFailed) and "size cap" in str(refused)
    landed = [r for i, r in enumerate(results) if i != 4 + 7]
    assert all(isinstance(r, Appended) for r in landed), results
    names = [f"a{i}.pkg" for i in range(4)] + [f"b{i}.pkg" for i in range(12) if i != 7]
    assert sorted(r.envelope.event.name for r in landed) == sorted(names)
    assert [r.seq for r in landed] == sorted(r.seq for r in landed)  # answered in log order
    assert sorted(folded) == sorted(names)
    assert counts["events"] == 16 and counts["rounds"] >= 2
    assert assert_one_chain(msgs, key) == 16  # SiteFounded + fifteen, one unbroken chain


def test_kill9_amid_small_uploads_loses_no_answered_upload(make_site):
    """Eight clients upload small packages until the site is killed (-9). After the restart
    every upload answered 201 is there with its bytes, every file in packages/ is a package
    the log announced (a file linked whose event never went out is swept), tmp/ is empty."""
    site = make_site().start()
    answered: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30) as c:
            for i in range(10_000):
                if stop.is_set():
                    return
                name = f"k{n}-{i:05d}.pkg"
                data = random.Random(f"{n}-{i}").randbytes(8 * KiB)
                try:
                    r = c.put(f"/api/v1/packages/{name}", content=data)
                except httpx.HTTPError:
                    return  # the server is gone
                if r.status_code == 201:
                    with lock:
                        answered[name] = data

    clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for t in clients:
        t.start()
    try:
        wait_until(lambda: len(answered) >= 40, 60, what="40 uploads answered 201")
        site.kill9()
    finally:
        stop.set()
    for t in clients:
        t.join(30)
    wait_until(lambda: not procs_using(site.data), 30, what="every process using the data dir to exit")

    site.start()
    with site.client() as c:
        listed = {}
        offset = 0
        while True:
            page = c.get("/api/v1/packages", params={"limit": 1000, "offset": offset}).json()
            listed.update({p["name"]: p for p in page["packages"]})
            offset += page["count"]
            if offset >= page["total"]:
                break
    assert set(answered) <= set(listed), sorted(set(answered) - set(listed))[:5]
    for name, data in answered.items():
        assert listed[name]["sha512"] == hashlib.sha512(data).hexdigest(), name
        served = httpx.get(f"{site.url}/CasperShare/Packages/{name}", timeout=30)
        assert served.status_code == 200 and served.content == data, name
    tmp_files, pkg_files = store_files(site.data)
    assert tmp_files == []
    assert sorted(pkg_files) == sorted(name_key(n) for n in listed)
