"""A site's data directory: where its files are, and the lock of the process serving it."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path


class SiteBusy(Exception):
    """Another process is serving this data directory."""


def key_path(data: Path) -> Path:
    return Path(data) / "site.key"


def read_model_path(data: Path) -> Path:
    return Path(data) / "read-model.sqlite"


def run_dir(data: Path) -> Path:
    return Path(data) / "run"


def running_info(data: Path) -> dict | None:
    """What a running ``odst serve`` on this data dir published about itself, if one runs."""
    lock = run_dir(data) / "serve.lock"
    if not lock.exists():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads((run_dir(data) / "site.json").read_text())
            except (OSError, ValueError):
                return {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DataDirLock:
    def __init__(self, data: Path):
        self.path = run_dir(data) / "serve.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise SiteBusy(f"another odst process is using {self.path.parent.parent}; stop it first") from None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
