"""Rough edges a newcomer hits first: one port per site, flags checked before anything is made,
CLI output a person can read (headers, names, the SHA-512 Jamf records, upload outcome)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import ADMIN_TOKEN, free_port, run_odst, wait_until

MiB = 1 << 20


def _listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:port, from the kernel's own table (one per process with SO_REUSEPORT)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "0A" and local == f"0100007F:{port:04X}":
            n += 1
    return n


# ---------------------------------------------------------------- two sites, one port

def test_a_second_site_on_a_served_port_is_refused_and_the_first_keeps_it(make_site, tmp_path):
    first = make_site("a", extra_args=["--site-name", "Paris"], env={"ODST_HTTP_WORKERS": "2"}).start()
    # Its own second gateway process joins the port: two listening sockets, both this site's.
    wait_until(lambda: _listeners(first.port) == 2, 30, what="the site's second gateway process to listen")

    other = tmp_path / "b"
    r = run_odst("serve", "--data", str(other), "--http", f"127.0.0.1:{first.port}",
                 env={"ODST_ADMIN_TOKEN": "another-token-0123456789"}, timeout=60)
    assert r.returncode == 2, r.stderr
    assert f"127.0.0.1:{first.port} is already in use" in r.stderr
    assert "serving on" not in r.stderr and "Traceback" not in r.stderr
    assert not other.exists(), "a refused site must not have made its data directory"

    # A role process of another site is refused the same way.
    r = run_odst("gateway", "--data", str(other), "--nats", "nats://127.0.0.1:1",
                 "--http", f"127.0.0.1:{first.port}", timeout=60)
    assert r.returncode == 2 and "already in use" in r.stderr, r.stderr

    assert _listeners(first.port) == 2
    with first.client() as c:
        for _ in range(8):  # whichever of its processes answers, it is this site
            assert c.get("/api/v1/site").json()["name"] == "Paris"


# ---------------------------------------------------------------- flags checked first

@pytest.mark.parametrize("flags, says", [
    (["--http", "127.0.0.1:80800"], "port from 1 to 65535"),
    (["--http", "127.0.0.1"], "HOST:PORT"),
    (["--http", "no-such-host.invalid:8080"], "does not resolve"),
    (["--leaf-listen", "127.0.0.1:0"], "leaf_listen"),
    (["--public-url", "odst.example.org"], "public_url"),
    (["--accept-stage", "staging"], "staging"),
])
def test_bad_serve_flags_fail_before_the_data_directory_is_made(tmp_path, flags, says):
    data = tmp_path / "never"
    r = run_odst("serve", "--data", str(data), *flags, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not data.exists()


def test_scenario_help_is_the_runners_help():
    r = run_odst("scenario", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: odst scenario") and "run" in r.stdout


# ---------------------------------------------------------------- output for people

def test_cli_output_names_sites_shows_sha512_and_says_what_an_upload_did(make_site, tmp_path):
    site = make_site("a", extra_args=["--site-name", "Paris"]).start()
    flags = ["--server", site.url, "--token", ADMIN_TOKEN]
    site_id = site.client().get("/api/v1/site").json()["site"]

    r = run_odst("peer", "list", *flags)
    assert r.returncode == 0 and r.stdout.startswith("no peers"), r.stdout
    r = run_odst("packages", *flags)
    assert r.returncode == 0 and r.stdout == "" and "no packages" in r.stderr

    body = b"\xca\xfe" * MiB
    path = tmp_path / "Café.pkg"
    path.write_bytes(body)
    r = run_odst("upload", str(path), *flags, "--quiet")
    assert r.returncode == 0, r.stderr
    assert '"Café.pkg"' in r.stdout, "names are printed as written, not \\u-escaped"
    assert json.loads(r.stdout)["result"] == "uploaded" and "new content uploaded" in r.stderr
    r = run_odst("upload", str(path), *flags, "--quiet")
    assert r.returncode == 0 and json.loads(r.stdout)["result"] == "identical"
    assert "identical" in r.stderr and "nothing changed" in r.stderr

    sha512 = hashlib.sha512(body).hexdigest()
    r = run_odst("packages", "--sha512", *flags)
    header, row = [line.split("\t") for line in r.stdout.splitlines()]
    assert header == ["NAME", "SIZE", "STAGE", "SHA1", "SHA512", "AVAILABLE AT"]
    assert row == ["Café.pkg", str(len(body)), "prod", hashlib.sha1(body).hexdigest(), sha512, "Paris"]

    r = run_odst("package", "Café.pkg", *flags)
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(":", 1) for line in r.stdout.splitlines() if not line.startswith(" ") and ":" in line)
    assert fields["sha512"].strip() == sha512 and fields["size"].strip() == f"{len(body)} bytes"
    assert "  Paris\tavailable" in r.stdout
    r = run_odst("package", "Nope.pkg", *flags)
    assert r.returncode == 2 and "404" in r.stderr and "Traceback" not in r.stderr

    r = run_odst("state", *flags)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"site Paris ({site_id})")
    assert "  Café.pkg\tprod\tParis" in r.stdout.splitlines()


def test_the_first_admin_password_file_goes_when_the_password_changes(make_site):
    site = make_site("a").start()
    shown = site.data / "admin-password"
    assert shown.exists(), "a generated first password is kept for the operator"
    with site.client() as c:
        r = c.patch("/api/v1/users/admin", json={"password": "a brand new passphrase 42"})
        assert r.status_code == 200, r.text
    assert not shown.exists(), "a file holding a password that no longer works misleads"
