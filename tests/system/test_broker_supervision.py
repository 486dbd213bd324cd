"""The embedded broker is supervised: killed, it comes back on the same port with everything it
had acknowledged; if it cannot be kept up, ``odst serve`` exits non-zero so that systemd or
the container runtime restarts the whole site."""

from __future__ import annotations

import os
import signal
import socket
import time

import httpx

from tests.conftest import all_events, site_run_info, upload_bytes, wait_until

MiB = 1 << 20


def broker_pid(site) -> int | None:
    """The embedded nats-server's pid, None while it has none (between a death and a restart)."""
    try:
        return int((site.data / "run" / "nats.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def healthy(site) -> bool:
    try:
        return httpx.get(f"{site.url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_killed_broker_is_restarted_and_nothing_is_lost(site):
    body = os.urandom(2 * MiB + 3)
    with site.client() as c:
        assert upload_bytes(c, "before.pkg", body).status_code == 201
        events_before = all_events(c)
    url_before = site_run_info(site.data)["nats"]
    pid = broker_pid(site)

    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: not healthy(site), 10, interval=0.02, what="healthz to notice the broker is gone")
    wait_until(lambda: broker_pid(site) != pid and healthy(site), 60, interval=0.05,
               what="the broker to be restarted and the site healthy again")
    print(f"healthy again {time.monotonic() - killed:.2f} s after kill -9 of the broker")

    assert site_run_info(site.data)["nats"] == url_before, "restarted on another port"
    with site.client() as c:
        events_after = all_events(c)
        assert [e["id"] for e in events_after[:len(events_before)]] == [e["id"] for e in events_before]
        r = c.get("/Packages/before.pkg")
        assert r.status_code == 200 and r.content == body
        assert upload_bytes(c, "after.pkg", b"x" * (MiB + 1)).status_code == 201
        assert c.get("/api/v1/packages/after.pkg").status_code == 200
    assert site.proc.poll() is None


def test_serve_exits_non_zero_when_its_broker_cannot_be_kept_up(site):
    port = int(site_run_info(site.data)["nats"].rsplit(":", 1)[1])
    os.kill(broker_pid(site), signal.SIGKILL)
    # take the broker's port so that every restart fails
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wait_until(lambda: squatter.bind(("127.0.0.1", port)) is None, 10, interval=0.01,
               what="the broker's port to be free")
    squatter.listen(1)
    try:
        wait_until(lambda: site.proc.poll() is not None, 120, what="odst serve to give up and exit")
        assert site.proc.returncode == 1, site.log()
        assert "cannot be kept running" in site.log()
    finally:
        squatter.close()
