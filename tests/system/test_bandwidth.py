"""Bandwidth on real sites (issue 14): link limits on both transports and both sides, a
window pausing a transfer that then resumes from its verified chunks, urgent packages
crossing a paused link, and download caps for Macs.

Rates are asserted only as lower bounds on elapsed time, which a limiter guarantees on
any machine (bytes beyond the burst need at least bytes / rate seconds); the tight
figures are in bench/bandwidth.py.
"""

from __future__ import annotations

import hashlib
import subprocess
import time

import httpx
import pytest

from tests.conftest import free_port, run_odst, wait_until, write_random
from tests.system.test_replication import available_at, register, start_pair, state, upload

MIB = 1 << 20
MB = 1_000_000
RATE = 4 * MB


def site_id(site) -> str:
    with site.client() as c:
        return c.get("/api/v1/site").json()["site"]


def put(site, path: str, body: dict, token: str | None = None, ok=(200,)) -> httpx.Response:
    with site.client(token=token) as c:
        r = c.put(path, json=body)
    assert r.status_code in ok, r.text
    return r


def bandwidth(site) -> dict:
    with site.client() as c:
        return c.get("/api/v1/bandwidth").json()


def link(site, peer: str) -> dict:
    return next(x for x in bandwidth(site)["links"] if x["peer"] == peer)


def transfer(site, name: str) -> dict:
    return next((t for t in state(site)["transfers"] if t["name"] == name), {})


def hold(predicate, seconds: float, what: str) -> None:
    """``predicate`` stays true for ``seconds`` (a negative check: polled, not slept through)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert predicate(), f"no longer true: {what}"
        time.sleep(0.05)


@pytest.fixture
def pair(make_site):
    a, b = start_pair(make_site)
    return a, b, site_id(a), site_id(b)


def test_a_receive_limit_a_window_and_an_urgent_package(pair, tmp_path):
    a, b, a_id, b_id = pair
    # an auditor may look but not limit; bad input is refused and records nothing
    with b.client() as c:
        auditor = c.post("/api/v1/tokens", json={"name": "look", "role": "auditor"}).json()["token"]
    put(b, f"/api/v1/bandwidth/links/{a_id}", {"receive": "1MB"}, token=auditor, ok=(403,))
    assert put(b, f"/api/v1/bandwidth/links/{a_id}", {"receive": "fast"}, ok=(400,)).json()["error"] == \
        "bandwidth_invalid"
    put(b, "/api/v1/bandwidth/links/s0000000000000000", {"receive": "1MB"}, ok=(404,))
    put(b, f"/api/v1/bandwidth/links/{a_id}", {"windows": ["mon 8-18 1MB"]}, ok=(400,))
    assert link(b, a_id)["receive"]["state"] == "local"  # loopback is local, and local is exempt by default

    # 1. B limits what it receives from A: the pull takes at least (size - burst - a chunk) / rate
    shown = put(b, f"/api/v1/bandwidth/links/{a_id}", {"receive": RATE, "local": "no"}).json()
    assert next(x for x in shown["links"] if x["peer"] == a_id)["receive"]["limit_bps"] == RATE
    size = 10 * MIB
    t0 = time.monotonic()
    upload(a, "limited.pkg", write_random(tmp_path / "limited.pkg", size, seed=1))
    wait_until(lambda: available_at(b, "limited.pkg", b_id), 60, what="the limited pull")
    assert time.monotonic() - t0 >= (size - 2 * MIB) / RATE
    now = link(b, a_id)["receive"]
    assert now["state"] == "limited" and now["measured_bps"] > 0

    # 2. a window pauses the link mid-transfer; the transfer waits with its verified chunks
    served0 = state(a)["chunks_served"].get(b_id, 0)
    big = 16 * MIB
    upload(a, "window.pkg", write_random(tmp_path / "window.pkg", big, seed=2))
    wait_until(lambda: transfer(b, "window.pkg").get("chunks_done", 0) >= 3, 60, what="the pull under way")
    put(b, f"/api/v1/bandwidth/links/{a_id}",
        {"receive": RATE, "local": "no", "windows": ["daily 00:00-24:00 paused"]})
    wait_until(lambda: "paused" in transfer(b, "window.pkg").get("detail", ""), 10, what="the pull to pause")
    done = transfer(b, "window.pkg")["chunks_done"]
    assert 0 < done < 16 and link(b, a_id)["receive"]["state"] == "paused"
    hold(lambda: transfer(b, "window.pkg")["chunks_done"] == done, 1.5, "no chunk while paused")

    # 3. meanwhile an urgent package crosses the paused link; a normal one waits
    upload(a, "normal.pkg", write_random(tmp_path / "normal.pkg", 2 * MIB, seed=3))
    upload(a, "hotfix.pkg", write_random(tmp_path / "hotfix.pkg", 2 * MIB, seed=4))
    put(a, "/api/v1/bandwidth/urgent/hotfix.pkg", {"urgent": True, "reason": "CVE-2026-0001"})
    wait_until(lambda: available_at(b, "hotfix.pkg", b_id), 60, what="the urgent package at B")
    assert not available_at(b, "normal.pkg", b_id)
    assert transfer(b, "normal.pkg").get("chunks_done", 0) == 0
    assert transfer(b, "window.pkg")["chunks_done"] == done

    # 4. the window goes: both resume; the paused pull fetches only the chunks it lacked
    put(b, f"/api/v1/bandwidth/links/{a_id}", {"receive": 0, "local": "no"})
    wait_until(lambda: available_at(b, "window.pkg", b_id) and available_at(b, "normal.pkg", b_id), 60,
               what="both after the window")
    served = state(a)["chunks_served"].get(b_id, 0) - served0
    assert served <= 16 + 2 + 2 + 8  # window + hotfix + normal, and at most the streams in flight again
    with httpx.Client() as c:
        got = c.get(f"{b.url}/Packages/window.pkg").content
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256((tmp_path / "window.pkg").read_bytes()).hexdigest()

    # every change is an event with who made it (the refused ones made none); /metrics exports the link
    with b.client() as c:
        changes = c.get("/api/v1/events", params={"type": "LinkBandwidthSet"}).json()["events"]
        metrics = c.get("/metrics").text
    with a.client() as c:
        marks = c.get("/api/v1/events", params={"type": "PackageUrgencySet"}).json()["events"]
    assert len(changes) == 3 and all("bootstrap admin" in e["actor"] for e in changes)
    assert marks[0]["envelope"]["event"]["reason"] == "CVE-2026-0001" and "bootstrap admin" in marks[0]["actor"]
    assert f'odst_link_limit_bytes_per_second{{direction="receive",peer="{a_id}"}} 0.0' in metrics
    assert f'odst_link_paused{{direction="receive",peer="{a_id}"}} 0.0' in metrics
    assert f'odst_link_rate_bytes_per_second{{direction="receive",peer="{a_id}"}}' in metrics


def test_a_send_limit_holds_over_nats_and_a_paused_sender_holds_the_pull(make_site, tmp_path):
    """The server's side, on the NATS transport: B asks as fast as it likes, A's limit holds."""
    leaf = free_port()
    b = make_site("b", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}"]).start()
    a = make_site("a", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}",
                                   "--public-url", "http://127.0.0.1:9"]).start()  # closed: NATS only
    register(a, b)
    b_id = site_id(b)
    put(a, f"/api/v1/bandwidth/links/{b_id}", {"send": RATE, "local": "no"})
    size = 10 * MIB
    t0 = time.monotonic()
    upload(a, "nats.pkg", write_random(tmp_path / "nats.pkg", size, seed=5))
    wait_until(lambda: available_at(b, "nats.pkg", b_id), 60, what="the limited pull over NATS")
    assert time.monotonic() - t0 >= (size - 2 * MIB) / RATE
    assert link(a, b_id)["send"]["measured_bps"] > 0

    put(a, f"/api/v1/bandwidth/links/{b_id}", {"local": "no", "windows": ["daily 00:00-24:00 paused"]})
    upload(a, "held.pkg", write_random(tmp_path / "held.pkg", 2 * MIB, seed=6))
    wait_until(lambda: transfer(b, "held.pkg").get("status") == "downloading", 30, what="the pull to start")
    hold(lambda: not available_at(b, "held.pkg", b_id) and transfer(b, "held.pkg")["status"] == "downloading",
         1.5, "the pull waits for the sender without failing")
    with a.client() as c:
        r = c.delete(f"/api/v1/bandwidth/links/{b_id}")
    assert r.status_code == 200, r.text
    wait_until(lambda: available_at(b, "held.pkg", b_id), 60, what="the pull after the sender reopened")
    with b.client() as c:
        failures = c.get("/api/v1/events", params={"type": "PackageTransferFailed"}).json()["events"]
    assert not failures


def test_download_caps_answer_503_with_retry_after_and_every_mac_gets_its_file(site, tmp_path):
    path = write_random(tmp_path / "mac.pkg", MIB, seed=7)
    upload(site, "mac.pkg", path)
    with site.client() as c:
        r = c.put("/api/v1/bandwidth/downloads", json={"max_concurrent": -1})
        assert r.status_code == 400
    cli = run_odst("bandwidth", "downloads", "--max", "2", "--egress", "2MB", "--server", site.url,
                   "--token", site.token)
    assert cli.returncode == 0, cli.stderr
    assert "egress 2 MB/s, at once 2" in cli.stdout
    bad = run_odst("bandwidth", "set", "default", "--window", "someday 08:00-09:00 1MB", "--server", site.url,
                   "--token", site.token)
    assert bad.returncode == 2 and "someday" in bad.stderr and "mon-fri" in bad.stderr
    clients = 6
    t0 = time.monotonic()
    procs = [subprocess.Popen(["curl", "-sS", "--fail", "--retry", "100", "--retry-max-time", "120",
                               "-o", str(tmp_path / f"{i}.out"), f"{site.url}/CasperShare/Packages/mac.pkg"],
                              stderr=subprocess.PIPE) for i in range(clients)]
    codes = [p.wait(timeout=180) for p in procs]
    assert codes == [0] * clients, [p.stderr.read() for p in procs]
    assert time.monotonic() - t0 >= (clients * MIB - 2 * MIB) / (2 * MB)  # the egress limit held
    want = hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(hashlib.sha256((tmp_path / f"{i}.out").read_bytes()).hexdigest() == want for i in range(clients))
    downloads = bandwidth(site)["downloads"]
    assert downloads["peak"] == 2 and downloads["refused"] >= 1 and downloads["active"] == 0
    with httpx.Client() as c:  # HEAD is never refused
        assert c.head(f"{site.url}/CasperShare/Packages/mac.pkg").status_code == 200
