"""What the packaging tests share: the wheel and sdist built from this checkout, a wheelhouse
of every dependency, and a cache directory that survives between runs.

The cache (``$ODST_TEST_CACHE``, default ``~/.cache/odst-tests``) holds what is slow to make and
changes rarely: the wheelhouse (``wheels/``: pip downloads into it only when an install from it
alone fails, so a new dependency heals it) and the container tests' Debian rootfs. CI keeps it
between runs to pay once.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    d = Path(os.environ.get("ODST_TEST_CACHE") or Path.home() / ".cache" / "odst-tests")
    d.mkdir(parents=True, exist_ok=True)
    return d


def build_dist(out: Path) -> tuple[Path, Path]:
    """``python -m build`` of this checkout into ``out``: (wheel, sdist). One build at a time
    (a lock file in the cache): the build writes ``odst.egg-info`` and ``build/`` into the
    checkout, and two at once (the container and packaging tests, on two xdist workers) broke
    each other's sdist ("No such file or directory")."""
    with open(cache_dir() / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(CHECKOUT)],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"python -m build failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    wheels, sdists = sorted(out.glob("odst-*.whl")), sorted(out.glob("odst-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, f"expected one wheel and one sdist in {out}: {list(out.iterdir())}"
    return wheels[0], sdists[0]


BUILD_REQUIREMENTS = ["setuptools>=77"]  # to build odst, and nkeys (an sdist only), offline


def wheelhouse(requirements: list[str]) -> Path:
    """``<cache>/wheels``, holding ``requirements``, all their dependencies and what building
    odst from source needs (wheels, and an sdist where a project publishes no wheel). No odst:
    the tests install the one they built."""
    house = cache_dir() / "wheels"
    house.mkdir(exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                           "-d", str(house), *requirements, *BUILD_REQUIREMENTS],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"pip download into {house} failed:\n{done.stderr[-3000:]}"
    for own in house.glob("odst-*"):
        own.unlink()
    return house


def pip_install(python: Path, *args: str, house: Path) -> None:
    """Install into the environment of ``python`` from the wheelhouse alone (fast, no index);
    if something is missing there, fill the wheelhouse from the configured index and retry."""
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--disable-pip-version-check",
           "--no-index", "--find-links", str(house), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        wheelhouse([a for a in args if not a.startswith("-")])
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"pip install {' '.join(args)} failed:\n{done.stderr[-3000:]}"


def complete_wheelhouse(wheel: Path) -> Path:
    """The cached wheelhouse, filled when it lacks something ``wheel`` (or building odst from
    source) needs: a dry run against it alone is a few seconds, a fill is a download."""
    house = cache_dir() / "wheels"
    dry = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--disable-pip-version-check",
                          "--ignore-installed", "--no-index", "--find-links", str(house), str(wheel),
                          *BUILD_REQUIREMENTS, "pip"], capture_output=True, text=True, timeout=300)
    return house if dry.returncode == 0 else wheelhouse([str(wheel), "pip"])
