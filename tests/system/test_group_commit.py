"""Group commit (odst.projections.batch): uploads finishing side by side have their events
appended together, yet each answer names its own event, an event refused in a group fails
alone, and work that waits on the read model still reacts to what it cares about. Real
nats-server, real ``odst serve``, real HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import random
import re
from concurrent.futures import ThreadPoolExecutor

import blake3
import httpx
import pytest

from odst.events import catalogue as ev
from odst.events.log import EVENT_MAX_BYTES, AppendFailed, Appended
from odst.projections.batch import GroupCommit
from tests.conftest import ADMIN_TOKEN, all_events, founded_log, free_port, wait_until
from tests.system.test_eventlog import assert_one_chain, messages

pytestmark = pytest.mark.timeout(120)

KiB = 1024


def put(site, name: str, data: bytes) -> httpx.Response:
    with httpx.Client(base_url=site.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60) as c:
        return c.put(f"/api/v1/packages/{name}", content=data)


def appends(site) -> dict[str, float]:
    text = httpx.get(f"{site.url}/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30).text
    return {m[0]: float(m[1]) for m in re.findall(r'^odst_event_appends_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


def test_concurrent_small_uploads_are_grouped_and_each_answer_names_its_own_event(site):
    bodies = {f"grouped-{i:03d}.pkg": random.Random(i).randbytes(8 * KiB) for i in range(64)}
    before = appends(site)
    with ThreadPoolExecutor(8) as pool:
        answers = dict(zip(bodies, pool.map(lambda n: put(site, n, bodies[n]), bodies)))
    assert {n: r.status_code for n, r in answers.items()} == {n: 201 for n in bodies}, \
        [r.text for r in answers.values() if r.status_code != 201][:3]
    with site.client() as c:
        by_id = {e["envelope"]["id"]: e for e in all_events(c) if e["type"] == "PackageUploaded"}
    for name, data in bodies.items():
        pkg = answers[name].json()
        assert (pkg["name"], pkg["size"], pkg["sha512"], pkg["blake3"]) == (
            name, len(data), hashlib.sha512(data).hexdigest(), blake3.blake3(data).hexdigest())
        recorded = by_id[pkg["event_id"]]["envelope"]["event"]  # this upload's own event, no neighbour's
        assert (recorded["name"], recorded["blake3"]) == (name, pkg["blake3"])
        served = httpx.get(f"{site.url}/CasperShare/Packages/{name}", timeout=30)
        assert served.status_code == 200 and served.content == data, name
    assert len({a.json()["event_id"] for a in answers.values()}) == len(bodies)
    after = appends(site)
    events, rounds = after["events"] - before.get("events", 0), after["rounds"] - before.get("rounds", 0)
    assert events == len(bodies)
    assert rounds < events  # some uploads finished while an append was in flight: appended together


def test_an_event_refused_in_a_group_fails_alone_and_the_others_land(nats_server, tmp_path):
    """Twelve appends queued at once go as one group; one of them is over the event size cap
    (the broker would refuse it): its caller gets AppendFailed, the eleven others are stored,
    folded and chained as one-by-one appends would be."""
    async def run():
        async with founded_log(nats_server.url, tmp_path) as (js, key, _, writer, reader):
            group = GroupCommit(writer.append, writer.append_many)
            events = [ev.PackageStaged(name=f"p{i}.pkg", stage="test") for i in range(12)]
            events[5] = ev.PackageStaged(name="x" * (EVENT_MAX_BYTES + 1), stage="test")
            results = await asyncio.gather(*(group(e, actor="t") for e in events), return_exceptions=True)
            folded = {r[0] for r in reader.execute("SELECT subject_name FROM events WHERE type='PackageStaged'")}
            return results, dict(group.counts), folded, await messages(js, 12), key

    results, counts, folded, msgs, key = asyncio.run(run())
    assert isinstance(results[5], AppendFailed) and "size cap" in str(results[5])
    landed = [r for i, r in enumerate(results) if i != 5]
    assert all(isinstance(r, Appended) for r in landed), results
    assert [r.envelope.event.name for r in landed] == [f"p{i}.pkg" for i in range(12) if i != 5]
    assert folded == {f"p{i}.pkg" for i in range(12) if i != 5}
    assert counts == {"rounds": 1, "events": 12}  # queued together: one group
    assert assert_one_chain(msgs, key) == 12  # SiteFounded + the eleven, one unbroken chain


def test_a_new_peer_is_linked_while_uploads_keep_the_read_model_busy(make_site):
    """Package events no longer wake the peer linker's pass; a registration still does:
    A mirrors B (and so sees B's upload) while A's own uploads fold side by side."""
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    with ThreadPoolExecutor(4) as pool:
        busy = pool.map(lambda i: put(a, f"a-{i:03d}.pkg", random.Random(i).randbytes(8 * KiB)), range(40))
        with a.client() as c:
            token = c.post("/api/v1/peers/invites", json={}).json()["token"]
        with httpx.Client(base_url=b.url, headers={"Authorization": f"Bearer {b.token}"}, timeout=90) as c:
            joined = c.post("/api/v1/peers/join", json={"token": token})
        assert joined.status_code == 201, joined.text
        assert all(r.status_code == 201 for r in busy)
    data = random.Random(7).randbytes(8 * KiB)
    assert put(b, "from-b.pkg", data).status_code == 201

    def a_knows_it():
        with a.client() as c:
            r = c.get("/api/v1/packages/from-b.pkg")
            return r.status_code == 200 and r.json()["blake3"] == blake3.blake3(data).hexdigest()
    wait_until(a_knows_it, 60, what="A to mirror B's log and fold its upload")
