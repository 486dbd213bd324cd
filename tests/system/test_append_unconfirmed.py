"""An upload whose event the broker takes but does not acknowledge in time (its nats-server
stopped for longer than the publish timeout) is answered 503 "not known whether recorded",
and keeps its file: once the broker goes on and stores the event, the package the log names
is there to download. Removing the file on a timeout (as for a refusal) left the log naming
a file that was gone."""

from __future__ import annotations

import hashlib
import os
import signal

import httpx

from tests.conftest import ADMIN_TOKEN, wait_until

HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def test_an_upload_the_broker_acknowledges_too_late_keeps_its_file(make_site):
    site = make_site("site").start()
    [broker] = site.broker_pids()
    body = os.urandom(300_000)
    os.kill(broker, signal.SIGSTOP)  # the event is sent, then no answer for longer than the publish's 10 s
    try:
        r = httpx.put(f"{site.url}/api/v1/packages/late.pkg", content=body, headers=HEADERS, timeout=60)
    finally:
        os.kill(broker, signal.SIGCONT)
    assert r.status_code == 503 and "not known whether recorded" in r.text, r.text
    assert (site.data / "store" / "packages" / "late.pkg").read_bytes() == body

    def listed():
        return httpx.get(f"{site.url}/api/v1/packages/late.pkg", headers=HEADERS).status_code == 200
    wait_until(listed, 30, what="the stored event to be folded")
    got = httpx.get(f"{site.url}/CasperShare/Packages/late.pkg", timeout=30)
    assert got.status_code == 200 and hashlib.sha1(got.content).digest() == hashlib.sha1(body).digest()
    again = httpx.put(f"{site.url}/api/v1/packages/late.pkg", content=body, headers=HEADERS, timeout=60)
    assert again.status_code == 200, again.text  # the same bytes: already recorded


def test_the_same_bytes_sent_again_after_an_unrecorded_unconfirmed_upload_are_recorded(make_site):
    """The other outcome: the broker never stores the event (killed while it had not read it).
    The file was kept (its fate was not known), so the name's file is there and the log does
    not name it. The retry the 503 asks for met that file and was refused 409 "being
    published" until the janitor's next full pass (up to 5 minutes). Now the same bytes sent
    again take that file for their own and are recorded: 201, listed, downloadable."""
    site = make_site("site").start()
    [broker] = site.broker_pids()
    body = os.urandom(100_000)
    os.kill(broker, signal.SIGSTOP)
    try:
        r = httpx.put(f"{site.url}/api/v1/packages/lost.pkg", content=body, headers=HEADERS, timeout=60)
    finally:
        os.kill(broker, signal.SIGKILL)  # the event it never read goes with it
    assert r.status_code == 503 and "not known whether recorded" in r.text, r.text
    assert (site.data / "store" / "packages" / "lost.pkg").read_bytes() == body
    wait_until(lambda: site.broker_pids() and site.broker_pids() != [broker]
               and httpx.get(f"{site.url}/healthz").status_code == 200, 60, what="the broker restarted")
    assert httpx.get(f"{site.url}/api/v1/packages/lost.pkg", headers=HEADERS).status_code == 404

    again = httpx.put(f"{site.url}/api/v1/packages/lost.pkg", content=body, headers=HEADERS, timeout=60)
    assert again.status_code == 201, again.text
    got = httpx.get(f"{site.url}/CasperShare/Packages/lost.pkg", timeout=30)
    assert got.status_code == 200 and got.content == body
    other = httpx.put(f"{site.url}/api/v1/packages/lost.pkg", content=os.urandom(100), headers=HEADERS, timeout=60)
    assert other.status_code == 409 and (site.data / "store" / "packages" / "lost.pkg").read_bytes() == body
