"""A registered peer cannot write into this site's mirror of ANOTHER peer's log.

nats-server checks nothing of a mirror delivery that comes over a leaf link but the link's
publish permissions, and a peer that may publish on every delivery subject (``$JS.M.>``, as
before) could, with its own real key on a hand-made leaf connection, put a message of its
own into a hub's mirror of another spoke's log: the hub then quarantined it, hid the
origin's genuine message of that sequence, and declared the origin's log cut (``/healthz``
503). Mirrors now name their origin in their delivery subject and a peer may deliver only
for the logs it carries (odst.bus.authorization.peer_permissions)."""

from __future__ import annotations

import base64
import json
import re
import socket
import time

import httpx
import nkeys

from tests.conftest import free_port, wait_until, write_random
from tests.system.test_peer_evidence import stream_state as state
from tests.system.test_replication import available_at, register, site_id, upload


def leaf_seed(site) -> str:
    """The seed a site's broker dials its hub with (its site key): the peer's real credential."""
    for conf in site.data.rglob("*.conf"):
        m = re.search(r'"nkey": "(SU[A-Z0-9]+)"', conf.read_text())
        if m:
            return m.group(1)
    raise AssertionError(f"no leaf credential under {site.data}")


class RawLeaf:
    """A leaf connection spoken by hand (no nats-server of the attacker's, whose own client
    checks would refuse a reply subject of "$JS.ACK."), authenticated with a peer's key."""

    def __init__(self, port: int, seed: str):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.settimeout(0.2)
        self.buf = b""
        self.read(lambda: b"\r\n" in self.buf, 5)
        info = json.loads(self.buf.split(b"\r\n", 1)[0][len(b"INFO "):])
        kp = nkeys.from_seed(seed.encode())
        sig = base64.urlsafe_b64encode(kp.sign(info["nonce"].encode())).rstrip(b"=").decode()
        connect = {"nkey": kp.public_key.decode(), "sig": sig, "name": "intruder", "hub": False,
                   "headers": True, "verbose": False, "pedantic": False, "tls_required": False}
        self.buf = b""
        self.send(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        assert self.read(lambda: b"PONG" in self.buf, 10), self.buf[:500]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def listen(self, *subjects: str) -> None:
        """Ask the hub for ``subjects`` (leaf interest), and wait until it has taken the ask."""
        self.send(b"".join(f"LS+ {s}\r\n".encode() for s in subjects) + b"PING\r\n")
        self.buf = b""
        assert self.read(lambda: b"PONG" in self.buf, 10), self.buf[:500]

    def read(self, done, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if done():
                return True
            try:
                data = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not data:
                return done()
            self.buf += data
            if b"PING\r\n" in data:
                self.send(b"PONG\r\n")
        return done()

    def close(self) -> None:
        self.sock.close()


def hub_with_spokes(make_site, *names: str):
    """Site A listening for leaf links and a spoke per name dialing it, each registered at A:
    (A's leaf port, A, the spokes)."""
    leaf = free_port()
    hub = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    spokes = [make_site(n.lower(), extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}",
                                               "--site-name", n]).start() for n in names]
    for spoke in spokes:
        register(hub, spoke)
    return leaf, hub, spokes


def test_a_registered_peer_cannot_write_into_the_mirror_of_another_peers_log(make_site, tmp_path):
    leaf, hub, (c, p) = hub_with_spokes(make_site, "C", "P")
    hub_id, c_id = site_id(hub), site_id(c)
    upload(c, "C1.pkg", write_random(tmp_path / "c1.pkg", 1000, seed=1))
    wait_until(lambda: available_at(hub, "C1.pkg", hub_id), 60, what="C1.pkg at the hub")
    wait_until(lambda: state(hub, f"PEER_{c_id}") == state(c, "EVENTS"), 60, what="the hub's mirror of C")

    # P, with its own key, speaks the leaf protocol itself and listens to every delivery it may
    intruder = RawLeaf(leaf, leaf_seed(p))
    try:
        intruder.listen("$JS.M.>")
        upload(c, "C2.pkg", write_random(tmp_path / "c2.pkg", 1000, seed=2))
        delivery = re.compile(rb"(?:HMSG|LMSG) (\$JS\.M\.\S+) (?:\+ )?(\$JS\.ACK\.\S+) ")
        assert intruder.read(lambda: any(c_id.encode() in m.group(2) for m in delivery.finditer(intruder.buf)),
                             20), "the intruder saw no delivery of C's log: the test proves nothing"
        seen = {(m.group(1), m.group(2)) for m in delivery.finditer(intruder.buf) if c_id.encode() in m.group(2)}
        announced = set(re.findall(rb"LS\+ (\$JS\.M\.\S+)", intruder.buf))
    finally:
        intruder.close()
    # each delivery subject of C's log it saw, and each one announced to it, gets the next
    # message, each on a connection of its own (the hub cuts a link that breaks its rights)
    forged = 0
    for subject in {s for s, _ in seen} | announced:
        for _, reply in seen:
            ack, _, original = reply.partition(b"@")
            t = ack.split(b".")
            t[5], t[6] = str(int(t[5]) + 1).encode(), str(int(t[6]) + 1).encode()  # next stream/delivery seq
            body = b"not an event of C's"
            again = RawLeaf(leaf, leaf_seed(p))
            try:
                again.send(b"LMSG " + subject + b" " + b".".join(t) + (b"@" + original if original else b"")
                           + b" " + str(len(body)).encode() + b"\r\n" + body + b"\r\nPING\r\n")
                again.buf = b""
                again.read(lambda: b"PONG" in again.buf, 5)
            except OSError:
                pass  # cut by the hub
            finally:
                again.close()
            forged += 1
    assert forged

    # the hub's copy of C's log is C's, whole; nothing was quarantined; no false alarm
    upload(c, "C3.pkg", write_random(tmp_path / "c3.pkg", 1000, seed=3))
    wait_until(lambda: available_at(hub, "C3.pkg", hub_id), 60, what="C3.pkg at the hub")
    wait_until(lambda: state(hub, f"PEER_{c_id}") == state(c, "EVENTS"), 60, what="the hub's mirror of C")
    with hub.client() as client:
        assert client.get("/api/v1/quarantine").json()["count"] == 0
    assert httpx.get(f"{hub.url}/healthz", timeout=5).status_code == 200
    assert "Publish Violation" in (hub.data / "run" / "nats.log").read_text(errors="replace")


def test_a_peer_is_not_sent_the_sites_own_replies(make_site, tmp_path):
    """A site's processes ask their own JetStream (appends, reads, KV, their consumers'
    deliveries) with replies on their private inbox, which no peer is sent: before, these went
    to ``_INBOX.<site>``, and a peer's leaf link listening on ``_INBOX.>`` received every one
    (and could answer one whose nats-py token it predicted)."""
    leaf = free_port()
    hub = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start()
    p = make_site("p", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "P"]).start()
    register(hub, p)
    hub_id = site_id(hub)
    spy = RawLeaf(leaf, leaf_seed(p))
    try:
        spy.listen("_INBOX.>", "_ODST.>", "$JS.M.>")
        upload(hub, "H1.pkg", write_random(tmp_path / "h1.pkg", 1000, seed=1))
        wait_until(lambda: available_at(p, "H1.pkg", site_id(p)), 60, what="H1.pkg at P")
        # the link is live: it is sent the deliveries of P's own mirror of the hub's log
        assert spy.read(lambda: f"odst.{hub_id}.ev.PackageUploaded".encode() in spy.buf, 20), spy.buf[:2000]
        spy.read(lambda: False, 2)
    finally:
        spy.close()
    own = f"_ODST.{hub_id}".encode()
    assert own not in spy.buf
    for answer in (f'{{"stream":"EVENTS","domain":"{hub_id}"'.encode(),  # the hub's append acks
                   b"stream_msg_get_response", b'"stream":"KV_ODST'):
        assert answer not in spy.buf, spy.buf[spy.buf.find(answer) - 200:][:600]
