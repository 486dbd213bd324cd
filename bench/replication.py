#!/usr/bin/env python3
"""ODST replication benchmark: sites on one machine, physical yardsticks in the same run.

Starts real ``odst serve`` processes (``sys.executable -m odst serve``, each with
its own data dir and embedded NATS, 127.0.0.1 only, free ports; a site that
dials another's leaf port is started once that one is healthy) and measures,
side by side:

1. HTTP pair (A listens, B dials A, registered): a package uploaded at A until
   B's availability for it says ``available`` (B pulls runs of chunks from A's gateway),
   vs an ``rsync`` daemon pull of the same file on the same machine (warm cache
   for both, DEST deleted between runs), interleaved. Targets (issue 13): odst/rsync
   <= 1.6, odst/``rsync --fsync`` <= 1.2 (the receiver fsyncs before it announces a
   package; plain rsync does not); CPU-seconds per GiB of the receiving site (python +
   its nats-server) <= 2.0 and of the sending site <= 0.8, shown per run beside rsync's
   receiver and sender (daemon) CPU per GiB.
2. NATS pair: the same, with A started with ``--public-url http://127.0.0.1:9``
   (a closed port) so B can only fetch chunks over NATS request/reply through the
   leaf link. Target: >= 150 MB/s.
3. Hub + 4 spokes (each registered with the hub): upload at the hub until all 4
   spokes have it, vs 4 concurrent rsync pulls of the same file from the daemon.
   Target: <= 1.5x. Also shown: the HTTP pair time and rsync x4 vs x1.
4. 3-site chain A <- B <- C (registered A-B and B-C only): a 1 MiB package
   uploaded at A until available at C, from the start of the upload, median of
   ``--chain-uploads`` (10). Target: < 2 s.
5. Peak RSS (VmRSS sampled every 100 ms after a VmHWM reset, and VmHWM) of a
   fresh receiving ``odst serve`` python process while it pulls a big package
   (``--big-mib``, default 4096; ``--skip-big`` skips it) over HTTP. Target: < 150 MiB.

Every figure is printed with the machine's 1-minute load average during its runs (the
machine may be shared: compare ratios within one run, not absolute times across runs).

Timing for 1-3: from the moment the upload's 201 arrives until the receiving
sites log "package available" (their logs are read every 20 ms: no request to the
receiver while it pulls, as none is made to rsync), taken to the millisecond from that
log line, then confirmed by one ``GET /api/v1/packages/NAME`` per site (which is polled
every second too, in case a log line is missed);
every upload is distinct content (its first bytes are tagged). Medians of
``--repeats`` (3) runs. Per run the JSON also has CPU-seconds of every site
(python and nats-server) during the transfer, the receiver's log timeline, and
the CPU-seconds other processes on the machine used meanwhile (the machine may
be shared: a large figure there means a noisy run).

It is a report: a missed target does not fail the run; exit status 2 means some
measurement could not run. Output: a table on stdout, progress on stderr,
everything in ``<work>/replication.json`` (``--work``, default
/tmp/odst-bench-repl). Site logs are kept in ``<work>/sites/<topology>/<site>.log``
(and ``-nats.log``); data dirs are deleted unless ``--keep-data``. The input
files are kept for the next run.

Plain stdlib + subprocess (rsync is installed with apt-get when missing).
Every process started here is stopped at the end, also on failure or Ctrl-C.

Usage (from the repo root):
    .venv/bin/python bench/replication.py                      # full run, ~4-5 min
    .venv/bin/python bench/replication.py --size-mib 128 --skip-big   # quick run
    .venv/bin/python bench/replication.py --only nats,chain    # some measurements
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, median, print_table, ratio  # noqa: E402  (puts the checkout's harness on sys.path)
from harness.network import Network, ScenarioFailed, Site  # noqa: E402
from harness.wait import TimedOut, wait_until  # noqa: E402
from urllib.parse import quote

MIB = 1024 * 1024
MB = 1_000_000
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
POLL_S = 0.020
TRANSFER_POLL_S = 0.020  # during a measured transfer: the receivers' logs are read this often
TRANSFER_API_POLL_S = 1.0  # ... and their API asked this seldom (each request is work the receiver's CPU counts)
REPO = Path(__file__).resolve().parent.parent

GIB = 1024 * MIB
TARGET_HTTP_RATIO = 1.6       # odst pair time / rsync daemon pull time, at most
TARGET_FSYNC_RATIO = 1.2      # odst pair time / rsync --fsync pull time, at most
TARGET_RECV_CPU = 2.0         # receiving site's CPU-seconds per GiB, at most
TARGET_SEND_CPU = 0.8         # sending site's CPU-seconds per GiB, at most
TARGET_NATS_MBPS = 150.0      # MB/s over NATS request/reply, at least
TARGET_HUB_RATIO = 1.5        # hub->4 spokes time / 4 concurrent rsync pulls, at most
TARGET_CHAIN_S = 2.0          # median 1 MiB latency A -> C, below
TARGET_RSS_MIB = 150.0        # receiver peak RSS, below


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #

def log(msg: str) -> None:
    print(f"[repl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A measurement could not be made (the message says why)."""


def tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _child_setup() -> None:  # between fork and exec: die with the bench, own process group
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setpgrp()


def proc_cpu(pid: int | None, *, children: bool = False) -> float | None:
    """CPU-seconds of a process (``children``: and of the children it has reaped, such as the
    rsync daemon's forks)."""
    if not pid:
        return None
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    return sum(int(x) for x in rest[11:15 if children else 13]) / CLK_TCK


def proc_cpu_with_children(pid: int | None) -> float | None:
    return proc_cpu(pid, children=True)


def has_children(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return bool(Path(f"/proc/{pid}/task/{pid}/children").read_text().strip())
    return False


def loadavg1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def proc_status_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def system_busy_s() -> float:
    """CPU-seconds all processes on the machine have used so far (/proc/stat, not idle/iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def make_random_file(path: Path, size: int) -> Path:
    if path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    log(f"writing {size // MIB} MiB of random bytes to {path}")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MIB)
            f.write(os.urandom(n))
            left -= n
    tmp.rename(path)
    return path


def warm(path: Path) -> None:
    """Read the whole file so it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


# --------------------------------------------------------------------------- #
# uploads (stdlib http.client: the bytes go out as fast as the socket takes them)
# --------------------------------------------------------------------------- #

def _put_package(port: int, token: str, name: str, size: int, write_body, timeout: float) -> dict:
    """PUT ``size`` bytes, written by ``write_body(conn)``, as package ``name``; the package
    JSON, or BenchError unless 201."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest("PUT", f"/api/v1/packages/{quote(name, safe='')}")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        write_body(conn)
        r = conn.getresponse()
        raw = r.read()
    except (OSError, http.client.HTTPException) as exc:
        raise BenchError(f"upload of {name} to :{port} failed: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    if r.status != 201:
        raise BenchError(f"upload of {name} to :{port} answered {r.status}: {raw[:500]!r}")
    return json.loads(raw)


def upload(port: int, token: str, name: str, path: Path, tag: bytes = b"",
           timeout: float = 600.0) -> tuple[dict, float]:
    """PUT the file as package ``name``; ``tag`` overwrites its first bytes so every upload is
    distinct content. Returns (package JSON, seconds); raises BenchError unless 201."""
    def send_file(conn) -> None:
        with open(path, "rb", buffering=0) as f:
            first = True
            while block := f.read(MIB):
                if first and tag:
                    block = tag[:len(block)] + block[len(tag):]
                first = False
                conn.send(block)
    t0 = time.monotonic()
    pkg = _put_package(port, token, name, path.stat().st_size, send_file, timeout)
    return pkg, time.monotonic() - t0


def upload_bytes(port: int, token: str, name: str, data: bytes, timeout: float = 60.0) -> dict:
    return _put_package(port, token, name, len(data), lambda conn: conn.send(data), timeout)


# --------------------------------------------------------------------------- #
# sites: the one harness (harness.network.Network of harness.site.SiteProcess)
# --------------------------------------------------------------------------- #

def network(ctx, label: str) -> Network:
    """A network of sites under ``<work>/sites/<label>``, its story on stderr; stopped at the end."""
    net = Network(ctx["sites_root"] / label, title=label, out=sys.stderr, admin_token=ctx["token"])
    ctx["networks"].append(net)
    return net


def check_running(s: Site) -> None:
    if s.proc is not None and s.proc.poll() is not None:
        raise BenchError(f"site {s.name} exited with code {s.proc.returncode}; "
                         f"see {s.log_path}:\n{s.log_tail(25)}")


def availability(net: Network, s: Site, name: str) -> dict:
    """Site ``s``'s own availability entry for package ``name`` ({} when unknown yet)."""
    pkg = net.package(s, name)
    return (pkg or {}).get("availability", {}).get(s.id, {})


def site_cpu(s: Site) -> dict:
    """CPU-seconds so far of the site's python process and of its nats-server."""
    nats_pid = None
    with contextlib.suppress(OSError, ValueError):
        nats_pid = int((s.data / "run" / "nats.pid").read_text().strip())
    return {"python": proc_cpu(s.proc.pid if s.proc else None), "nats": proc_cpu(nats_pid)}


def stop(net: Network, keep_data: bool) -> None:
    """Stop every site; keep each site's logs (its nats.log copied beside it), drop its data."""
    net.close()
    for s in net.sites.values():
        if s.nats_log.exists():
            with contextlib.suppress(OSError):
                shutil.copy(s.nats_log, s.data.parent / f"{s.name}-nats.log")
        if not keep_data:
            shutil.rmtree(s.data, ignore_errors=True)


class LogWatch:
    """New lines of a site's log since the watch began, read without asking the site anything."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.rest = b""

    def lines(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.rest + data
        end = data.rfind(b"\n") + 1  # a line still being written waits for its end
        data, self.rest = data[:end], data[end:]
        return data.decode(errors="replace").splitlines()


def wait_available(net: Network, sites: list[Site], name: str, t0: float, timeout: float,
                   poll_s: float = POLL_S, logs: dict[str, LogWatch] | None = None) -> dict[str, float]:
    """Poll every ``poll_s`` until each site says it holds ``name``; returns seconds since t0 per site.
    With ``logs`` (a LogWatch per site name) each site's log is read every ``poll_s`` for its
    "package available" line, and its API asked only once that is seen (or every
    TRANSFER_API_POLL_S): the pull is not slowed by the bench's requests."""
    done: dict[str, float] = {}
    last: dict[str, dict] = {}
    logged: set[str] = set()
    asked: dict[str, float] = {}
    needle = f"package={name} "

    def all_there() -> bool:
        now = time.monotonic()
        for s in sites:
            if s.name in done:
                continue
            check_running(s)
            if logs is not None:
                if any("package available" in line and needle in line + " " for line in logs[s.name].lines()):
                    logged.add(s.name)
                if s.name not in logged and now - asked.get(s.name, t0) < TRANSFER_API_POLL_S:
                    continue
                asked[s.name] = now
            a = availability(net, s, name)
            if a.get("status") == "available":
                done[s.name] = time.monotonic() - t0
            else:
                last[s.name] = a
        return len(done) == len(sites)

    try:
        wait_until(all_there, timeout, poll_s, f"{name} to be available", reraise=(BenchError, ScenarioFailed))
    except TimedOut:
        pend = {n: a for n, a in last.items() if n not in done}
        raise BenchError(f"{name} not available at {', '.join(pend)} after {timeout:.0f}s "
                         f"(last availability: {pend})") from None
    return done


def warm_up(net: Network, at: Site, receivers: list[Site], timeout: float) -> float:
    """A small package through the whole topology: links, mirrors, registration and transport work."""
    name = f"warmup-{secrets.token_hex(3)}.pkg"
    upload_bytes(at.port, at.token, name, os.urandom(2 * MIB))
    secs = wait_available(net, receivers, name, time.monotonic(), timeout)
    log(f"{net.title}: warm-up package reached {', '.join(s.name for s in receivers)} "
        f"in {max(secs.values()):.2f}s")
    return round(max(secs.values()), 3)


class RssSampler:
    """Samples VmRSS of one pid every 100 ms (after resetting its VmHWM)."""

    def __init__(self, pid: int, interval: float = 0.1):
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.samples = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "RssSampler":
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self.hwm_reset = True
        except OSError:
            pass
        self.start_kib = proc_status_kib(self.pid, "VmRSS") or 0
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            v = proc_status_kib(self.pid, "VmRSS")
            if v:
                self.peak_kib = max(self.peak_kib, v)
                self.samples += 1
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join(5)
        hwm = proc_status_kib(self.pid, "VmHWM")
        return {"peak_vmrss_mib": self.peak_kib / 1024, "vmhwm_mib": (hwm / 1024) if hwm else None,
                "hwm_reset": self.hwm_reset, "start_vmrss_mib": self.start_kib / 1024,
                "samples": self.samples,
                "peak_mib": max(self.peak_kib, hwm if (hwm and self.hwm_reset) else 0) / 1024}


def cpu_delta(before: dict, after: dict) -> dict:
    out = {}
    for k in before:
        b, a = before[k], after.get(k)
        out[k] = None if (a is None or b is None) else round(a - b, 2)
    return out


def transfer(net: Network, src: Site, dsts: list[Site], file: Path, name: str, timeout: float,
             rss_of: Site | None = None) -> dict:
    """Upload ``file`` at src as ``name`` (distinct content via a tag); time until every dst has it."""
    tag = f"odst-bench {name} {time.time_ns()} ".encode().ljust(64, b".")
    warm(file)
    cpu0 = {s.name: site_cpu(s) for s in [src, *dsts]}
    sampler = RssSampler(rss_of.proc.pid).start() if rss_of else None
    logs = {d.name: LogWatch(d.log_path) for d in dsts}
    try:
        pkg, up_s = upload(src.port, src.token, name, file, tag)
        t0 = time.monotonic()
        wall0 = time.time()
        cpu_mid = {s.name: site_cpu(s) for s in [src, *dsts]}
        sys_mid, self_mid = system_busy_s(), self_cpu_s()
        per_site = wait_available(net, dsts, name, t0, timeout, TRANSFER_POLL_S, logs)
    finally:
        rss = sampler.stop() if sampler else None
    cpu1 = {s.name: site_cpu(s) for s in [src, *dsts]}
    sys_end, self_end = system_busy_s(), self_cpu_s()
    for d in dsts:
        f = d.data / "store" / "packages" / name
        if not f.exists() or f.stat().st_size != pkg["size"]:
            raise BenchError(f"{d.name} says {name} is available but {f} is missing or the wrong size")
    timeline = {d.name: log_timeline(d.log_path, name, wall0) for d in dsts}
    for d in dsts:  # the receiver's own log says when (ms); the slower poll only says that
        logged = timeline[d.name].get("package available")
        if logged is not None and 0 < logged < per_site[d.name]:
            per_site[d.name] = logged
    secs = max(per_site.values())
    ours = sum(v or 0 for n in cpu_mid for v in cpu_delta(cpu_mid[n], cpu1[n]).values())
    other = (sys_end - sys_mid) - ours - (self_end - self_mid)
    cpu_s = {n: cpu_delta(cpu_mid[n], cpu1[n]) for n in cpu0}
    out = {"name": name, "size": pkg["size"], "upload_s": round(up_s, 3), "seconds": round(secs, 3),
           "cpu_s_per_gib": {n: round(sum(v or 0 for v in c.values()) / (pkg["size"] / GIB), 3)
                             for n, c in cpu_s.items()},  # python + its nats-server, per GiB moved
           "per_site_s": {k: round(v, 3) for k, v in per_site.items()},
           "mb_per_s": round(pkg["size"] / MB / secs, 1),
           "cpu_s": cpu_s,
           "upload_cpu_s": {n: cpu_delta(cpu0[n], cpu_mid[n]) for n in cpu0},
           "sites_cpu_s": round(ours, 2), "bench_cpu_s": round(self_end - self_mid, 2),
           "other_cpu_s": round(max(other, 0.0), 2),  # other processes on the (shared) machine
           "loadavg": Path("/proc/loadavg").read_text().split()[:3], "load1": loadavg1(),
           "timeline": timeline}
    if rss:
        out["rss"] = rss
    return out


_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z \[\w+\s*\] (.+?)\s{2,}")


def log_timeline(path: Path, name: str, wall0: float) -> dict:
    """Seconds after the upload returned at which the receiver logged 'pulling package' and
    'package available' for ``name`` (best effort: console log format)."""
    import datetime as _dt
    out: dict = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return out
    needle = f"package={name} "
    for line in lines:
        if needle not in line + " ":
            continue
        m = _LOG_TS.match(line)
        if not m:
            continue
        event = m.group(2).strip()
        if event in ("pulling package", "package available") and event not in out:
            ts = _dt.datetime.fromisoformat(m.group(1)).replace(tzinfo=_dt.timezone.utc).timestamp()
            out[event] = round(ts - wall0, 3)
    return out


def served_and_transfers(net: Network, src: Site, dst: Site) -> dict:
    return {"chunks_served_by_src": net.state(src).get("chunks_served", {}),
            "bad_chunks_at_dst": net.state(dst).get("bad_chunks_from", {})}


# --------------------------------------------------------------------------- #
# rsync yardstick
# --------------------------------------------------------------------------- #

def ensure_rsync() -> str:
    found = shutil.which("rsync")
    if found:
        return found
    log("rsync not found; installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    for cmd in (prefix + ["apt-get", "update", "-q"], prefix + ["apt-get", "install", "-y", "-q", "rsync"]):
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if p.returncode != 0 and "install" in cmd:
            raise BenchError(f"apt-get install rsync failed: {p.stderr[-500:]}")
    found = shutil.which("rsync")
    if not found:
        raise BenchError("rsync still not found after apt-get install")
    return found


class RsyncDaemon:
    def __init__(self, work: Path, module_dir: Path):
        self.dir = work / "rsync"
        self.module_dir = module_dir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.last_cpu: dict = {}

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "rsyncd.conf"
        lines = [f"port = {self.port}", f"address = {HOST}", "use chroot = no",
                 f"pid file = {self.dir / 'rsyncd.pid'}", f"log file = {self.dir / 'rsyncd.log'}",
                 f"uid = {os.getuid()}", f"gid = {os.getgid()}",
                 "[mod]", f"path = {self.module_dir}", "read only = yes"]
        conf.write_text("\n".join(lines) + "\n")
        (self.dir / "rsyncd.pid").unlink(missing_ok=True)
        logf = open(self.dir / "rsyncd.out", "ab")
        self.proc = subprocess.Popen(["rsync", "--daemon", "--no-detach", f"--config={conf}",
                                      f"--port={self.port}", f"--address={HOST}"],
                                     stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_child_setup)
        logf.close()
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"rsync daemon exited: {tail(self.dir / 'rsyncd.out')} "
                                 f"{tail(self.dir / 'rsyncd.log')}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), timeout=1):
                return
            if time.monotonic() > deadline:
                raise BenchError("rsync daemon did not start listening within 15 s")
            time.sleep(0.05)

    def pull_many(self, name: str, n: int, timeout: float = 900) -> float:
        """``n`` concurrent pulls of the same file into n destinations (the fan-out yardstick)."""
        dest_dir = self.dir / "dest"
        shutil.rmtree(dest_dir, ignore_errors=True)
        dests = [dest_dir / str(i) for i in range(n)]
        for d in dests:
            d.mkdir(parents=True)
        warm(self.module_dir / name)
        t0 = time.monotonic()
        procs = [subprocess.Popen(["rsync", f"rsync://{HOST}:{self.port}/mod/{name}", str(d / name)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_child_setup)
                 for d in dests]
        try:
            for p in procs:
                p.wait(max(1.0, timeout - (time.monotonic() - t0)))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(5)
        secs = time.monotonic() - t0
        bad = [p.returncode for p in procs if p.returncode != 0]
        size = (self.module_dir / name).stat().st_size
        if bad or any((d / name).stat().st_size != size for d in dests):
            raise BenchError(f"concurrent rsync pulls failed: exit codes {[p.returncode for p in procs]}")
        shutil.rmtree(dest_dir, ignore_errors=True)
        return secs

    def _served_cpu(self) -> float | None:
        """The daemon's CPU-seconds so far, its finished per-connection children included."""
        pid = self.proc.pid if self.proc else None
        if pid:
            with contextlib.suppress(TimedOut):  # its child for the last pull may still be exiting
                wait_until(lambda: not has_children(pid), 5, 0.01, "the rsync daemon's children to exit")
        return proc_cpu_with_children(pid)

    def pull(self, name: str, extra: list[str] | None = None, timeout: float = 600) -> float:
        """Seconds for one pull; ``last_cpu`` has the receiver's and the daemon's CPU-seconds."""
        dest_dir = self.dir / "dest"
        shutil.rmtree(dest_dir, ignore_errors=True)
        dest_dir.mkdir(parents=True)
        dest = dest_dir / name
        warm(self.module_dir / name)
        served0 = self._served_cpu()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)  # only reaped children count: the rsync client
        t0 = time.monotonic()
        p = subprocess.run(["rsync", *(extra or []), f"rsync://{HOST}:{self.port}/mod/{name}", str(dest)],
                           capture_output=True, text=True, timeout=timeout)
        secs = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        served1 = self._served_cpu()
        self.last_cpu = {"receiver": round(ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime, 3),
                         "sender": None if None in (served0, served1) else round(served1 - served0, 3)}
        stderr = p.stderr
        if p.returncode != 0:
            raise BenchError(f"rsync pull failed ({p.returncode}): {stderr[-500:]}")
        if dest.stat().st_size != (self.module_dir / name).stat().st_size:
            raise BenchError("rsync produced a file of the wrong size")
        shutil.rmtree(dest_dir, ignore_errors=True)
        return secs

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir / "dest", ignore_errors=True)


# --------------------------------------------------------------------------- #
# measurements
# --------------------------------------------------------------------------- #

def per_gib(cpu: dict, size: int) -> dict:
    return {k: None if v is None else round(v / (size / GIB), 3) for k, v in cpu.items()}


def transfer_timeout(size: int) -> float:
    return max(120.0, size / (5 * MB))


def receiver_env(args) -> dict[str, str]:
    """The pulling sites' settings from the command line (``--streams``)."""
    return {"ODST_REPLICATION_STREAMS": str(args.streams)} if args.streams else {}


def pair(net: Network, args, a_args: list[str] = ()) -> tuple[Site, Site, float]:
    """A listens, B dials A; registered (invite at the spoke, join at the hub: the hub admits
    the spoke's leaf link for the exchange, as it refuses unknown keys); warmed up. Returns
    (A, B, warm-up seconds)."""
    a = net.add("A", listen=True, args=a_args)
    b = net.add("B", dial=[a], env=receiver_env(args))
    net.start(timeout=args.start_timeout)
    net.register(b, a)
    return a, b, warm_up(net, a, [b], 120)


def measure_http_pair(args, ctx, file: Path) -> dict:
    res: dict = {"runs": [], "rsync_s": [], "rsync_fsync_s": [], "rsync_cpu": [], "rsync_fsync_cpu": [],
                 "load1": []}
    rsyncd = RsyncDaemon(ctx["work"], file.parent)
    net = network(ctx, "http-pair")
    try:
        rsyncd.start()
        rsync_fsync_ok = True
        a, b, res["warmup_s"] = pair(net, args)
        size = file.stat().st_size
        for i in range(args.repeats):
            r = rsyncd.pull(file.name)
            res["rsync_s"].append(round(r, 3))
            res["rsync_cpu"].append(per_gib(rsyncd.last_cpu, size))
            res["load1"].append(loadavg1())
            log(f"http-pair: rsync daemon pull #{i + 1}: {r:.3f}s ({size / MB / r:.0f} MB/s; "
                f"CPU-s/GiB {res['rsync_cpu'][-1]}; load {res['load1'][-1]})")
            run = transfer(net, a, [b], file, f"pair-http-{i}.pkg", transfer_timeout(size), rss_of=b)
            res["runs"].append(run)
            res["load1"].append(run["load1"])
            log(f"http-pair: odst A->B #{i + 1}: {run['seconds']:.3f}s ({run['mb_per_s']:.0f} MB/s; "
                f"upload took {run['upload_s']:.2f}s; B peak RSS {run['rss']['peak_mib']:.0f} MiB; "
                f"CPU-s/GiB {run['cpu_s_per_gib']}; load {run['load1']})")
            if rsync_fsync_ok:
                try:
                    rf = rsyncd.pull(file.name, ["--fsync"])
                    res["rsync_fsync_s"].append(round(rf, 3))
                    res["rsync_fsync_cpu"].append(per_gib(rsyncd.last_cpu, size))
                    log(f"http-pair: rsync --fsync pull #{i + 1}: {rf:.3f}s")
                except BenchError as exc:
                    rsync_fsync_ok = False
                    log(f"http-pair: rsync --fsync not usable: {exc}")
        res["odst_s"] = median([r["seconds"] for r in res["runs"]])
        res["rsync_median_s"] = median(res["rsync_s"])
        res["rsync_fsync_median_s"] = median(res["rsync_fsync_s"])
        res["ratio"] = ratio(res["odst_s"], res["rsync_median_s"])
        res["fsync_ratio"] = ratio(res["odst_s"], res["rsync_fsync_median_s"])
        res["recv_cpu_per_gib"] = median([r["cpu_s_per_gib"]["B"] for r in res["runs"]])
        res["send_cpu_per_gib"] = median([r["cpu_s_per_gib"]["A"] for r in res["runs"]])
        res["rsync_recv_cpu_per_gib"] = median([c["receiver"] for c in res["rsync_cpu"]])
        res["rsync_send_cpu_per_gib"] = median([c["sender"] for c in res["rsync_cpu"]])
        res["load1_median"] = median(res["load1"])
        res["served"] = served_and_transfers(net, a, b)
    finally:
        rsyncd.stop()
        stop(net, args.keep_data)
    return res


def measure_rss(args, ctx, big: Path) -> dict:
    """Peak RSS of a fresh receiving site while it pulls the big package over HTTP."""
    net = network(ctx, "rss-pair")
    res: dict = {}
    try:
        a, b, res["warmup_s"] = pair(net, args)
        bsize = big.stat().st_size
        log(f"rss: uploading {bsize // MIB} MiB at A, sampling B's VmRSS every 100 ms (VmHWM reset)")
        run = transfer(net, a, [b], big, "big-rss.pkg", transfer_timeout(bsize), rss_of=b)
        res.update(run=run, peak_mib=run["rss"]["peak_mib"], size_mib=bsize // MIB)
        log(f"rss: B pulled {bsize // MIB} MiB in {run['seconds']:.2f}s ({run['mb_per_s']:.0f} MB/s), "
            f"peak RSS {run['rss']['peak_mib']:.1f} MiB (VmHWM {fmt(run['rss']['vmhwm_mib'], '', 1)}, "
            f"sampled {run['rss']['peak_vmrss_mib']:.1f}, at start {run['rss']['start_vmrss_mib']:.1f}); "
            f"cpu {run['cpu_s']}; timeline {run['timeline']}")
    finally:
        stop(net, args.keep_data)
    return res


def measure_nats_pair(args, ctx, file: Path) -> dict:
    res: dict = {"runs": []}
    net = network(ctx, "nats-pair")
    try:
        a, b, res["warmup_s"] = pair(net, args, a_args=["--public-url", "http://127.0.0.1:9"])  # closed port: no HTTP
        size = file.stat().st_size
        for i in range(args.repeats):
            run = transfer(net, a, [b], file, f"pair-nats-{i}.pkg", transfer_timeout(size), rss_of=b)
            res["runs"].append(run)
            log(f"nats-pair: odst A->B #{i + 1}: {run['seconds']:.3f}s ({run['mb_per_s']:.0f} MB/s; "
                f"B peak RSS {run['rss']['peak_mib']:.0f} MiB; cpu {run['cpu_s']})")
        res["odst_s"] = median([r["seconds"] for r in res["runs"]])
        res["mb_per_s"] = size / MB / res["odst_s"]
        res["served"] = served_and_transfers(net, a, b)
        http_failures = 0
        with contextlib.suppress(OSError):
            http_failures = sum(1 for line in b.log_path.read_text(errors="replace").splitlines()
                                if "chunk fetch failed" in line and "transport=http" in line)
        res["http_attempts_refused_at_b"] = http_failures
    finally:
        stop(net, args.keep_data)
    return res


def measure_hub(args, ctx, file: Path, spokes: int = 4) -> dict:
    res: dict = {"runs": [], "rsync1_s": [], "rsync4_s": [], "load1": []}
    net = network(ctx, "hub")
    rsyncd = RsyncDaemon(ctx["work"], file.parent)
    try:
        rsyncd.start()
        hub = net.add("H", listen=True)
        sp = [net.add(f"S{i + 1}", dial=[hub], env=receiver_env(args)) for i in range(spokes)]
        net.start(timeout=args.start_timeout)
        for s in sp:
            net.register(hub, s)
        res["warmup_s"] = warm_up(net, hub, sp, 180)
        size = file.stat().st_size
        for i in range(args.repeats):
            r1 = rsyncd.pull(file.name)
            r4 = rsyncd.pull_many(file.name, spokes)
            res["rsync1_s"].append(round(r1, 3))
            res["rsync4_s"].append(round(r4, 3))
            res["load1"].append(loadavg1())
            log(f"hub: rsync yardstick: 1 pull {r1:.3f}s, {spokes} concurrent pulls {r4:.3f}s "
                f"({r4 / r1:.2f}x)")
            run = transfer(net, hub, sp, file, f"hub-{i}.pkg", transfer_timeout(size) * 2)
            res["runs"].append(run)
            res["load1"].append(run["load1"])
            log(f"hub: H->4 spokes #{i + 1}: {run['seconds']:.3f}s (per spoke {run['per_site_s']}; "
                f"CPU-s/GiB {run['cpu_s_per_gib']}; load {run['load1']})")
        res["odst_s"] = median([r["seconds"] for r in res["runs"]])
        res["rsync1_median_s"] = median(res["rsync1_s"])
        res["rsync4_median_s"] = median(res["rsync4_s"])
        res["rsync_fanout_ratio"] = ratio(res["rsync4_median_s"], res["rsync1_median_s"])
        res["ratio"] = ratio(res["odst_s"], res["rsync4_median_s"])
        res["load1_median"] = median(res["load1"])
        st = net.state(hub)
        res["chunks_served_by_hub"] = st.get("chunks_served", {})
        res["chunks_served_by_spokes"] = {s.name: net.state(s).get("chunks_served", {})
                                          for s in sp}
    finally:
        rsyncd.stop()
        stop(net, args.keep_data)
    return res


def measure_chain(args, ctx) -> dict:
    res: dict = {"runs": []}
    net = network(ctx, "chain")
    try:
        a = net.add("A", listen=True)
        b = net.add("B", listen=True, dial=[a])
        c = net.add("C", dial=[b])
        net.start(timeout=args.start_timeout)
        net.register(a, b)
        net.register(b, c)
        res["warmup_s"] = warm_up(net, a, [b, c], 180)
        for i in range(args.chain_uploads):
            name = f"chain-{i}.pkg"
            data = os.urandom(MIB)
            t0 = time.monotonic()
            upload_bytes(a.port, a.token, name, data)
            t_up = time.monotonic()
            got = wait_available(net, [c], name, t0, 60)
            run = {"name": name, "seconds": round(got["C"], 3), "upload_s": round(t_up - t0, 3),
                   "after_upload_s": round(got["C"] - (t_up - t0), 3)}
            res["runs"].append(run)
            log(f"chain: {name} at C {run['seconds']:.3f}s after the upload began "
                f"(upload {run['upload_s']:.3f}s)")
        res["median_s"] = median([r["seconds"] for r in res["runs"]])
        res["load1"] = loadavg1()
        res["max_s"] = max(r["seconds"] for r in res["runs"])
        res["median_after_upload_s"] = median([r["after_upload_s"] for r in res["runs"]])
    finally:
        stop(net, args.keep_data)
    return res


# --------------------------------------------------------------------------- #
# site log findings
# --------------------------------------------------------------------------- #

_LEVEL = re.compile(r"\[(warning|error|critical|exception)\s*\]|^\S+ \S+ (WARNING|ERROR|CRITICAL) ")
_NATS_LEVEL = re.compile(r"\[(ERR|WRN|FTL)\]")
_NOISE = re.compile(r"^\S+\s+")  # leading timestamp


def scan_logs(root: Path) -> dict:
    """Warnings / errors / tracebacks per site log under root, with a few distinct examples."""
    out: dict = {}
    for path in sorted(root.glob("*/*.log")):
        counts: dict[str, int] = {}
        examples: dict[str, str] = {}
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            m = _LEVEL.search(line) or _NATS_LEVEL.search(line)
            if "Traceback (most recent call last)" in line:
                level = "traceback"
            elif m:
                level = next(g for g in m.groups() if g).lower()
            else:
                continue
            counts[level] = counts.get(level, 0) + 1
            key = re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "#", _NOISE.sub("", line, count=1))[:120]
            if key not in examples and len(examples) < 6:
                examples[key] = line[:300]
        if counts:
            out[str(path.relative_to(root))] = {"counts": counts, "examples": list(examples.values())}
    return out


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

def fmt(v, unit="", digits=2):
    if v is None:
        return "-"
    return f"{v:.{digits}f}{unit}"


def verdict(ok) -> str:
    return "-" if ok is None else ("meets" if ok else "MISSES")


def build_rows(results: dict, size_mib: int) -> list[list[str]]:
    rows = []
    h = results.get("http_pair") or {}
    hload = fmt(h.get("load1_median"), "", 1)
    if "odst_s" in h:
        r = h.get("ratio")
        rows.append([f"{size_mib} MiB A->B over HTTP", fmt(h["odst_s"], " s", 3),
                     f"rsync daemon {fmt(h.get('rsync_median_s'), ' s', 3)}", fmt(r, "x"),
                     f"<= {TARGET_HTTP_RATIO}x", verdict(None if r is None else r <= TARGET_HTTP_RATIO), hload])
        if h.get("rsync_fsync_median_s"):
            rr = h.get("fsync_ratio")
            rows.append(["  (same, vs rsync --fsync)", fmt(h["odst_s"], " s", 3),
                         f"rsync --fsync {fmt(h['rsync_fsync_median_s'], ' s', 3)}", fmt(rr, "x"),
                         f"<= {TARGET_FSYNC_RATIO}x", verdict(None if rr is None else rr <= TARGET_FSYNC_RATIO), hload])
        for label, key, rkey, target in (("receiver (B)", "recv_cpu_per_gib", "rsync_recv_cpu_per_gib", TARGET_RECV_CPU),
                                         ("sender (A)", "send_cpu_per_gib", "rsync_send_cpu_per_gib", TARGET_SEND_CPU)):
            v = h.get(key)
            rows.append([f"  {label} CPU-s/GiB", fmt(v, "", 2),
                         f"rsync {fmt(h.get(rkey), '', 2)}", fmt(ratio(v, h.get(rkey)), "x"),
                         f"<= {target}", verdict(None if v is None else v <= target), hload])
    n = results.get("nats_pair") or {}
    if "odst_s" in n:
        mbps = n["mb_per_s"]
        rows.append([f"{size_mib} MiB A->B over NATS req/reply", f"{mbps:.0f} MB/s ({n['odst_s']:.3f} s)",
                     f"HTTP pair {fmt(h.get('odst_s'), ' s', 3)}" if h.get("odst_s") else "-",
                     fmt(ratio(n["odst_s"], h.get("odst_s")), "x"), f">= {TARGET_NATS_MBPS:.0f} MB/s",
                     verdict(mbps >= TARGET_NATS_MBPS), fmt(median([r["load1"] for r in n["runs"]]), "", 1)])
    hb = results.get("hub") or {}
    if "odst_s" in hb:
        r = hb.get("ratio")
        bload = fmt(hb.get("load1_median"), "", 1)
        rows.append([f"{size_mib} MiB hub -> 4 spokes", fmt(hb["odst_s"], " s", 3),
                     f"rsync x4 concurrent {fmt(hb.get('rsync4_median_s'), ' s', 3)}", fmt(r, "x"),
                     f"<= {TARGET_HUB_RATIO}x", verdict(None if r is None else r <= TARGET_HUB_RATIO), bload])
        if h.get("odst_s"):
            rows.append(["  (same, vs the HTTP pair: info)", fmt(hb["odst_s"], " s", 3),
                         f"HTTP pair {fmt(h.get('odst_s'), ' s', 3)}", fmt(ratio(hb["odst_s"], h["odst_s"]), "x"),
                         "-", "-", bload])
        if hb.get("rsync_fanout_ratio"):
            rows.append([f"  (yardstick: {size_mib} MiB rsync x4 concurrent)", fmt(hb["rsync4_median_s"], " s", 3),
                         f"rsync x1 {fmt(hb['rsync1_median_s'], ' s', 3)}", fmt(hb["rsync_fanout_ratio"], "x"),
                         "-", "-", bload])
    c = results.get("chain") or {}
    if "median_s" in c:
        rows.append([f"1 MiB A->C, 3-site chain (median of {len(c['runs'])})", fmt(c["median_s"], " s", 3),
                     f"max {fmt(c['max_s'], ' s', 3)}", "-", f"< {TARGET_CHAIN_S:.0f} s",
                     verdict(c["median_s"] < TARGET_CHAIN_S), fmt(c.get("load1"), "", 1)])
    rs = results.get("rss") or {}
    if "peak_mib" in rs:
        rows.append([f"receiver peak RSS, {rs['size_mib']} MiB pull", fmt(rs["peak_mib"], " MiB", 1),
                     f"{rs['run']['seconds']:.1f} s, {rs['run']['mb_per_s']:.0f} MB/s", "-",
                     f"< {TARGET_RSS_MIB:.0f} MiB", verdict(rs["peak_mib"] < TARGET_RSS_MIB),
                     fmt(rs["run"].get("load1"), "", 1)])
    return rows


def print_details(results: dict) -> None:
    h = results.get("http_pair") or {}
    if h.get("runs"):
        print(f"HTTP pair runs (s): odst {[r['seconds'] for r in h['runs']]}  rsync {h['rsync_s']}"
              + (f"  rsync --fsync {h['rsync_fsync_s']}" if h.get("rsync_fsync_s") else ""))
        print(f"  uploads at A (s): {[r['upload_s'] for r in h['runs']]}; B peak RSS (MiB): "
              f"{[round(r['rss']['peak_mib']) for r in h['runs']]}; CPU-s per run: "
              f"{[r['cpu_s'] for r in h['runs']]}")
        print(f"  CPU-s/GiB per run: odst {[r['cpu_s_per_gib'] for r in h['runs']]}; rsync {h.get('rsync_cpu')}; "
              f"rsync --fsync {h.get('rsync_fsync_cpu')}; load (1m) per step {h.get('load1')}")
    def timelines(runs, dst):
        return ", ".join(f"{tl.get('pulling package', '?')}/{tl.get('package available', '?')}"
                         for tl in (r.get("timeline", {}).get(dst, {}) for r in runs))
    if h.get("runs"):
        print(f"  B log, s after the upload returned (pull started/available): {timelines(h['runs'], 'B')}")
    n = results.get("nats_pair") or {}
    if n.get("runs"):
        print(f"NATS pair runs (s): {[r['seconds'] for r in n['runs']]}; MB/s "
              f"{[r['mb_per_s'] for r in n['runs']]}; B peak RSS (MiB) "
              f"{[round(r['rss']['peak_mib']) for r in n['runs']]}")
        print(f"  chunks served by A: {n['served']['chunks_served_by_src']}; HTTP attempts refused at B "
              f"(log lines): {n.get('http_attempts_refused_at_b')}; CPU-s per run: "
              f"{[r['cpu_s'] for r in n['runs']]}")
        print(f"  B log, s after the upload returned (pull started/available): {timelines(n['runs'], 'B')}")
    hb = results.get("hub") or {}
    if hb.get("runs"):
        print(f"hub runs (s): {[r['seconds'] for r in hb['runs']]}; per spoke: "
              f"{[r['per_site_s'] for r in hb['runs']]}")
        print(f"  rsync x1 {hb.get('rsync1_s')}, rsync x4 concurrent {hb.get('rsync4_s')}; CPU-s per run: "
              f"{[r['cpu_s'] for r in hb['runs']]}")
        print(f"  chunks served by hub: {hb.get('chunks_served_by_hub')}; by spokes: "
              f"{hb.get('chunks_served_by_spokes')}")
    c = results.get("chain") or {}
    if c.get("runs"):
        print(f"chain 1 MiB A->C (s, from upload start): {[r['seconds'] for r in c['runs']]}; "
              f"median after the upload returned: {fmt(c.get('median_after_upload_s'), ' s', 3)}")
    rs = results.get("rss") or {}
    if rs.get("run"):
        print(f"RSS: {rs['run']['rss']}")
    other = {k: [r.get("other_cpu_s") for r in v["runs"]] for k, v in results.items()
             if isinstance(v, dict) and v.get("runs") and "other_cpu_s" in v["runs"][0]}
    if rs.get("run"):
        other["rss"] = [rs["run"].get("other_cpu_s")]
    if other:
        print(f"CPU-s used by other processes on the machine during each transfer (noise): {other}")
    warmups = {k: v["warmup_s"] for k, v in results.items() if isinstance(v, dict) and "warmup_s" in v}
    if warmups:
        print(f"warm-up (2 MiB through each topology right after registration, s): {warmups}")


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #

def git_info() -> dict:
    """The commit the sites ran, and whether odst/ had uncommitted changes (it is moving)."""
    def run(*cmd):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, timeout=10)
            return p.stdout.strip() if p.returncode == 0 else None
        return None
    dirty = run("status", "--porcelain", "--", "odst")
    return {"commit": run("rev-parse", "--short", "HEAD"), "odst_dirty": bool(dirty),
            "odst_changes": dirty.splitlines()[:20] if dirty else []}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/odst-bench-repl", help="scratch dir (default %(default)s)")
    ap.add_argument("--size-mib", type=int, default=1024, help="package size for 1-3 (default 1024)")
    ap.add_argument("--big-mib", type=int, default=4096, help="package size for the RSS check (default 4096)")
    ap.add_argument("--streams", type=int, default=0,
                    help="replication_streams of the pulling sites (default: theirs, 8)")
    ap.add_argument("--skip-big", action="store_true", help="skip the RSS check with the big package")
    ap.add_argument("--repeats", type=int, default=3, help="runs of 1-3, medians reported (default 3)")
    ap.add_argument("--chain-uploads", type=int, default=10, help="1 MiB uploads through the chain (default 10)")
    ap.add_argument("--only", default="http,rss,nats,hub,chain",
                    help="comma list of http,rss,nats,hub,chain (default all)")
    ap.add_argument("--start-timeout", type=float, default=90.0, help="seconds for a site to become healthy")
    ap.add_argument("--keep-data", action="store_true", help="keep the sites' data dirs")
    ap.add_argument("--json", default=None, help="results file (default <work>/replication.json)")
    args = ap.parse_args(argv)
    only = {x.strip() for x in args.only.split(",") if x.strip()}

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sites_root = work / "sites"
    shutil.rmtree(sites_root, ignore_errors=True)  # the previous run's sites and logs
    sites_root.mkdir(parents=True)
    results: dict = {}
    ctx = {"work": work, "sites_root": sites_root, "token": "bench-" + secrets.token_hex(16),
           "networks": [], "errors": [], "results": results}
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv, "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(), "size_mib": args.size_mib,
            "big_mib": None if args.skip_big else args.big_mib, "repeats": args.repeats,
            "poll_s": POLL_S, "work": str(work), "git": git_info()}

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    try:
        if "http" in only:
            ensure_rsync()
            meta["rsync"] = subprocess.run(["rsync", "--version"], capture_output=True,
                                           text=True).stdout.splitlines()[0]
        files = work / "files"
        file = make_random_file(files / f"repl-{args.size_mib}m.pkg", args.size_mib * MIB)
        big = None
        if args.skip_big:
            only.discard("rss")
        if "rss" in only:
            big = make_random_file(work / "bigfiles" / f"big-{args.big_mib}m.pkg", args.big_mib * MIB)
        steps = [("http", "http_pair", lambda: measure_http_pair(args, ctx, file)),
                 ("rss", "rss", lambda: measure_rss(args, ctx, big)),
                 ("nats", "nats_pair", lambda: measure_nats_pair(args, ctx, file)),
                 ("hub", "hub", lambda: measure_hub(args, ctx, file)),
                 ("chain", "chain", lambda: measure_chain(args, ctx))]
        for key, label, fn in steps:
            if key not in only:
                continue
            log(f"=== {label}")
            try:
                results[label] = fn()
            except (BenchError, ScenarioFailed) as exc:
                log(f"{label} FAILED: {exc}")
                ctx["errors"].append(f"{label}: {exc}")
                results[label] = {"error": str(exc)}
            except Exception as exc:  # a bug in the bench: report it, keep the other measurements
                traceback.print_exc()
                ctx["errors"].append(f"{label}: {type(exc).__name__}: {exc}")
                results[label] = {"error": f"{type(exc).__name__}: {exc}"}
    except KeyboardInterrupt:
        ctx["errors"].append("interrupted")
        log("interrupted; stopping every site")
    finally:
        for net in ctx["networks"]:
            with contextlib.suppress(Exception):
                stop(net, args.keep_data)

    meta["seconds"] = round(time.monotonic() - t_start, 1)
    findings = scan_logs(sites_root)
    rows = build_rows(results, args.size_mib)
    out = {"meta": meta, "results": results, "table": rows, "errors": ctx["errors"], "site_logs": findings}
    json_path = Path(args.json) if args.json else work / "replication.json"
    json_path.write_text(json.dumps(out, indent=2, default=str))

    print()
    g = meta["git"]
    print(f"ODST replication bench: {args.size_mib} MiB, {args.repeats} run(s) each (medians), "
          f"{os.cpu_count()} CPUs, {meta['seconds']} s, odst at {g['commit']}"
          + (" + uncommitted changes in odst/" if g["odst_dirty"] else ""))
    print(f"load average now: {' '.join(Path('/proc/loadavg').read_text().split()[:3])} "
          f"({os.cpu_count()} CPUs; above it the figures are noisy)")
    print_table(["measurement", "value", "baseline", "ratio", "target", "verdict", "load 1m"], rows)
    print_details(results)
    if findings:
        print("site log findings (warnings/errors; logs in " + str(sites_root) + "):")
        for path, f in findings.items():
            print(f"  {path}: {f['counts']}")
            for ex in f["examples"][:3]:
                print(f"      {ex}")
    if ctx["errors"]:
        print("errors:")
        for e in ctx["errors"]:
            print(f"  - {e[:2000]}")
    print(f"JSON: {json_path}")
    return 2 if ctx["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
