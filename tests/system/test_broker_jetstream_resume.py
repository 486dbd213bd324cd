"""A broker restarted by the supervisor comes back with JetStream off and has it turned on by a
config reload (odst.site.Site.resume_jetstream). When that reload cannot start JetStream, the
broker must not be left running without it: the supervisor treats it as a failed restart (it
tries again, and gives up with exit 1 after BROKER_RESTARTS, for systemd to restart the site).

(Seen here and left to the projections' owner: a projector read that failed while JetStream was
off leaves ProjectionStatus.error set, /healthz 503, until the next event is folded, however
long that takes.)"""

from __future__ import annotations

import os
import signal

import httpx

from tests.conftest import wait_until


def broker_pid(site) -> int | None:
    try:
        return int((site.data / "run" / "nats.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def healthy(site) -> bool:
    try:
        return httpx.get(f"{site.url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_restarted_broker_whose_jetstream_will_not_start_is_not_kept(site):
    js_dir = site.data / "nats" / "jetstream"
    assert js_dir.is_dir()
    first = broker_pid(site)
    os.kill(first, signal.SIGKILL)
    # nats-server runs on, without JetStream, when its store cannot be opened on the reload
    # that turns it on ("Can't start JetStream: storage directory is not a directory")
    js_dir.rename(js_dir.with_name("jetstream.away"))
    js_dir.write_bytes(b"")
    # before: restarted once, the reload failed after 20 s, and the site stayed up for good
    # with a broker that had no JetStream (every upload 503, never restarted again)
    wait_until(lambda: site.proc.poll() is not None, 60, what="odst serve to give up and exit")
    assert site.proc.returncode == 1, site.log()
    assert "cannot be kept running" in site.log()
    assert not healthy(site)
