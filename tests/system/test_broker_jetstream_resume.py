"""A broker restarted by the supervisor comes back with JetStream off and has it turned on by a
config reload (odst.site.Site.resume_jetstream). When that reload cannot start JetStream, the
broker must not be left running without it: the supervisor treats it as a failed restart (it
tries again, and gives up with exit 1 after BROKER_RESTARTS, for systemd to restart the site).

A projector read that failed while the broker was gone is over once the stream is open
for reading again: the site is healthy with no event to fold."""

from __future__ import annotations

import os
import signal

import httpx

from tests.conftest import wait_until
from tests.system.test_broker_supervision import broker_pid, healthy


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


def test_a_restarted_broker_leaves_the_site_healthy_with_no_event_to_fold(site):
    """The projector's reads fail while the broker is gone; once it is back and the stream is
    open for reading again, that error is over: /healthz says 200 without waiting for an event
    to fold (before: 503 'projector: EVENTS: ...' until the next upload, however long)."""
    first = broker_pid(site)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: not healthy(site), 30, what="the site to say it is unhealthy while its broker is gone")
    wait_until(lambda: broker_pid(site) not in (None, first), 60, what="the supervisor to restart the broker")
    wait_until(lambda: healthy(site), 60, what=lambda: f"/healthz 200 again: {httpx.get(f'{site.url}/healthz').text}")
