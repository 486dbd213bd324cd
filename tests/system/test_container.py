"""The container image, built and run here: the Dockerfile is built by Debian's buildah
(``--isolation chroot``, no daemon) on a debootstrapped Debian bookworm with Debian's python3,
and ``odst serve`` runs inside the built image on the host network (127.0.0.1): upload,
download, healthcheck, JSON logs, then ``odst audit`` in the same container.

What is slow and changes rarely is cached in ``tests/dist.cache_dir()`` (the rootfs tarball)
and in buildah's image store (the base image ``localhost/odst-test-base:bookworm``), so only
the first run pays for debootstrap. Registry images are never pulled: ``BASE_IMAGE`` is the
local base, and pip installs from a wheelhouse mounted into the build (``PIP_ARGS``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest

from harness.ports import free_port
from harness.wait import wait_until
from tests.dist import CHECKOUT, build_dist, cache_dir, complete_wheelhouse

pytestmark = [
    pytest.mark.container,
    pytest.mark.timeout(1800),  # a cold cache debootstraps and builds: minutes (see the module docstring)
    pytest.mark.skipif(shutil.which("buildah") is None,
                       reason="buildah is not installed (tests/system-deps.sh installs it as root on Debian/Ubuntu)"),
]

BASE = "localhost/odst-test-base:bookworm"
TOKEN = "container-admin-token-0123456789"
BASE_PACKAGES = "python3,python3-venv"  # Debian's python3 (3.11 on bookworm) and its venv module


def buildah(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"buildah {' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def debian_mirror() -> str:
    """The Debian mirror apt already uses (``ODST_TEST_DEBIAN_MIRROR`` overrides)."""
    if os.environ.get("ODST_TEST_DEBIAN_MIRROR"):
        return os.environ["ODST_TEST_DEBIAN_MIRROR"]
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in sources:
        try:
            text = f.read_text()
        except OSError:
            continue
        for url in re.findall(r"(?:^deb\s+(?:\[[^\]]*\]\s+)?|^URIs:\s*)(\S+/debian)/?\s", text, re.M):
            return url
    return "http://deb.debian.org/debian"


def base_image() -> str:
    """``localhost/odst-test-base:bookworm``: made once from a cached debootstrap rootfs."""
    if buildah("inspect", "--type", "image", BASE, check=False).returncode == 0:
        return BASE
    ctx = cache_dir() / "base"
    tarball = ctx / "rootfs.tar"
    if not tarball.exists():
        assert shutil.which("debootstrap"), "debootstrap is not installed (tests/system-deps.sh installs it)"
        ctx.mkdir(parents=True, exist_ok=True)
        root = ctx / "rootfs"
        for _ in range(2):
            shutil.rmtree(root, ignore_errors=True)
            done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm",
                                   str(root), debian_mirror()], capture_output=True, text=True, timeout=900)
            # once more only for debootstrap's own exec check: it runs a script it has just
            # written, and on a fresh machine (the first cold cache) that failed once with
            # "Text file busy" (the file still open for writing somewhere); the next test's
            # attempt a minute later went through
            if done.returncode == 0 or "Text file busy" not in done.stderr:
                break
        assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        subprocess.run(["tar", "-C", str(root), "-cf", f"{tarball}.part", "."], check=True, timeout=600)
        os.replace(f"{tarball}.part", tarball)
        shutil.rmtree(root)
    (ctx / "Containerfile").write_text(
        "FROM scratch\nADD rootfs.tar /\n"
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8\n"
        'CMD ["/bin/bash"]\n')
    buildah("build", "--isolation", "chroot", "-t", BASE, "-f", str(ctx / "Containerfile"), str(ctx))
    return BASE


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> dict:
    """The Dockerfile built on the Debian base; its config and size."""
    started = time.monotonic()
    base = base_image()
    base_s = time.monotonic() - started
    wheel, _ = build_dist(tmp_path_factory.mktemp("dist"))
    house = complete_wheelhouse(wheel)
    # One tag, kept: its layers are the next run's cache (the dependencies' layer above all);
    # the image it replaces becomes dangling and is pruned.
    tag = "localhost/odst-test:latest"
    # --layers: the base's and the dependencies' layers are reused while they are the same. The
    # wheelhouse is mounted read-only into the RUN steps (-v) at a fixed path, so PIP_ARGS, part
    # of the cache key, is the same on every run.
    buildah("build", "--isolation", "chroot", "--network", "host", "--format", "docker", "--layers",
            "-v", f"{house}:/wheelhouse:ro",
            "--build-arg", f"BASE_IMAGE={base}",
            "--build-arg", "PIP_ARGS=--no-index --find-links /wheelhouse",
            "-t", tag, "-f", str(CHECKOUT / "Dockerfile"), str(CHECKOUT), timeout=1200)
    try:
        info = json.loads(buildah("inspect", "--type", "image", tag).stdout)
        size = human_bytes(json.loads(buildah("images", "--json", tag).stdout)[0]["size"])
        print(f"\nimage {tag}: {size / 1e6:.0f} MB; base ready in {base_s:.0f} s, "
              f"image built in {time.monotonic() - started - base_s:.0f} s")
        yield {"tag": tag, "info": info, "size": size}
    finally:
        buildah("rmi", "--prune", check=False)  # earlier builds' images; the tagged one's layers stay


def human_bytes(text: str) -> float:
    """buildah's "314 MB" (decimal units) as bytes."""
    number, unit = text.split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit.upper()]


def test_the_image_runs_as_a_non_root_user_with_a_healthcheck_and_json_logs(image):
    config = image["info"]["Docker"]["config"]
    assert config["User"] == "odst:odst"
    assert "ODST_LOG_FORMAT=json" in config["Env"]
    assert config["Entrypoint"] == ["odst"]
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])
    assert image["size"] < 600e6, f"image is {image['size'] / 1e6:.0f} MB"


def test_a_site_runs_in_the_built_image(image, tmp_path):
    ctr = buildah("from", "--name", f"odst-test-{uuid.uuid4().hex[:12]}", image["tag"]).stdout.strip().splitlines()[-1]
    port = free_port()
    log_path = tmp_path / "serve.log"
    proc = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(["buildah", "run", "--isolation", "chroot", "--network", "host",
                                     "-e", f"ODST_ADMIN_TOKEN={TOKEN}", ctr, "--",
                                     "odst", "serve", "--data", "/data", "--http", f"127.0.0.1:{port}"],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, f"odst serve in the container exited:\n{log_path.read_text()[-4000:]}"
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        wait_until(healthy, 120, 0.1, "odst serve in the container to become healthy", reraise=(AssertionError,))

        # the image's own healthcheck command, run in the container against this port
        test = image["info"]["Docker"]["config"]["Healthcheck"]["Test"][1:]
        check = buildah("run", "--isolation", "chroot", "--network", "host", ctr, "--",
                        *[a.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for a in test], check=False)
        assert check.returncode == 0, check.stderr

        body = os.urandom(2 << 20) + b"container"
        with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            up = c.put("/api/v1/packages/FromImage.pkg", content=body)
            assert up.status_code == 201, up.text
            assert up.json()["sha512"] == hashlib.sha512(body).hexdigest()
            down = c.get("/CasperShare/Packages/FromImage.pkg")
            assert down.status_code == 200 and down.content == body

        # an orderly stop: SIGTERM to odst serve itself (buildah run does not pass signals on)
        serve = [p for p in descendants(proc.pid) if b"odst\x00serve" in cmdline(p)
                 and b"buildah" not in cmdline(p)]
        assert serve, "odst serve not found under buildah run"
        os.kill(serve[0], signal.SIGTERM)
        proc.wait(60)
        proc = None

        lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("{")]
        events = [json.loads(ln)["event"] for ln in lines]
        assert "site open" in events and "broker stopped" in events, log_path.read_text()[-3000:]

        audit = buildah("run", "--isolation", "chroot", "--network", "host", ctr, "--",
                        "odst", "audit", "--data", "/data", check=False, timeout=180)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        assert "packages    1" in audit.stdout and "matches the rebuild" in audit.stdout, audit.stdout
        owner = buildah("run", "--isolation", "chroot", ctr, "--", "stat", "-c", "%u", "/data/site.key", check=False)
        assert owner.stdout.strip() == "10001", owner.stdout + owner.stderr
    finally:
        if proc is not None and proc.poll() is None:
            for p in descendants(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            proc.kill()
            proc.wait(30)
        buildah("rm", ctr, check=False)

