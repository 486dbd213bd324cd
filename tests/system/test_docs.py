"""The documentation site: ``mkdocs build --strict`` passes (a broken link, a missing include
or page fails it), the API page is the app's OpenAPI document, and every command of the quick
start runs, in order, against a temp directory: the wheel installed with pipx, a site on
127.0.0.1, upload, download, audit."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import httpx
import pytest

from harness.ports import free_port
from harness.wait import wait_until
from tests.dist import CHECKOUT, build_dist, complete_wheelhouse

DOCS = CHECKOUT / "docs"
QUICKSTART = DOCS / "quickstart.md"
BIN = Path(sys.executable).parent


class StandIn:
    """A site with settings and an id; anything else the app takes while it is assembled is a
    placeholder (the schema never calls it)."""

    def __init__(self, **known):
        self.__dict__.update(known)

    def __getattr__(self, name):
        return StandIn()

    def __call__(self, *args, **kwargs):
        return StandIn()


def test_the_site_builds_strictly_and_its_api_page_is_the_apps_openapi(tmp_path):
    out = tmp_path / "site"
    done = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--config-file", str(CHECKOUT / "mkdocs.yml"),
                           "--site-dir", str(out)], capture_output=True, text=True, cwd=CHECKOUT, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    from odst.config import Settings
    from odst.gateway.app import create_app
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = create_app(StandIn(settings=Settings(), id="t")).openapi_schema.to_schema()
    published = json.loads((out / "openapi.json").read_text())
    assert published["paths"].keys() == expected["paths"].keys()
    page = (out / "api" / "index.html").read_text()
    for path, ops in expected["paths"].items():
        for op in ops.values():
            if isinstance(op, dict) and op.get("operationId"):
                assert f"<code>{op['operationId']}</code>" in page, op["operationId"]
    for name in ("architecture", "security", "backup", "kubernetes", "macos", "install", "events", "metrics"):
        assert (out / name / "index.html").is_file(), name
    assert "Journeys" in (out / "architecture" / "index.html").read_text()  # ARCHITECTURE.md included


def test_every_odst_metric_the_docs_name_exists():
    named = set(re.findall(r"\bodst_[a-z_]+", (DOCS / "metrics.md").read_text()))
    code = (CHECKOUT / "odst" / "gateway" / "metrics.py").read_text()
    assert named and all(f'"{m}"' in code for m in named), sorted(m for m in named if f'"{m}"' not in code)


def quickstart_blocks() -> list[tuple[str, str]]:
    """The quick start's blocks in order: ("run" | "background", code) and ("stop", "")."""
    blocks, text = [], QUICKSTART.read_text()
    for m in re.finditer(r"<!-- quickstart(?:: (background|stop))? -->\n(?:```sh\n(.*?)```)?", text, re.S):
        kind = m.group(1) or "run"
        blocks.append((kind, m.group(2) or ""))
    return blocks


def test_the_quick_start_marks_every_shell_block():
    fences = re.findall(r"^```sh$", QUICKSTART.read_text(), re.M)
    assert len([b for b in quickstart_blocks() if b[0] != "stop"]) == len(fences) >= 3


@pytest.mark.skipif(not (BIN / "pipx").exists(), reason="pipx is in the test extras: pip install -e '.[test]'")
def test_every_command_of_the_quick_start_runs(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    wheel, _ = build_dist(tmp_path / "dist")
    shutil.copy(wheel, work)
    (work / "Firefox.pkg").write_bytes(os.urandom(1 << 20) + b"quick start")
    # the wheelhouse holds every dependency: pipx's pip installs from it, offline and fast
    house = complete_wheelhouse(wheel)
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "pipx").symlink_to(BIN / "pipx")  # pipx only: not the checkout's odst
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ODST_", "PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update({"PIPX_HOME": str(tmp_path / "pipx"), "PIPX_BIN_DIR": str(tmp_path / "bin"),
                "PIPX_MAN_DIR": str(tmp_path / "man"), "PIP_NO_INDEX": "1",
                "PIP_FIND_LINKS": str(house), "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PATH": os.pathsep.join([str(tmp_path / "bin"), str(tools), env.get("PATH", "/usr/bin:/bin")])})
    server = None
    try:
        for kind, code in quickstart_blocks():
            code = code.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
            if kind == "background":
                log = open(tmp_path / "serve.log", "wb")
                server = subprocess.Popen(["bash", "-c", f"exec {code.strip()}"], cwd=work, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

                def healthy() -> bool:
                    assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
                wait_until(healthy, 90, 0.1, "the quick start's site", reraise=(AssertionError,))
            elif kind == "stop":
                os.killpg(server.pid, signal.SIGTERM)
                assert server.wait(60) == 0, (tmp_path / "serve.log").read_text()[-3000:]
                server = None
            else:
                done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env,
                                      capture_output=True, text=True, timeout=300)
                assert done.returncode == 0, f"{code}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
                if "odst audit" in code:
                    assert "violations  0" in done.stdout and "packages    1" in done.stdout, done.stdout
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)
    assert (tmp_path / "bin" / "odst").exists(), "pipx did not put odst on the PATH"
