"""A registered peer's events are signed, not safe. Site A appends, with its own key, events a
gateway would never make: a PackageDeleted of '../../site.key' (before, B's replicator unlinked
that path: B's own site key) and a PackageUploaded whose content is named '../../../escape'
(before, B's puller made its temp file there). B records both in A's chain and folds what comes
after them; no file outside B's store is touched."""

from __future__ import annotations

import asyncio
import os

import pytest

from odst.events import catalogue as ev
from tests.conftest import all_events, free_port, upload_bytes, wait_until
from tests.system.test_names import _append_as_site
from tests.system.test_replication import register, site_id
from tests.system.test_sync_derived import held_at

pytestmark = pytest.mark.timeout(240)


def test_a_peers_event_cannot_name_a_file_outside_the_store(make_site):
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start()
    register(a, b)
    b_id = site_id(b)
    with a.client() as c:
        assert upload_bytes(c, "Before.pkg", os.urandom(1000)).status_code == 201
    wait_until(lambda: held_at(b, b_id) == 1, 90, interval=0.3, what="B to hold Before.pkg")
    key_file, escape = b.data / "site.key", b.data.parent / "escape.repl"
    assert key_file.exists() and not escape.exists()

    hostile = [ev.PackageDeleted(name="../../site.key", blake3="0" * 64),
               ev.PackageUploaded(name="Escape.pkg", size=10, sha1="0" * 40, sha512="0" * 128,
                                  blake3="../../../escape", chunk_size=1 << 20, chunks=["0" * 40], stage="prod")]
    a_id = site_id(a)

    def own(c) -> list[dict]:
        return [e for e in all_events(c) if e["origin"] == a_id]

    for event in hostile:
        with a.client() as c:
            last = own(c)[-1]
            asyncio.run(_append_as_site(a.data, event, last))
            wait_until(lambda: own(c)[-1]["id"] != last["id"], 30, what="A to fold its own event")
    with a.client() as c:  # after them in A's chain: B folds it only after the two
        assert upload_bytes(c, "After.pkg", os.urandom(1000)).status_code == 201
    wait_until(lambda: held_at(b, b_id) == 2, 90, interval=0.3, what="B to hold After.pkg")

    with b.client() as c:
        types = [e["type"] for e in all_events(c) if e["origin"] == a_id]
        assert c.get("/api/v1/quarantine").json()["count"] == 0
        names = sorted(p["name"] for p in c.get("/api/v1/packages").json()["packages"])
    assert types[-3:] == ["PackageDeleted", "PackageUploaded", "PackageUploaded"]  # recorded in A's chain
    assert names == ["After.pkg", "Before.pkg", "Escape.pkg"]  # a name that is a file name is a package
    # B's replication passes over both have run (After.pkg came after them): nothing outside the store
    wait_until(lambda: "not pulled" in b.log(1 << 22), 30, what="B to decline the content named by no digest")
    assert key_file.exists(), "B's site key was removed by a peer's event"
    assert not escape.exists(), "a peer's event named a temp file outside B's store"
    assert "event recorded without effect" in b.log(1 << 22)
