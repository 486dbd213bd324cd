"""Crashes, restarts, a second server on the same data dir, and a full disk.

Every test runs real ``odst serve`` processes (with their embedded nats-server)
on 127.0.0.1 and synchronises only by polling with a deadline.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
import threading
from pathlib import Path

import blake3
import base64
import httpx
import pytest

from tests.conftest import all_events, free_port, run_odst, upload_bytes as upload, wait_until

MiB = 1 << 20


# --- helpers -------------------------------------------------------------------------------

def procs_using(data: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names the data dir (odst serve, its nats-server)."""
    data_s = str(data)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        args = [a.decode(errors="replace") for a in args if a]
        if any(a == data_s or a.startswith(data_s + "/") for a in args):
            found.append((int(entry.name), " ".join(args)))
    return found


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def nats_pid(data: Path) -> int:
    return int((data / "run" / "nats.pid").read_text().strip())


def package_names(client: httpx.Client) -> set[str]:
    r = client.get("/api/v1/packages")
    assert r.status_code == 200, r.text
    return {p["name"] for p in r.json()["packages"]}


def download_sha1(base_url: str, name: str) -> str:
    h = hashlib.sha1()
    with httpx.stream("GET", f"{base_url}/CasperShare/Packages/{name}", timeout=60) as r:
        assert r.status_code == 200, r.read()
        for block in r.iter_bytes(MiB):
            h.update(block)
    return h.hexdigest()


def store_files(data: Path) -> tuple[list[str], list[str]]:
    store = data / "store"
    tmp = sorted(p.name for p in (store / "tmp").iterdir()) if (store / "tmp").exists() else []
    pkgs = sorted(p.name for p in (store / "packages").iterdir()) if (store / "packages").exists() else []
    return tmp, pkgs


def assert_chain(events: list[dict], site_id: str) -> None:
    """The site's own events form one unbroken chain: seq 1, 2, 3 … and prev = blake3(previous)."""
    own = [e for e in events if e["origin"] == site_id]
    prev_hash = ""
    for i, e in enumerate(own, start=1):
        env = e["envelope"]
        assert env["seq"] == i == e["seq"], f"event {e['id']} has seq {env['seq']}, expected {i}"
        assert env["prev"] == prev_hash, f"event seq {i} does not link to seq {i - 1}"
        prev_hash = blake3.blake3(base64.b64decode(e["signed"])).hexdigest()


# --- kill -9 mid-upload --------------------------------------------------------------------

def test_kill9_mid_upload_leaves_no_partial_file_and_loses_nothing(make_site):
    site = make_site().start()
    data = site.data
    first = os.urandom(3 * MiB + 123)
    with site.client() as c:
        r = upload(c, "first.pkg", first)
        assert r.status_code == 201, r.text
        first_sha1 = hashlib.sha1(first).hexdigest()
        assert r.json()["sha1"] == first_sha1
        events_before = all_events(c)
    assert any(e["type"] == "PackageUploaded" and e["envelope"]["event"]["name"] == "first.pkg"
               for e in events_before)
    broker = nats_pid(data)
    assert pid_alive(broker), "the embedded nats-server should be running"

    # A 200 MB upload whose body pauses after 32 MiB until the server has been killed.
    total, gate = 200 * MiB, 32 * MiB
    block = os.urandom(MiB)
    killed = threading.Event()
    outcome: dict = {}

    def body():
        sent = 0
        while sent < total:
            if sent == gate:
                killed.wait(120)
            yield block
            sent += len(block)

    def big_upload():
        try:
            with site.client() as c:
                outcome["response"] = c.put("/api/v1/packages/big.pkg", content=body(),
                                            headers={"Content-Length": str(total)})
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    sender = threading.Thread(target=big_upload, daemon=True)
    sender.start()
    try:
        tmp = data / "store" / "tmp"

        def part_grew():
            return any(p.stat().st_size >= 8 * MiB for p in tmp.glob("*.part"))
        wait_until(part_grew, 60, what="the upload's .part file to pass 8 MiB")
        site.kill9()
    finally:
        killed.set()
    sender.join(60)
    assert not sender.is_alive(), "the upload client should notice the dead server"
    assert "response" not in outcome, f"the interrupted upload must not succeed: {outcome}"

    # PR_SET_PDEATHSIG: the broker dies with its parent; nothing is left holding the data dir.
    try:
        wait_until(lambda: not procs_using(data), 30, what="every process using the data dir to exit")
    except AssertionError:
        raise AssertionError(f"still running after the kill: {procs_using(data)}") from None
    assert not pid_alive(broker)
    assert list(tmp.glob("*.part")), "the kill should have left a partial file for the restart to sweep"

    site.start()
    with site.client() as c:
        assert c.get("/healthz").status_code == 200
        tmp_files, pkg_files = store_files(data)
        assert tmp_files == [], f"partial files left in store/tmp: {tmp_files}"
        assert pkg_files == ["first.pkg"]
        assert package_names(c) == {"first.pkg"}
        pkg = c.get("/api/v1/packages/first.pkg").json()
        assert pkg["sha1"] == first_sha1 and pkg["size"] == len(first)
        assert download_sha1(site.url, "first.pkg") == first_sha1
        assert c.get("/api/v1/packages/big.pkg").status_code == 404
        events_after = all_events(c)
        site_id = c.get("/api/v1/site").json()["site"]
    assert events_after[:len(events_before)] == events_before
    assert not any(e["envelope"]["event"].get("name") == "big.pkg" for e in events_after)
    assert_chain(events_after, site_id)

    running = run_odst("audit", "--data", str(data))
    assert running.returncode == 0, running.stdout + running.stderr
    assert "violations  0" in running.stdout

    assert site.stop() == 0
    stopped = run_odst("audit", "--data", str(data))
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "violations  0" in stopped.stdout
    assert not procs_using(data), "audit on a stopped dir must stop the broker it started"


# --- clean restart ---------------------------------------------------------------------------

def test_restart_keeps_all_state(make_site):
    site = make_site().start()
    data = site.data
    a = os.urandom(2 * MiB + 7)
    with site.client() as c:
        assert upload(c, "a.pkg", a).status_code == 201
        before_site = c.get("/api/v1/site").json()
        before_pkgs = c.get("/api/v1/packages").json()["packages"]
        before_events = all_events(c)
    broker = nats_pid(data)

    assert site.stop() == 0, f"SIGTERM should stop the site cleanly:\n{site.log()}"
    assert not pid_alive(broker), "the embedded nats-server must be stopped with the site"
    assert not procs_using(data), procs_using(data)

    site.start()
    with site.client() as c:
        after_site = c.get("/api/v1/site").json()
        assert after_site["site"] == before_site["site"]
        assert after_site["public_key"] == before_site["public_key"]
        assert c.get("/api/v1/packages").json()["packages"] == before_pkgs
        assert all_events(c) == before_events, "a restart must not add, drop or change events"
        assert download_sha1(site.url, "a.pkg") == hashlib.sha1(a).hexdigest()

        b = os.urandom(MiB + 1)
        r = upload(c, "b.pkg", b)  # the same bootstrap token still works
        assert r.status_code == 201, r.text
        assert r.json()["sha1"] == hashlib.sha1(b).hexdigest()
        events = all_events(c)
    assert events[:len(before_events)] == before_events
    new = events[len(before_events):]
    assert [e["type"] for e in new] == ["PackageUploaded"]
    last = before_events[-1]
    assert new[0]["seq"] == last["seq"] + 1
    assert new[0]["envelope"]["prev"] == blake3.blake3(base64.b64decode(last["signed"])).hexdigest()
    assert_chain(events, before_site["site"])


# --- a second server on the same data dir --------------------------------------------------

def test_second_serve_on_same_data_dir_is_refused_and_harmless(make_site):
    site = make_site().start()
    data = site.data
    site_json = (data / "run" / "site.json").read_text()
    broker = nats_pid(data)

    second = run_odst("serve", "--data", str(data), "--http", f"127.0.0.1:{free_port()}",
                      env={"ODST_ADMIN_TOKEN": "another-token-0123456789"}, timeout=60)
    assert second.returncode != 0
    assert str(data) in second.stderr, f"the message should name the data dir:\n{second.stderr}"
    assert "Traceback" not in second.stderr, second.stderr

    # The first site is untouched: same broker, same run file, still serving and writing.
    assert site.proc.poll() is None
    assert pid_alive(broker) and nats_pid(data) == broker
    assert (data / "run" / "site.json").read_text() == site_json
    body = os.urandom(MiB)
    with site.client() as c:
        assert c.get("/healthz").status_code == 200
        r = upload(c, "after.pkg", body)
        assert r.status_code == 201, r.text
    assert download_sha1(site.url, "after.pkg") == hashlib.sha1(body).hexdigest()
    audit = run_odst("audit", "--data", str(data))
    assert audit.returncode == 0, audit.stdout + audit.stderr


# --- disk full -------------------------------------------------------------------------------

@pytest.fixture
def small_store(tmp_path):
    mnt = tmp_path / "small-store"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"this test needs to mount a tmpfs (run as root with CAP_SYS_ADMIN): "
                    f"mount exited {r.returncode}: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def raw_put_headers_only(port: int, path: str, token: str, length: int, timeout: float = 10):
    """Send only the request head announcing ``length`` bytes; return (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                   f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"connection closed before a response: {buf!r}"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
        want = int(headers.get("content-length", "0"))
        while len(rest) < want:
            chunk = s.recv(65536)
            assert chunk, "connection closed mid-response"
            rest += chunk
        return status, rest[:want]


def test_disk_full(small_store, make_site):  # this order: the site stops before the unmount
    site = make_site(env={"ODST_STORE": str(small_store)}).start()
    assert (small_store / "tmp").is_dir(), "the site should put its store on the small file system"
    with site.client() as c:
        events_before = all_events(c)

        # (a) an announced length that cannot fit: refused before any byte of the body is read.
        status, body = raw_put_headers_only(site.port, "/api/v1/packages/huge.pkg", site.token,
                                            64 * MiB)
        assert status == 507, body
        assert b"space" in body.lower()

        # (b) a chunked upload (no Content-Length) that fills the disk on the way.
        def twenty_mib():
            for _ in range(20):
                yield os.urandom(MiB)
        r = c.put("/api/v1/packages/chunked.pkg", content=twenty_mib())
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 507, r.text
        err = r.json()
        assert err["error"] == "insufficient_storage" and "space" in err["detail"].lower(), err
        assert sorted(os.listdir(small_store / "tmp")) == []
        assert sorted(os.listdir(small_store / "packages")) == []
        assert all_events(c) == events_before, "a failed upload must not record an event"
        assert package_names(c) == set()
        assert c.get("/healthz").status_code == 200

        # The space is back: a 1 MB upload works, streamed ...
        streamed = os.urandom(1_000_000)
        r = c.put("/api/v1/packages/streamed.pkg", content=iter([streamed]))
        assert r.status_code == 201, r.text
        assert r.json()["sha1"] == hashlib.sha1(streamed).hexdigest()

        # ... and with an announced length, as `odst upload` sends it.
        small = os.urandom(1_000_000)
        r = upload(c, "small.pkg", small)
        assert r.status_code == 201, r.text
        assert r.json()["sha1"] == hashlib.sha1(small).hexdigest()
        assert sorted(os.listdir(small_store / "packages")) == ["small.pkg", "streamed.pkg"]
    assert download_sha1(site.url, "small.pkg") == hashlib.sha1(small).hexdigest()


def test_a_pull_that_fills_the_disk_fails_whole_and_reports_every_write(small_store):
    """A pull into a store that runs out of space mid-way (several chunk writes in flight on the
    writer thread): it fails with the disk's error, and no write's failure goes unread (asyncio's
    "exception was never retrieved" is a failure nobody handled)."""
    import asyncio
    import gc
    import random

    from odst.replicator.puller import Puller, Want
    from odst.store.hashing import manifest_of
    from tests.sources import MemorySource

    data = random.Random(3).randbytes(12 * MiB)  # the tmpfs holds 8 MiB
    want = Want.of(manifest_of([data], MiB), name="big.pkg", stage="prod", origin="sa",
                   uploaded_ts=1, uploaded_by="t")
    unhandled = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        puller = Puller(want, [(MemorySource("sa", data, MiB), 0.0)], small_store, streams=4,
                        on_bad_source=lambda *a: None)
        try:
            await puller.run()
        except OSError as exc:
            failure = (exc.errno, str(exc))  # kept without its traceback, which holds the frames
        else:
            failure = None
        del puller
        gc.collect()  # an unread failed future reports itself when it is collected
        await asyncio.sleep(0)
        return failure

    failure = asyncio.run(main())
    gc.collect()
    assert failure is not None and failure[0] == errno.ENOSPC, failure
    assert unhandled == [], [c.get("message") for c in unhandled]


def test_a_package_too_big_for_the_receiving_store_is_not_pulled_and_the_others_are(small_store, make_site):
    """B's store (8 MiB) cannot hold a 12 MiB package A holds: B does not start it (it would
    fill the disk and its partial file would starve the rest), says why once in its log of
    events and in its transfers, tries again later, and still pulls what fits."""
    from tests.system.test_replication import register, site_id, state

    leaf = free_port()
    a = make_site("a", extra_args=["--leaf-listen", f"127.0.0.1:{leaf}"]).start()
    b = make_site("b", extra_args=["--leaf-remote", f"nats-leaf://127.0.0.1:{leaf}"],
                  env={"ODST_STORE": str(small_store)}).start()
    register(a, b)
    b_id = site_id(b)
    big, small = os.urandom(12 * MiB), os.urandom(300_000)
    with a.client() as c:
        assert upload(c, "big.pkg", big).status_code == 201
        assert upload(c, "small.pkg", small).status_code == 201

    def big_transfer():
        return next((t for t in state(b)["transfers"] if t["name"] == "big.pkg"), None)

    wait_until(lambda: (big_transfer() or {}).get("status") == "failed", 60, what="B to give up on big.pkg for now")
    assert "not enough free space" in big_transfer()["detail"], big_transfer()
    with b.client() as c:
        wait_until(lambda: c.get("/api/v1/packages/small.pkg").json()["availability"].get(b_id, {}).get("status")
                   == "available", 60, what="small.pkg at B")
    assert download_sha1(b.url, "small.pkg") == hashlib.sha1(small).hexdigest()
    log = b.log_path
    wait_until(lambda: log.read_text().count("not enough free space in the store for a pull") >= 2, 30,
               what="B to look at big.pkg again")
    with b.client() as c:
        failures = [e for e in all_events(c) if e["type"] == "PackageTransferFailed"
                    and e["envelope"]["event"]["name"] == "big.pkg"]
    assert len(failures) == 1 and "not enough free space" in failures[0]["envelope"]["event"]["reason"], failures
    assert not [p for p in os.listdir(small_store / "tmp") if p.endswith(".repl")]
    assert "never retrieved" not in log.read_text()
