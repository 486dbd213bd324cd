"""Red team of the upload door's body reader (gateway/protocol.py ``_BodyInto``) and the embedded
broker's system account (odst/bus/system.py), as an outsider, a writer with a real token and a
registered peer or subscriber with real credentials, against real ``odst serve`` processes."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import time

import httpx
import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from odst.bus.identity import public_key_of_seed, read_seed
from odst.bus.system import KICK, RELOAD, SYSTEM_SEED_FILE
from tests.conftest import ADMIN_TOKEN, free_port, module_site, wait_until
from tests.system.test_mirror_injection import RawLeaf, leaf_seed
from tests.system.test_peer_removal_link import leaf_links
from tests.system.test_replication import register

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20
AUTH = f"Authorization: Bearer {ADMIN_TOKEN}\r\n".encode()


@pytest.fixture(scope="module")
def door(tmp_path_factory):
    # one token opens 64 uploads at once below: uploads_per_user (16) is not what those tests try
    with module_site(tmp_path_factory, "door", env={"ODST_UPLOADS_PER_USER": "100"}) as site:
        yield site


def put_head(name: str, length: int | str, extra: bytes = b"") -> bytes:
    return (f"PUT /api/v1/packages/{name} HTTP/1.1\r\nHost: t\r\n".encode() + AUTH
            + f"Content-Length: {length}\r\n".encode() + extra + b"\r\n")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def answered(site) -> None:
    """One request answered by the gateway's event loop: reads that were ready before it was
    sent have been taken (the loop serves every ready socket in one turn)."""
    assert httpx.get(f"{site.url}/healthz", timeout=30).status_code == 200


def test_slow_large_uploads_do_not_pin_a_megabyte_each(door):
    """A writer opens 64 uploads announcing 100 MiB each and trickles a few bytes into every
    one. Each body is read into buffers (it is large); a buffer sized for the body's length
    (1 MiB, zero-filled) pinned per few bytes received let one token hold a GiB of the gateway's
    memory with a thousand such connections. Now a slow body holds about what it sent."""
    pid = door.run_info()["pid"]
    conns = []
    try:
        answered(door)
        before = rss_bytes(pid)
        for i in range(64):
            c = socket.create_connection(("127.0.0.1", door.port), timeout=30)
            conns.append(c)
            c.sendall(put_head(f"slow-{i}.pkg", 100 * MiB) + b"x")
        answered(door)
        for _ in range(3):  # the first bytes the body reader takes, after the parser's
            for c in conns:
                c.sendall(b"y")
            answered(door)
        grown = rss_bytes(pid) - before
        assert grown < 24 * MiB, f"64 slow uploads of 4 bytes each grew the gateway by {grown / MiB:.0f} MiB"
    finally:
        for c in conns:
            c.close()
    wait_until(lambda: not list((door.data / "store" / "tmp").glob("*.part")), 15,
               what="the slow uploads' temp files removed")
def read_answers(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """``count`` responses with a Content-Length body, or fewer if the server closes first."""
    data, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                return out
            data += piece
        head, _, data = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                      if line.lower().startswith(b"content-length:"))
        while len(data) < length:
            piece = sock.recv(65536)
            if not piece:
                return out
            data += piece
        out.append((int(head.split(b" ", 2)[1]), data[:length]))
        data = data[length:]
    return out


@pytest.mark.parametrize("size", [100_000, 3 * MiB])
def test_an_upload_pipelined_behind_another_is_answered(door, size):
    """Two uploads and a GET sent in one go on one connection (HTTP/1.1 pipelining). The first
    upload's answer found the parser inside the second's body and took it for its own body
    still coming: the connection was half-closed, the second upload dropped unanswered."""
    body = os.urandom(size)
    names = [f"pipe-{size}-{i}.pkg" for i in range(2)]
    get = f"GET /api/v1/packages/{names[1]} HTTP/1.1\r\nHost: t\r\n".encode() + AUTH + b"\r\n"
    with socket.create_connection(("127.0.0.1", door.port), timeout=30) as s:
        s.sendall(put_head(names[0], size) + body + put_head(names[1], size) + body[::-1] + get)
        answers = read_answers(s, 3)
    assert [status for status, _ in answers] == [201, 201, 200], answers
    with door.client() as admin:
        for name, data in zip(names, [body, body[::-1]]):
            assert admin.get(f"/CasperShare/Packages/{name}").content == data
            assert admin.delete(f"/api/v1/packages/{name}").status_code == 200


def exchange(site, data: bytes, then: bytes = b"") -> int:
    """Send ``data`` (then ``then``, once the server may have answered early): the status of
    the one answer read back (0: none, the connection closed)."""
    with socket.create_connection(("127.0.0.1", site.port), timeout=10) as s:
        s.sendall(data)
        try:
            s.sendall(then)
        except OSError:  # answered early and closed: what it said is still readable
            pass
        try:
            answers = read_answers(s, 1)
        except ConnectionResetError:
            return 0
    return answers[0][0] if answers else 0


def test_a_request_hidden_in_an_upload_body_is_never_executed(door):
    """Held (what was tried): a DELETE repeated through a large body (read into buffers) and a
    small one (the parser's); Content-Length twice, with Transfer-Encoding, with leading zeros,
    not a number; an early 401 or 409 with the DELETE sent behind the declared body; a body
    cut short. The victim package stays, a refused or cut upload leaves no package, no file."""
    with door.client() as admin:
        assert admin.put("/api/v1/packages/victim.pkg", content=b"v" * 1000).status_code == 201
    smuggled = b"DELETE /api/v1/packages/victim.pkg HTTP/1.1\r\nHost: t\r\n" + AUTH + b"\r\n"

    def hidden(n: int) -> bytes:
        return (smuggled * (n // len(smuggled) + 1))[:n]

    big, small = hidden(3 * MiB), hidden(100_000)
    assert exchange(door, put_head("hid-big.pkg", len(big)) + big) == 201
    assert exchange(door, put_head("hid-small.pkg", len(small)) + small) == 201
    assert exchange(door, put_head("zeros.pkg", f"000{len(big)}") + big) == 201
    for extra in [f"Content-Length: {len(big)}\r\n".encode(), b"Content-Length: 10\r\n",
                  b"Transfer-Encoding: chunked\r\n"]:
        assert exchange(door, put_head("two.pkg", len(big), extra) + big) == 400
    for length in ["+300000", "3e5", "0x493e0", "300000,300000"]:
        assert exchange(door, put_head("nan.pkg", length) + big) == 400
    no_token = put_head("anon.pkg", len(big)).replace(AUTH, b"Authorization: Bearer nope\r\n")
    assert exchange(door, no_token + big[:1000], big[1000:] + smuggled) == 401
    assert exchange(door, put_head("victim.pkg", len(big)) + big[:1000], big[1000:] + smuggled) == 409
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as s:  # cut short
        s.sendall(put_head("cut.pkg", len(big)) + big[:len(big) // 2])
        answered(door)
    with door.client() as admin:
        assert admin.get("/api/v1/packages/victim.pkg").status_code == 200
        for name in ["two.pkg", "nan.pkg", "anon.pkg", "cut.pkg"]:
            assert admin.get(f"/api/v1/packages/{name}").status_code == 404, name
        for name in ["hid-big.pkg", "hid-small.pkg", "zeros.pkg", "victim.pkg"]:
            assert admin.delete(f"/api/v1/packages/{name}").status_code == 200
    wait_until(lambda: not list((door.data / "store" / "tmp").glob("*.part")), 15,
               what="the cut upload's temp file removed")


# ---------------------------------------------------------------- the system account


def test_no_one_but_the_system_user_reaches_sys_and_its_seed_stays_in_its_file(make_site):
    """Held (what was tried): an anonymous client and a user/password one are refused; a
    subscriber (real credential) and a peer's key as a client are refused every $SYS request
    (server ping, CONNZ, KICK, RELOAD, account CONNZ, user info); the site's own client user is
    in the global account, where no system service answers KICK, RELOAD or IDZ; a registered
    peer on a leaf link of its own asking to KICK its real link is refused and that link stays.
    The system seed is 0600 and in no other file of either site (logs, stream store, read
    model), nor in any API answer."""
    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}", "--site-name", "A"]).start_process()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}", "--site-name", "B"]).start_process()
    a.wait_healthy()
    b.wait_healthy()
    register(a, b)
    url = a.run_info()["nats"]
    b_seed = leaf_seed(b)
    b_key = public_key_of_seed(b_seed)
    wait_until(lambda: b_key in leaf_links(a), 30, what="B's link at A")
    b_cid = leaf_links(a)[b_key]
    with a.client() as admin:
        made = admin.post("/api/v1/credentials", json={"name": "sys-probe", "role": "subscriber"}).json()

    async def asks(**credentials) -> dict[str, str]:
        """What each $SYS request gets: an answer's first bytes, or the error's name; under
        "refused", the subjects the server said were a permissions violation."""
        errors: list[str] = []

        async def on_error(exc):
            errors.append(str(exc))
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, error_cb=on_error, **credentials)
        try:
            server = nc._server_info["server_id"]
            got = {}
            for subject, body in [("$SYS.REQ.SERVER.PING.IDZ", b""), ("$SYS.REQ.SERVER.PING.CONNZ", b'{"auth":true}'),
                                  (KICK.format(id=server), json.dumps({"cid": b_cid}).encode()),
                                  (RELOAD.format(id=server), b""), ("$SYS.REQ.SERVER.PING.STATZ", b"")]:
                try:
                    got[subject.replace(server, "<id>")] = (await nc.request(subject, body, timeout=0.3)).data[:40].decode()
                except (NatsTimeout, NoRespondersError) as exc:
                    got[subject.replace(server, "<id>")] = type(exc).__name__
            await nc.flush(5)
            got["server"] = server
            got["refused"] = {subject.replace(server.lower(), "<id>") for e in errors
                              if (subject := e.partition('publish to "')[2].rstrip('"'))}
            return got
        finally:
            await nc.close()

    # A connect that meets a reload of the users (the new credential's, then the system user's
    # check that it is in force) is reset: it is made again, and only then its answer counts.
    def connected(**credentials) -> dict | None:
        try:
            return asyncio.run(asks(**credentials))
        except ConnectionError:
            return None

    def refusal(**credentials) -> str | None:
        try:
            asyncio.run(asks(**credentials))
        except nats.errors.Error as exc:
            return str(exc)
        except ConnectionError:
            return None
        return "connected"

    for credentials in [{}, {"user": "admin", "password": "admin"}]:
        assert "Authorization Violation" in wait_until(lambda: refusal(**credentials), 30, what="an answer")
    for credentials in [{"nkeys_seed_str": made["seed"], "inbox_prefix": made["inbox_prefix"]},
                        {"nkeys_seed_str": b_seed}]:
        got = wait_until(lambda: connected(**credentials), 30, what="a connection as that user")
        asked = {k for k in got if k.startswith("$SYS")}
        assert {got[k] for k in asked} == {"TimeoutError"}, got  # unanswered
        assert got["refused"] == {k.lower() for k in asked}, got  # because refused
    own = wait_until(lambda: connected(nkeys_seed_str=read_seed(a.data / "nats-client.nk")), 30,
                     what="a connection as the site's own client")
    for subject in ["$SYS.REQ.SERVER.PING.IDZ", "$SYS.REQ.SERVER.<id>.KICK", "$SYS.REQ.SERVER.<id>.RELOAD"]:
        assert own[subject] == "NoRespondersError", own
    assert leaf_links(a).get(b_key) == b_cid

    intruder = RawLeaf(leaf, b_seed)  # B's own key on a link of its own
    try:
        kick = KICK.format(id=own["server"]).encode()
        body = json.dumps({"cid": b_cid}).encode()
        intruder.listen("_INBOX.>")
        intruder.send(b"LMSG " + kick + b" _INBOX.k1 " + str(len(body)).encode() + b"\r\n" + body + b"\r\nPING\r\n")
        assert intruder.read(lambda: b"Permissions Violation" in intruder.buf, 5), intruder.buf[:300]
        assert b"LMSG _INBOX.k1" not in intruder.buf
    finally:
        intruder.close()
    assert leaf_links(a).get(b_key) == b_cid

    seed = read_seed(a.data / SYSTEM_SEED_FILE)
    assert stat.S_IMODE((a.data / SYSTEM_SEED_FILE).stat().st_mode) == 0o600
    leaked = [str(p) for site in (a, b) for p in [site.log_path, *site.data.rglob("*")]
              if p.is_file() and p.name != SYSTEM_SEED_FILE and seed.encode() in p.read_bytes()]
    assert leaked == []
    with a.client() as admin:
        for path in ["/api/v1/site", "/api/v1/settings", "/api/v1/peers", "/api/v1/credentials", "/metrics",
                     "/api/v1/events?limit=1000"]:
            r = admin.get(path)
            assert r.status_code == 200 and seed not in r.text, path


# ---------------------------------------------------------------- a body that stalls


def test_a_stalled_upload_body_is_dropped_and_a_slow_one_is_not(make_site):
    """A writer's upload that announces 100 MiB, sends 300 KB (its two hash/write threads
    started) and goes quiet was held for ever: connection, temp file, threads; a hundred of
    them held 200 threads. Now body_timeout_s without a byte closes it and nothing is kept. A
    body that keeps coming, however slowly, is never cut."""
    site = make_site(env={"ODST_BODY_TIMEOUT_S": "1"}).start()
    tmp = site.data / "store" / "tmp"
    with socket.create_connection(("127.0.0.1", site.port), timeout=30) as stalled:
        stalled.sendall(put_head("stalled.pkg", 100 * MiB) + os.urandom(300_000))
        wait_until(lambda: list(tmp.glob("*.part")), 10, what="the stalled upload's temp file")
        stalled.settimeout(15)
        try:
            assert stalled.recv(65536) == b""  # closed by the server, nothing answered
        except ConnectionResetError:
            pass
    wait_until(lambda: not list(tmp.glob("*.part")), 15, what="the stalled upload's temp file removed")
    assert "request body timed out" in site.log(1 << 20)

    data = os.urandom(400_000)
    with socket.create_connection(("127.0.0.1", site.port), timeout=30) as slow:
        slow.sendall(put_head("slow.pkg", len(data)) + data[:1000])
        for i in range(1, 9):  # a piece every 0.3 s, 2.4 s in all: more than two timeouts
            time.sleep(0.3)  # the client's pace, not a wait for the server
            slow.sendall(data[i * 1000:(i + 1) * 1000])
        slow.sendall(data[9000:])
        assert [status for status, _ in read_answers(slow, 1)] == [201]
    with site.client() as admin:
        assert admin.get("/CasperShare/Packages/slow.pkg").content == data


# ---------------------------------------------------------------- uploads per user


def test_one_token_cannot_hold_more_than_its_large_uploads(make_site):
    """Each large upload holds two threads while its body comes; a writer's token could open
    hundreds at once. Now one user or token has at most uploads_per_user large uploads in
    progress (per gateway process): one more is answered 429 before its body is read, and
    nothing of it is kept. Small uploads, and other tokens, are not held back; an upload that
    ends gives its place back."""
    site = make_site(env={"ODST_UPLOADS_PER_USER": "3"}).start()
    tmp = site.data / "store" / "tmp"
    stalled = [socket.create_connection(("127.0.0.1", site.port), timeout=30) for _ in range(3)]
    try:
        for i, c in enumerate(stalled):
            c.sendall(put_head(f"held-{i}.pkg", 100 * MiB) + os.urandom(300_000))
        wait_until(lambda: len(list(tmp.glob("*.part"))) == 3, 15, what="three uploads in progress")
        with socket.create_connection(("127.0.0.1", site.port), timeout=30) as one_more:
            one_more.sendall(put_head("one-more.pkg", 100 * MiB) + os.urandom(300_000))
            [(status, body)] = read_answers(one_more, 1)
        assert status == 429 and json.loads(body)["error"] == "too_many_uploads"
        assert len(list(tmp.glob("*.part"))) == 3
        with site.client() as admin:
            refused = admin.put("/api/v1/packages/refused.pkg", content=os.urandom(300_000))
            assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
            assert admin.put("/api/v1/packages/small.pkg", content=os.urandom(8192)).status_code == 201
            other = admin.post("/api/v1/tokens", json={"name": "another writer", "role": "operator"}).json()
            with httpx.Client(base_url=site.url, timeout=30,
                              headers={"Authorization": f"Bearer {other['token']}"}) as writer:
                assert writer.put("/api/v1/packages/other.pkg", content=os.urandom(300_000)).status_code == 201
            stalled.pop().close()  # its upload ends (client gone): its place is free again
            body = os.urandom(300_000)
            wait_until(lambda: admin.put("/api/v1/packages/next.pkg", content=body).status_code == 201, 15,
                       what="a large upload taken again once one of the three ended")
    finally:
        for c in stalled:
            c.close()
