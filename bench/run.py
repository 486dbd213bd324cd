#!/usr/bin/env python3
"""ODST benchmark: one command, one machine, physical references in the same run.

Measures an ODST site (``python -m odst serve``) against yardsticks run on the
same machine in the same run:

* upload (``curl -T`` PUT, raw streamed body) vs ``sha512sum`` of the same file;
* concurrent 1 MiB ``Range`` downloads with wrk vs nginx (sendfile) serving the
  same bytes, plus server CPU seconds per GiB served;
* a single-stream whole-file ``curl`` from each;
* peak RSS of the ``odst serve`` process while a large package streams in.

It is a report: no figure fails the run. The exit status is 0 when every phase
ran, 2 when some phase could not run (see "errors" in the output and JSON).

Plain stdlib + subprocess. Everything listens on 127.0.0.1 only and every
process started here is stopped at the end, also on failure.

Usage (from the repo root):  .venv/bin/python bench/run.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, median, print_table, ratio  # noqa: E402  (puts the checkout's harness on sys.path)
from harness.site import SiteFailed, SiteProcess  # noqa: E402
from harness.wait import TimedOut  # noqa: E402
from harness.wait import wait_until as _wait_until  # noqa: E402

MIB = 1024 * 1024
GIB = 1024 * MIB
MB = 1_000_000
CLK_TCK = os.sysconf("SC_CLK_TCK")
HOST = "127.0.0.1"

TARGET_UPLOAD_RATIO = 1.3      # odst upload time / sha512sum time, at most
TARGET_UPLOAD_CPU_S_PER_GIB = 3.5  # gateway CPU-s per GiB uploaded, at most
TARGET_SMALL_PER_S = 600       # small uploads per second at --small-concurrency 8, at least
TARGET_DOWNLOAD_RATIO = 0.9    # odst / nginx wrk throughput, at least (issue 13)
TARGET_DOWNLOAD_CPU_RATIO = 1.2  # odst / nginx server CPU-s per GiB served, at most (issue 13)
TARGET_PEAK_RSS_MIB = 150      # odst serve peak RSS during the big upload, below


# --------------------------------------------------------------------------- #
# small helpers
# --------------------------------------------------------------------------- #

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tool_version(cmd: list[str]) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (p.stdout or "") + (p.stderr or "")
    return out.strip().splitlines()[0] if out.strip() else None


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- #
# /proc readers
# --------------------------------------------------------------------------- #

def proc_stat(pid: int):
    """(ppid, cpu seconds utime+stime) of one process, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2:].split()
    # rest[0] is field 3 (state); ppid is field 4, utime 14, stime 15.
    return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK


def proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def descendants(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        st = proc_stat(int(entry))
        if st is not None:
            children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo and len(out) < 10_000:
        pid = todo.pop()
        if proc_stat(pid) is None:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_by_group(root: int, classify) -> dict[str, float]:
    """CPU seconds of root's process tree, summed per classify(pid, comm)."""
    acc: dict[str, float] = {}
    for pid in descendants(root):
        st = proc_stat(pid)
        if st is None:
            continue
        group = classify(pid, proc_comm(pid))
        acc[group] = acc.get(group, 0.0) + st[1]
    return acc


def kernel_and_switches(root: int) -> tuple[float, int]:
    """(CPU seconds in the kernel, context switches of every thread) of root's process tree:
    counts that move little with the machine's load, unlike CPU per upload (each switch is a
    thread or process woken: a thread-pool hop, a GIL hand-over, a peer process's turn)."""
    kernel, switches = 0.0, 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                kernel += int(f.read().rsplit(")", 1)[1].split()[12]) / CLK_TCK
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    switches += sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
        except (OSError, IndexError, ValueError):
            continue
    return kernel, switches


def odst_classify(pid: int, comm: str) -> str:
    # The gateway is python; `odst serve` may run an embedded nats-server child.
    return "nats" if comm.startswith("nats") else "gateway"


def status_kib(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM (peak RSS) of pid to its current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sys_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _children_cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Meter:
    """Around one measured step: wall time, CPU of the command we ran (client),
    CPU of a server's process tree by group, and CPU burnt by everything else on
    the machine ("other": other people's work, kernel threads) - the noise."""

    def __init__(self, server_root: int | None = None, classify=None):
        self.root, self.classify = server_root, classify

    def __enter__(self):
        self.s0 = cpu_by_group(self.root, self.classify) if self.root else {}
        self.k0 = kernel_and_switches(self.root) if self.root else (0.0, 0)
        self.b0, self.c0, self.t0 = sys_busy_s(), _children_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        self.client_cpu = _children_cpu() - self.c0
        busy = sys_busy_s() - self.b0
        s1 = cpu_by_group(self.root, self.classify) if self.root else {}
        k1 = kernel_and_switches(self.root) if self.root else (0.0, 0)
        self.server_kernel_s, self.server_switches = k1[0] - self.k0[0], k1[1] - self.k0[1]
        self.server_cpu = {g: round(s1.get(g, 0) - self.s0.get(g, 0), 3) for g in s1}
        self.other_cpu = max(0.0, busy - self.client_cpu - sum(self.server_cpu.values()))
        self.other_cores = self.other_cpu / self.wall if self.wall > 0 else None
        return False


class RssSampler:
    """Samples VmRSS of the odst python processes every 100 ms, per phase."""

    def __init__(self, root: int, interval: float = 0.1):
        self.root = root
        self.interval = interval
        self.phase = "other"
        self.peak_main: dict[str, int] = {}
        self.peak_python_sum: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def set_phase(self, name: str) -> None:
        self.phase = name

    def _run(self):
        # Bounded: stops on request or after 6 hours at most.
        deadline = time.monotonic() + 6 * 3600
        pids: list[int] = [self.root]
        last_scan = 0.0
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            if now - last_scan > 2.0:
                pids = [p for p in descendants(self.root)
                        if odst_classify(p, proc_comm(p)) == "gateway"] or [self.root]
                last_scan = now
            main = status_kib(self.root, "VmRSS")
            if main is None:
                break
            total = sum(status_kib(p, "VmRSS") or 0 for p in pids)
            ph = self.phase
            self.peak_main[ph] = max(self.peak_main.get(ph, 0), main)
            self.peak_python_sum[ph] = max(self.peak_python_sum.get(ph, 0), total)
            self._stop.wait(self.interval)

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)


# --------------------------------------------------------------------------- #
# process management
# --------------------------------------------------------------------------- #

class Procs:
    """Every long-running process started by the bench; all stopped at the end."""

    def __init__(self):
        self.items: list[tuple[str, subprocess.Popen, int, float]] = []

    def start(self, name, cmd, *, log_path: Path, env=None, stop_sig=signal.SIGTERM,
              grace=20.0) -> subprocess.Popen:
        logf = open(log_path, "ab")
        try:
            p = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, env=env,
                                 start_new_session=True)
        finally:
            logf.close()
        return self.adopt(name, p, stop_sig=stop_sig, grace=grace)

    def adopt(self, name, p: subprocess.Popen, *, stop_sig=signal.SIGTERM, grace=20.0) -> subprocess.Popen:
        """Stop ``p`` with the others at the end (one started elsewhere, e.g. a harness SiteProcess)."""
        self.items.append((name, p, stop_sig, grace))
        log(f"started {name} pid={p.pid}: {' '.join(map(str, p.args))}")
        return p

    def stop_all(self) -> list[str]:
        problems = []
        for name, p, sig, grace in reversed(self.items):
            problems += self._stop_one(name, p, sig, grace)
        self.items.clear()
        return problems

    def stop(self, proc: subprocess.Popen) -> list[str]:
        for i, (name, p, sig, grace) in enumerate(self.items):
            if p is proc:
                del self.items[i]
                return self._stop_one(name, p, sig, grace)
        return []

    @staticmethod
    def _stop_one(name, p, sig, grace) -> list[str]:
        problems = []
        tree = descendants(p.pid) if p.poll() is None else []
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                problems.append(f"{name} (pid {p.pid}) did not exit {grace:.0f}s after "
                                f"{signal.Signals(sig).name}; killed")
                try:
                    os.killpg(p.pid, signal.SIGKILL)  # its own session/group
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    problems.append(f"{name} (pid {p.pid}) survived SIGKILL")
        # Children that outlived their parent (e.g. an embedded nats-server).
        # Give them a moment, then kill by pid: they were started by us.
        deadline = time.monotonic() + 5
        left = [c for c in tree if c != p.pid and proc_stat(c) is not None]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [c for c in left if proc_stat(c) is not None]
        for c in left:
            problems.append(f"{name}: child pid {c} ({proc_comm(c)}) still alive after "
                            f"the parent exited; killed")
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log(f"stopped {name} (exit {p.returncode})")
        return problems


def http_status(url: str, method: str = "GET", timeout: float = 2.0, headers=None):
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return None


class _Exited(Exception):
    pass


def wait_until(pred, timeout: float, interval: float = 0.2, alive=None) -> bool:
    """harness.wait.wait_until answering False instead of raising (the bench reports, it does not
    fail), and at once when ``alive()`` says the server is gone."""
    def check():
        if pred():
            return True
        if alive is not None and not alive():
            raise _Exited
        return False
    try:
        return _wait_until(check, timeout, interval, reraise=(_Exited,))
    except (TimedOut, _Exited):
        return False


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #

def ensure_random_file(path: Path, size: int) -> bool:
    """Create path with size random bytes unless it already has that size."""
    if path.exists() and path.stat().st_size == size:
        log(f"reusing {path} ({size // MIB} MiB)")
        return False
    log(f"writing {size // MIB} MiB of random bytes to {path}")
    tmp = path.with_suffix(path.suffix + ".part")
    block = 4 * MIB
    with open(tmp, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n
    os.replace(tmp, path)
    return True


def warm(path: Path) -> None:
    """Read the file once so every timed reader sees the same warm page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while f.readinto(buf):
            pass


# --------------------------------------------------------------------------- #
# upload
# --------------------------------------------------------------------------- #

def time_sha512sum(path: Path, timeout: float):
    with Meter() as m:
        p = subprocess.run(["sha512sum", str(path)], capture_output=True, text=True,
                           timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"sha512sum failed: {p.stderr.strip()}")
    return m, p.stdout.split()[0]


def time_write_fsync(src: Path, dest: Path, timeout: float):
    """Yardstick for the disk side of an upload: copy with dd, fsync at the end."""
    with Meter() as m:
        p = subprocess.run(["dd", f"if={src}", f"of={dest}", "bs=1M", "conv=fsync"],
                           capture_output=True, text=True, timeout=timeout)
    dest.unlink(missing_ok=True)
    if p.returncode != 0:
        raise RuntimeError(f"dd failed: {p.stderr.strip()[-300:]}")
    return m


def curl_upload(path: Path, url: str, token: str, body_path: Path, timeout: float,
                server_pid: int | None = None):
    """PUT the file as a raw streamed body. Returns (Meter, status, curl -w info)."""
    cmd = ["curl", "-sS", "-T", str(path), "-H", f"Authorization: Bearer {token}",
           "-o", str(body_path), "--max-time", str(int(timeout)),
           "-w", "%{http_code} %{size_upload} %{time_pretransfer} %{time_starttransfer} "
                 "%{time_total}",
           url]
    with Meter(server_pid, odst_classify) as m:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
    parts = p.stdout.split()
    info = {"curl_exit": p.returncode, "stderr": p.stderr.strip()[:500] or None}
    status = None
    if len(parts) == 5:
        status = int(parts[0])
        info.update(size_upload=int(float(parts[1])), time_pretransfer=float(parts[2]),
                    time_starttransfer=float(parts[3]), time_total=float(parts[4]))
    try:
        info["body"] = body_path.read_text(errors="replace")[:2000]
    except OSError:
        info["body"] = None
    return m, status, info


# --------------------------------------------------------------------------- #
# range correctness (small, bounded: ~12 requests per server)
# --------------------------------------------------------------------------- #

def range_checks(port: int, path: str, local: Path, size: int) -> list[dict]:
    rnd = random.Random(1234)
    results: list[dict] = []

    def req(method, headers, read_body=True, max_body=4 * MIB):
        c = http.client.HTTPConnection(HOST, port, timeout=30)
        try:
            c.request(method, path, headers=headers)
            r = c.getresponse()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            body = None
            if read_body and method != "HEAD":
                cl = int(hdrs.get("content-length", "-1"))
                body = r.read() if 0 <= cl <= max_body else None
            return r.status, hdrs, body
        finally:
            c.close()

    def expect(name, ok, detail, severity="fail"):
        results.append({"check": name, "ok": bool(ok), "detail": detail,
                        "severity": "ok" if ok else severity})

    def local_bytes(a, b):
        with open(local, "rb") as f:
            return os.pread(f.fileno(), b - a + 1, a)

    def check_range(name, spec, a, b):
        try:
            st, h, body = req("GET", {"Range": f"bytes={spec}"})
        except Exception as e:  # noqa: BLE001 - report anything
            expect(name, False, f"request failed: {e!r}")
            return
        want_cr = f"bytes {a}-{b}/{size}"
        good_body = body is not None and body == local_bytes(a, b)
        ok = st == 206 and h.get("content-range") == want_cr and good_body
        expect(name, ok, f"Range: bytes={spec} -> {st}, Content-Range "
                         f"{h.get('content-range')!r} (want {want_cr!r}), "
                         f"body {len(body) if body is not None else 'not read'} bytes"
                         f"{'' if good_body else ' MISMATCH'}")

    # HEAD
    etag = None
    try:
        st, h, _ = req("HEAD", {})
        etag = h.get("etag")
        ok = (st == 200 and h.get("content-length") == str(size))
        expect("HEAD", ok, f"{st}, Content-Length {h.get('content-length')}, "
                           f"Accept-Ranges {h.get('accept-ranges')!r}, ETag {etag!r}, "
                           f"Last-Modified {h.get('last-modified')!r}")
        expect("HEAD Accept-Ranges: bytes", h.get("accept-ranges") == "bytes",
               repr(h.get("accept-ranges")), "warn")
        expect("HEAD strong ETag", bool(etag) and not etag.startswith("W/"),
               repr(etag), "warn")
        expect("HEAD Last-Modified", bool(h.get("last-modified")),
               repr(h.get("last-modified")), "warn")
    except Exception as e:  # noqa: BLE001
        expect("HEAD", False, f"request failed: {e!r}")

    check_range("first MiB", f"0-{MIB - 1}", 0, MIB - 1)
    for i in range(3):
        a = rnd.randrange(0, size - MIB)
        check_range(f"unaligned MiB #{i + 1}", f"{a}-{a + MIB - 1}", a, a + MIB - 1)
    k = rnd.randrange(1, size // MIB)
    check_range("aligned MiB", f"{k * MIB}-{(k + 1) * MIB - 1}", k * MIB, (k + 1) * MIB - 1)
    check_range("single byte", "0-0", 0, 0)
    check_range("open-ended", f"{size - 100}-", size - 100, size - 1)
    check_range("suffix", "-500", size - 500, size - 1)
    check_range("end past EOF (clamped)", f"{size - 10}-{size + 1000}", size - 10, size - 1)

    # Unsatisfiable
    try:
        st, h, _ = req("GET", {"Range": f"bytes={size}-"})
        ok = st == 416 and h.get("content-range") == f"bytes */{size}"
        expect("unsatisfiable -> 416", ok,
               f"Range: bytes={size}- -> {st}, Content-Range {h.get('content-range')!r}")
    except Exception as e:  # noqa: BLE001
        expect("unsatisfiable -> 416", False, f"request failed: {e!r}")

    # If-Range
    if etag:
        try:
            st, h, _ = req("GET", {"Range": "bytes=0-99", "If-Range": etag})
            expect("If-Range matching ETag -> 206", st == 206, f"{st}")
            st, h, _ = req("GET", {"Range": "bytes=0-99", "If-Range": '"no-such-etag"'},
                           read_body=False)
            expect("If-Range stale ETag -> 200 full", st == 200
                   and h.get("content-length") == str(size),
                   f"{st}, Content-Length {h.get('content-length')}")
        except Exception as e:  # noqa: BLE001
            expect("If-Range", False, f"request failed: {e!r}")

    # Multi-range: RFC allows 206 multipart or 200 full; informational only.
    try:
        st, h, _ = req("GET", {"Range": "bytes=0-0,2-2"}, read_body=False)
        expect("multi-range (info)", st in (200, 206),
               f"{st}, Content-Type {h.get('content-type')!r}", "warn")
    except Exception as e:  # noqa: BLE001
        expect("multi-range (info)", False, f"request failed: {e!r}", "warn")
    return results


# --------------------------------------------------------------------------- #
# wrk
# --------------------------------------------------------------------------- #

LUA_TEMPLATE = r"""
-- generated by bench/run.py: random %(chunk)d-byte Range requests over %(size)d bytes
local size = %(size)d
local chunk = %(chunk)d
local aligned = %(aligned)s
local path = "%(path)s"
local nchunks = math.floor(size / chunk)
local counter = 0
local threads = {}

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  math.randomseed(os.time() * 1000 + tid * 7919 + %(seed)d)
  for i = 1, 10 do math.random() end
  n206 = 0
  nother = 0
  badlen = 0
  badcr = 0
  other_codes = ""
end

function request()
  local first
  if aligned then
    first = math.random(0, nchunks - 1) * chunk
  else
    first = math.random(0, size - chunk)
  end
  local last = first + chunk - 1
  return wrk.format("GET", path,
    {["Range"] = string.format("bytes=%%.0f-%%.0f", first, last)})
end

%(response)s

function done(summary, latency, requests)
  local t206, tother, tbadlen, tbadcr, codes = 0, 0, 0, 0, ""
  for _, t in ipairs(threads) do
    t206 = t206 + (t:get("n206") or 0)
    tother = tother + (t:get("nother") or 0)
    tbadlen = tbadlen + (t:get("badlen") or 0)
    tbadcr = tbadcr + (t:get("badcr") or 0)
    codes = codes .. (t:get("other_codes") or "")
  end
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"duration_us":%%.0f,"requests":%%.0f,"bytes":%%.0f,' ..
    '"err_connect":%%.0f,"err_read":%%.0f,"err_write":%%.0f,"err_status":%%.0f,' ..
    '"err_timeout":%%.0f,"lat_p50_us":%%.0f,"lat_p99_us":%%.0f,"lat_max_us":%%.0f,' ..
    '"n206":%%.0f,"nother":%%.0f,"badlen":%%.0f,"badcr":%%.0f,"other_codes":"%%s"}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max,
    t206, tother, tbadlen, tbadcr, string.sub(codes, 1, 200)))
end
"""

LUA_RESPONSE = r"""
function response(status, headers, body)
  if status == 206 then
    n206 = n206 + 1
  else
    nother = nother + 1
    if string.len(other_codes) < 60 then other_codes = other_codes .. status .. " " end
  end
  if string.len(body) ~= chunk then badlen = badlen + 1 end
  local cr = headers["Content-Range"] or headers["content-range"]
  local a, b, total = nil, nil, nil
  if cr then a, b, total = string.match(cr, "^bytes (%d+)-(%d+)/(%d+)$") end
  if not a or (tonumber(b) - tonumber(a) + 1) ~= chunk or tonumber(total) ~= size then
    badcr = badcr + 1
  end
end
"""


def write_lua(path: Path, *, size: int, chunk: int, aligned: bool, url_path: str,
              check: bool) -> Path:
    path.write_text(LUA_TEMPLATE % {
        "size": size, "chunk": chunk, "aligned": "true" if aligned else "false",
        "path": url_path, "seed": random.randrange(1, 1 << 20),
        "response": LUA_RESPONSE if check else "-- no response() in throughput runs",
    })
    return path


def run_wrk(port: int, script: Path, *, threads: int, conns: int, duration: float,
            url_path: str, server_pid: int | None = None, classify=None) -> dict:
    cmd = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{duration:g}s",
           "--timeout", "10s", "-s", str(script), f"http://{HOST}:{port}{url_path}"]
    with Meter(server_pid, classify) as meter:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    m = re.search(r"^WRKJSON (\{.*\})$", p.stdout, re.M)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"wrk failed (exit {p.returncode}): {p.stdout[-800:]} "
                           f"{p.stderr[-800:]}")
    res = json.loads(m.group(1))
    secs = res["duration_us"] / 1e6
    res["seconds"] = secs
    res["mb_per_s"] = res["bytes"] / secs / MB
    res["req_per_s"] = res["requests"] / secs
    res["avg_bytes_per_response"] = res["bytes"] / res["requests"] if res["requests"] else None
    res["wrk_client_cpu_s"] = meter.client_cpu
    res["server_cpu_s"] = meter.server_cpu
    res["other_cpu_s"] = meter.other_cpu
    res["other_cores"] = meter.other_cores
    return res


# --------------------------------------------------------------------------- #
# single-stream curl download
# --------------------------------------------------------------------------- #

def curl_download(url: str, timeout: float):
    cmd = ["curl", "-sS", "-o", "/dev/null", "--max-time", str(int(timeout)),
           "-w", "%{http_code} %{size_download}", url]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30)
    dt = time.perf_counter() - t0
    parts = p.stdout.split()
    status = int(parts[0]) if parts else None
    size = int(float(parts[1])) if len(parts) > 1 else None
    return dt, status, size, p.stderr.strip()[:300] or None


# --------------------------------------------------------------------------- #
# nginx
# --------------------------------------------------------------------------- #

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    default_type application/octet-stream;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen {host}:{port};
        location = /CasperShare/Packages/bench.pkg {{
            alias {bench_file};
        }}
    }}
}}
"""


def ensure_tools(errors: list[str]) -> None:
    missing = [t for t in ("nginx", "wrk") if shutil.which(t) is None]
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "nginx", "wrk"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, env=env,
                       timeout=600)
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if p.returncode != 0:
        errors.append(f"apt-get install nginx wrk failed: {p.stderr[-500:]}")
    if shutil.which("nginx") is None and Path("/usr/sbin/nginx").exists():
        os.environ["PATH"] += ":/usr/sbin"


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


# --------------------------------------------------------------------------- #
# main
# --------------------------------------------------------------------------- #

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/odst-bench", help="scratch dir (default %(default)s)")
    ap.add_argument("--size-mib", type=int, default=1024, help="bench file size (default 1024)")
    ap.add_argument("--big-mib", type=int, default=4096,
                    help="big upload for the memory check (default 4096)")
    ap.add_argument("--skip-big", action="store_true", help="skip the big-upload memory check")
    ap.add_argument("--skip-download", action="store_true", help="skip the download phase (nginx, wrk)")
    ap.add_argument("--small-count", type=int, default=3000,
                    help="small uploads, odst vs nginx WebDAV PUT (default 3000; 0 skips them)")
    ap.add_argument("--small-kib", type=int, default=8, help="size of each small upload (default 8 KiB)")
    ap.add_argument("--small-concurrency", type=int, default=8,
                    help="connections the small uploads share (default 8)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="upload / sha512sum / single-stream repeats; median reported")
    ap.add_argument("--duration", type=float, default=10.0, help="wrk seconds per server")
    ap.add_argument("--rounds", type=int, default=3,
                    help="wrk rounds per server, order alternating (A B, B A, ...); the median "
                         "MB/s is reported (default 3)")
    ap.add_argument("--warmup", type=float, default=2.0, help="wrk warm-up seconds (not counted)")
    ap.add_argument("--check-duration", type=float, default=3.0,
                    help="seconds of the separate wrk pass that checks every response "
                         "(status 206, Content-Range, body length); 0 to skip")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="worker processes of each server, the same for both: nginx's "
                         "worker_processes and ODST's http_workers (default: the core count, "
                         "nginx's 'auto')")
    ap.add_argument("--nginx-file", choices=("store", "input"), default="store",
                    help="the file nginx sends: ODST's stored copy of bench.pkg, the same inode "
                         "ODST sends (default), or the bench's input file")
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--wrk-threads", type=int, default=2)
    ap.add_argument("--unaligned", action="store_true",
                    help="random byte offsets instead of 1 MiB-aligned ranges")
    ap.add_argument("--start-timeout", type=float, default=90.0,
                    help="seconds to wait for GET /healthz == 200")
    ap.add_argument("--no-odst", action="store_true",
                    help="run only the yardsticks (sha512sum, nginx); for testing the bench")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before measuring, wait up to SECONDS for the machine to be idle "
                         "(< 0.25 cores busy over 3 s); then run anyway (default 0: don't wait)")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the ODST data dir (<work>/odst-data) after the run")
    ap.add_argument("--json", default=None, help="results file (default <work>/results.json)")
    a = ap.parse_args(argv)
    if a.size_mib < 2:
        ap.error("--size-mib must be at least 2")
    a.repeats = max(1, min(a.repeats, 20))
    a.rounds = max(1, min(a.rounds, 20))
    if not 1 <= a.workers <= 64:
        ap.error("--workers must be between 1 and 64")
    return a


class _Skipped(Exception):
    """A phase the command line said to skip."""


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work).resolve()
    files = work / "files"
    for d in (work, files, work / "nginx" / "tmp", work / "logs"):
        d.mkdir(parents=True, exist_ok=True)
    size = args.size_mib * MIB
    # One file per size, so switching --size-mib back and forth reuses them.
    bench_file = files / f"bench-{args.size_mib}m.pkg"
    big_file = files / f"big-{args.big_mib}m.pkg"
    chunk = MIB
    aligned = not args.unaligned
    pkg_path = "/CasperShare/Packages/bench.pkg"
    errors: list[str] = []
    R: dict = {
        "meta": {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "python": sys.executable,
            "loadavg_start": os.getloadavg(),
            "python_version": platform.python_version(),
            "nginx": tool_version([nginx_binary(), "-v"]),
            "wrk": tool_version(["wrk", "-v"]), "curl": tool_version(["curl", "--version"]),
            "sha512sum": tool_version(["sha512sum", "--version"]),
        },
        "params": {k: v for k, v in vars(args).items()},
        "targets": {"upload_ratio_max": TARGET_UPLOAD_RATIO,
                    "download_ratio_min": TARGET_DOWNLOAD_RATIO,
                    "download_cpu_ratio_max": TARGET_DOWNLOAD_CPU_RATIO,
                    "peak_rss_mib_max": TARGET_PEAK_RSS_MIB},
        "errors": errors,
    }
    R["params"]["range_requests"] = f"{chunk} bytes, " + (
        "aligned to 1 MiB" if aligned else "unaligned (random byte offset)")
    try:
        from importlib.metadata import version
        R["meta"]["odst_version"] = version("odst")
    except Exception:  # noqa: BLE001
        R["meta"]["odst_version"] = None
    try:
        R["meta"]["git"] = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent.parent), "rev-parse",
             "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        R["meta"]["git"] = None

    procs = Procs()
    sampler: RssSampler | None = None
    data_dir = work / "odst-data"

    def on_term(signum, frame):
        raise SystemExit(f"terminated by signal {signal.Signals(signum).name}")

    # Explicit handlers: a background job started by a non-interactive shell inherits
    # SIGINT ignored, and then nothing would stop the servers on Ctrl-C / kill -INT.
    old_handlers = {sig: signal.signal(sig, on_term)
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        ensure_tools(errors)
        ensure_random_file(bench_file, size)
        if not args.skip_big and not args.no_odst:
            ensure_random_file(big_file, args.big_mib * MIB)
        warm(bench_file)
        if args.wait_idle > 0:
            R["meta"]["idle_wait"] = wait_idle(args.wait_idle)
            R["meta"]["loadavg_before_wait"] = R["meta"]["loadavg_start"]
            R["meta"]["loadavg_start"] = os.getloadavg()

        # ---------------------------------------------------------- odst up
        odst = None
        odst_port = None
        token = "bench-" + secrets.token_urlsafe(24)
        if not args.no_odst:
            try:
                odst, odst_port = start_odst(procs, work, data_dir, token, args)
                sampler = RssSampler(odst.pid).start()
                R["odst"] = {"pid": odst.pid, "port": odst_port,
                             "processes": [(p, proc_comm(p)) for p in descendants(odst.pid)]}
            except Exception as e:  # noqa: BLE001
                errors.append(f"odst serve: {e}")
                odst = None

        # ---------------------------------------------------------- upload
        R["upload"] = phase_upload(args, R, errors, bench_file, size, odst, odst_port,
                                   token, sampler, work)

        # ---------------------------------------------------------- small uploads
        if args.small_count > 0:
            R["small"] = phase_small(args, errors, procs, odst, odst_port, token, work)

        # ---------------------------------------------------------- download
        nginx = None
        nginx_port = free_port()
        try:
            if args.skip_download:
                raise _Skipped()
            # Both servers send the same inode: ODST's stored copy. A file's page cache is laid
            # out by how it was written and read (large folios or single pages), and sendfile's
            # cost per GiB follows it: nginx sent the bench's input file ~25 % cheaper than ODST's
            # copy of the same bytes (measured on kernel 6.18, ext4), which is not the server.
            served = bench_file
            if odst is not None and args.nginx_file == "store":
                from odst.naming import name_key
                stored = data_dir / "store" / "packages" / name_key(pkg_path.rsplit("/", 1)[1])
                if stored.is_file() and stored.stat().st_size == size:
                    served = stored
                else:
                    errors.append(f"nginx: ODST's copy {stored} missing; nginx serves the input file")
            R["nginx_file"] = str(served)
            (work / "nginx" / "nginx.conf").write_text(NGINX_CONF.format(
                dir=work / "nginx", host=HOST, port=nginx_port, bench_file=served,
                workers=args.workers))
            nginx = procs.start("nginx", [nginx_binary(), "-e", str(work / "nginx" / "error.log"),
                                          "-p", str(work / "nginx"),
                                          "-c", str(work / "nginx" / "nginx.conf")],
                                log_path=work / "logs" / "nginx.out",
                                stop_sig=signal.SIGQUIT, grace=15)
            url = f"http://{HOST}:{nginx_port}{pkg_path}"
            if not wait_until(lambda: http_status(url, "HEAD") == 200, 15,
                              alive=lambda: nginx.poll() is None):
                raise RuntimeError(f"nginx did not serve {url}: "
                                   f"{tail(work / 'nginx' / 'error.log', 10)}")
            R["nginx"] = {"pid": nginx.pid, "port": nginx_port}
        except _Skipped:
            nginx = None
        except Exception as e:  # noqa: BLE001
            errors.append(f"nginx: {e}")
            nginx = None

        odst_serves = False
        if odst is not None and R["upload"].get("uploaded"):
            url = f"http://{HOST}:{odst_port}{pkg_path}"
            # The package must be public right after a 2xx upload; allow a short lag.
            t0 = time.monotonic()
            odst_serves = wait_until(lambda: http_status(url, "HEAD") == 200, 30,
                                     alive=lambda: odst.poll() is None)
            R["upload"]["public_after_s"] = round(time.monotonic() - t0, 3)
            if not odst_serves:
                errors.append(f"odst: {pkg_path} not served (HEAD {http_status(url, 'HEAD')}) "
                              f"30 s after a 2xx upload")
            alias = f"http://{HOST}:{odst_port}/Packages/bench.pkg"
            R["upload"]["alias_head_status"] = http_status(alias, "HEAD")
        servers = []
        if nginx is not None:
            servers.append(("nginx", nginx_port, nginx.pid, lambda pid, comm: "nginx"))
        if odst_serves:
            servers.append(("odst", odst_port, odst.pid, odst_classify))
        if args.skip_download:
            servers = []
        R["download"] = phase_download(args, R, errors, servers, bench_file, size, chunk,
                                       aligned, pkg_path, work, sampler)

        # ---------------------------------------------------------- memory
        if odst is not None and not args.skip_big:
            R["memory"] = phase_big(args, errors, big_file, odst, odst_port, token,
                                    sampler, work)
        elif sampler is not None:
            R["memory"] = {"skipped": True}
    except BaseException as e:  # noqa: BLE001 - report, then clean up
        errors.append(f"bench aborted: {e!r}")
        if not isinstance(e, Exception):
            log(f"aborted: {e!r}")
    finally:
        # Cleanup is bounded (timeouts below); don't let a second Ctrl-C cut it short.
        for sig in old_handlers:
            signal.signal(sig, signal.SIG_IGN)
        if sampler is not None:
            sampler.stop()
            R.setdefault("memory", {})["peak_rss_kib_by_phase"] = dict(sampler.peak_main)
            R["memory"]["peak_rss_python_sum_kib_by_phase"] = dict(sampler.peak_python_sum)
        for name, p, _sig, _grace in procs.items:
            if p.poll() is not None:
                errors.append(f"{name} (pid {p.pid}) exited by itself with code {p.returncode} "
                              f"before the bench stopped it (see {work / 'logs'})")
        problems = procs.stop_all()
        if problems:
            errors.extend(problems)
            R["shutdown_problems"] = problems
        if (work / "logs" / "odst.log").exists() and not args.no_odst:
            R["odst_log_tail"] = tail(work / "logs" / "odst.log", 15)
        if not args.keep_data and data_dir.exists() and data_dir.parent == work:
            shutil.rmtree(data_dir, ignore_errors=True)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    R["meta"]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    R["meta"]["loadavg_end"] = os.getloadavg()
    out = Path(args.json) if args.json else work / "results.json"
    out.write_text(json.dumps(R, indent=2, default=str))
    print_report(R, out)
    return 0 if not errors else 2


def wait_idle(limit_s: float, window_s: float = 3.0, threshold_cores: float = 0.25) -> dict:
    """Wait (bounded) until the machine's busy CPU over a window is below threshold."""
    t0 = time.monotonic()
    busy = None
    while time.monotonic() - t0 < limit_s:
        b0 = sys_busy_s()
        time.sleep(window_s)
        busy = (sys_busy_s() - b0) / window_s
        if busy < threshold_cores:
            break
        log(f"machine busy ({busy:.2f} cores); waiting for idle "
            f"({time.monotonic() - t0:.0f}/{limit_s:.0f} s)")
    waited = time.monotonic() - t0
    idle = busy is not None and busy < threshold_cores
    log(f"idle wait: {waited:.0f} s, last window {busy if busy is not None else 0:.2f} cores busy"
        f"{'' if idle else ' - running anyway'}")
    return {"waited_s": round(waited, 1), "last_busy_cores": busy, "idle": idle}


def start_odst(procs: Procs, work: Path, data_dir: Path, token: str, args):
    help_p = subprocess.run([sys.executable, "-m", "odst", "serve", "--help"],
                            capture_output=True, text=True, timeout=60)
    if help_p.returncode != 0:
        raise RuntimeError(f"`{sys.executable} -m odst serve --help` failed "
                           f"(exit {help_p.returncode}): {help_p.stderr.strip()[-400:]}")
    if data_dir.exists():
        shutil.rmtree(data_dir)
    data_dir.mkdir(parents=True)
    log_path = work / "logs" / "odst.log"
    log_path.write_text("")
    # the caller's ODST_* settings reach the site, as they always did
    site = SiteProcess(data=data_dir, port=free_port(), token=token, log_path=log_path, die_with_parent=True,
                       env={**{k: v for k, v in os.environ.items()
                               if k.startswith("ODST_") and k != "ODST_ADMIN_TOKEN"},
                            "ODST_HTTP_WORKERS": str(args.workers)})
    port = site.port
    p = procs.adopt("odst serve", site.start_process().proc, stop_sig=signal.SIGTERM, grace=30)
    t0 = time.monotonic()
    try:
        site.wait_healthy(args.start_timeout)
    except SiteFailed:
        url = f"http://{HOST}:{port}/healthz"
        state = f"exited {p.returncode}" if p.poll() is not None else \
            f"still running, /healthz -> {http_status(url)}"
        raise RuntimeError(f"not ready within {args.start_timeout:.0f}s ({state}); log tail:\n"
                           f"{tail(log_path)}") from None
    log(f"odst ready on {HOST}:{port} after {time.monotonic() - t0:.1f}s")
    return p, port


def phase_upload(args, R, errors, bench_file, size, odst, port, token, sampler, work):
    res: dict = {"sha512sum_s": [], "odst_s": [], "statuses": [], "curl": []}
    timeout = max(120.0, size / (5 * MB))  # floor of 5 MB/s
    names = ["bench.pkg"] + [f"bench-{i}.pkg" for i in range(2, args.repeats + 1)]
    res["names"] = names if odst is not None else []
    sha_hex = None
    for i in range(args.repeats):
        try:
            os.sync()
            m, sha_hex = time_sha512sum(bench_file, timeout)
            res["sha512sum_s"].append(m.wall)
            res.setdefault("sha512sum_cpu_s", []).append(m.client_cpu)
            res.setdefault("sha512sum_other_cores", []).append(m.other_cores)
            log(f"sha512sum #{i + 1}: {m.wall:.2f}s (other load {m.other_cores:.2f} cores)")
        except Exception as e:  # noqa: BLE001
            errors.append(f"sha512sum: {e}")
        if odst is None:
            continue
        os.sync()
        if sampler:
            sampler.set_phase("upload")
        url = f"http://{HOST}:{port}/api/v1/packages/{names[i]}"
        try:
            m, status, info = curl_upload(bench_file, url, token, work / "logs" / "upload.body",
                                          timeout, odst.pid)
            dt = m.wall
        except Exception as e:  # noqa: BLE001
            errors.append(f"upload {names[i]}: {e}")
            continue
        finally:
            if sampler:
                sampler.set_phase("other")
        res["statuses"].append(status)
        res["curl"].append(info)
        res.setdefault("gateway_cpu_s", []).append(m.server_cpu.get("gateway", 0))
        res.setdefault("server_kernel_s", []).append(round(m.server_kernel_s, 3))  # nats' too (~0)
        res.setdefault("load1", []).append(os.getloadavg()[0])
        res.setdefault("nats_cpu_s", []).append(m.server_cpu.get("nats", 0))
        res.setdefault("curl_cpu_s", []).append(m.client_cpu)
        res.setdefault("odst_other_cores", []).append(m.other_cores)
        log(f"upload {names[i]} #{i + 1}: {dt:.2f}s, HTTP {status} (other load "
            f"{m.other_cores:.2f} cores)")
        if status in (200, 201):
            res["odst_s"].append(dt)
        else:
            errors.append(f"upload {names[i]}: HTTP {status}, curl exit {info['curl_exit']}, "
                          f"{info.get('stderr')}, body {str(info.get('body'))[:300]!r}")
        if i == 0 and status in (200, 201):
            res["uploaded"] = True
            res["first_response"] = info.get("body")
    res["sha512"] = sha_hex
    # Informational yardstick: what writing the same bytes to the same file system with
    # an fsync at the end costs (the store does temp file -> fsync -> rename).
    if shutil.which("openssl"):
        try:
            with Meter() as m:
                p = subprocess.run(["openssl", "dgst", "-sha512", str(bench_file)],
                                   capture_output=True, text=True, timeout=timeout)
            if p.returncode == 0:
                res["openssl_sha512_s"] = m.wall
                log(f"openssl dgst -sha512: {m.wall:.2f}s")
        except Exception as e:  # noqa: BLE001
            errors.append(f"openssl: {e}")
    try:
        os.sync()
        m = time_write_fsync(bench_file, work / "dd-fsync.tmp", timeout)
        res["dd_fsync_s"] = m.wall
        log(f"dd conv=fsync: {m.wall:.2f}s")
    except Exception as e:  # noqa: BLE001
        errors.append(f"dd: {e}")
    res["sha512sum_median_s"] = median(res["sha512sum_s"])
    res["odst_median_s"] = median(res["odst_s"])
    res["ratio"] = ratio(res["odst_median_s"], res["sha512sum_median_s"])
    if res["odst_median_s"]:
        res["odst_mb_per_s"] = size / res["odst_median_s"] / MB
    if res["sha512sum_median_s"]:
        res["sha512sum_mb_per_s"] = size / res["sha512sum_median_s"] / MB
    if res.get("gateway_cpu_s"):
        res["gateway_cpu_s_per_gib"] = median(res["gateway_cpu_s"]) / (size / GIB)
        res["server_kernel_s_per_gib"] = median(res["server_kernel_s"]) / (size / GIB)
    if res.get("sha512sum_cpu_s"):
        res["sha512sum_cpu_s_per_gib"] = median(res["sha512sum_cpu_s"]) / (size / GIB)
    res["other_cores_median"] = median(res.get("sha512sum_other_cores", [])
                                       + res.get("odst_other_cores", []))
    # Metadata check: the package JSON should carry the same SHA-512 as sha512sum.
    if odst is not None and res.get("uploaded"):
        meta = get_package(port, token, "bench.pkg")
        res["package_json"] = meta
        if isinstance(meta, dict):
            got = {k: meta.get(k) for k in ("size", "sha512", "sha1", "chunk_size")}
            res["metadata_check"] = {
                "size_ok": got["size"] == size,
                "sha512_ok": (got["sha512"] or "").lower() == (sha_hex or "").lower(),
                "sha1_ok": (got["sha1"] or "").lower() == sha1_of(bench_file),
                "chunks_count_ok": isinstance(meta.get("chunks"), list)
                and len(meta["chunks"]) == (size + MIB - 1) // MIB,
            }
            bad = [k for k, v in res["metadata_check"].items() if not v]
            if bad:
                errors.append(f"odst package JSON for bench.pkg: {', '.join(bad)} failed "
                              f"(size={got['size']}, sha512={str(got['sha512'])[:16]}..., "
                              f"sha1={got['sha1']}, chunk_size={got['chunk_size']})")
        else:
            errors.append(f"GET /api/v1/packages/bench.pkg: {meta}")
    return res


# --------------------------------------------------------------------------- #
# small uploads: many 8 KiB PUTs at a fixed concurrency, odst vs nginx WebDAV PUT
# --------------------------------------------------------------------------- #

NGINX_DAV_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    keepalive_timeout 65;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/tmp;
    client_max_body_size 1m;
    server {{
        listen {host}:{port};
        location /dav/ {{
            root {dir}/root;
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw;
        }}
    }}
}}
"""


async def _put_many(port: int, paths: list[str], bodies: list[bytes], headers: str,
                    concurrency: int) -> tuple[dict[int, int], list[float], list[str]]:
    """PUT bodies[i] to paths[i] over ``concurrency`` keep-alive HTTP/1.1 connections (a
    minimal client: the bench must not spend more CPU than the servers it measures).
    Returns ({status: count}, latencies in s, the first answers that were not 2xx)."""
    import asyncio
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    failures: list[str] = []
    queue = list(range(len(paths)))[::-1]

    async def one_connection():
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            while queue:
                i = queue.pop()
                body = bodies[i]
                t0 = time.perf_counter()
                writer.write(f"PUT {paths[i]} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{headers}"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                answer = await reader.readexactly(int(length.group(1))) if length else b""
                if status >= 300 and len(failures) < 5:
                    failures.append(f"{paths[i]}: {status} {answer[:300].decode(errors='replace')}")
                latencies.append(time.perf_counter() - t0)
                statuses[status] = statuses.get(status, 0) + 1
                if re.search(rb"(?i)\r\nconnection: *close", head):
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(concurrency)))
    return statuses, latencies, failures


def time_small_uploads(port: int, paths: list[str], bodies: list[bytes], headers: str,
                       concurrency: int, server_pid: int, classify, timeout: float) -> dict:
    import asyncio
    c0 = time.process_time()
    with Meter(server_pid, classify) as m:
        statuses, lat, failures = asyncio.run(asyncio.wait_for(
            _put_many(port, paths, bodies, headers, concurrency), timeout))
    n = len(paths)
    lat.sort()
    server_cpu = sum(m.server_cpu.values())
    return {"count": n, "seconds": m.wall, "per_s": n / m.wall, "statuses": statuses, "failures": failures,
            "lat_p50_ms": lat[len(lat) // 2] * 1000 if lat else None,
            "lat_p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else None,
            "server_cpu_s": m.server_cpu, "server_cpu_ms_per_upload": server_cpu / n * 1000,
            "server_kernel_ms_per_upload": m.server_kernel_s / n * 1000,
            "server_switches_per_upload": m.server_switches / n,
            "client_cpu_s": time.process_time() - c0, "other_cores": m.other_cores}


def phase_small(args, errors, procs: Procs, odst, port, token, work) -> dict:
    """``--small-count`` uploads of ``--small-kib`` KiB each (distinct names and contents) at
    ``--small-concurrency``, to ODST and to nginx WebDAV PUT on the same machine, same run."""
    res: dict = {"count": args.small_count, "kib": args.small_kib,
                 "concurrency": args.small_concurrency}
    n, size = args.small_count, args.small_kib * 1024
    seed = os.urandom(size)
    bodies = [i.to_bytes(8, "big") + seed[8:] for i in range(n)]
    timeout = max(120.0, n / 10)
    dav = work / "nginx-dav"
    shutil.rmtree(dav, ignore_errors=True)
    for d in (dav / "tmp", dav / "root" / "dav"):
        d.mkdir(parents=True, exist_ok=True)
    nginx_port = free_port()
    try:
        (dav / "nginx.conf").write_text(NGINX_DAV_CONF.format(dir=dav, host=HOST, port=nginx_port,
                                                                workers=args.workers))
        nginx = procs.start("nginx dav", [nginx_binary(), "-e", str(dav / "error.log"), "-p", str(dav),
                                          "-c", str(dav / "nginx.conf")],
                            log_path=work / "logs" / "nginx-dav.out", stop_sig=signal.SIGQUIT, grace=15)
        if not wait_until(lambda: http_status(f"http://{HOST}:{nginx_port}/dav/", "OPTIONS") is not None, 15,
                          alive=lambda: nginx.poll() is None):
            raise RuntimeError(f"nginx (WebDAV) did not start: {tail(dav / 'error.log', 10)}")
        os.sync()
        r = time_small_uploads(nginx_port, [f"/dav/small-{i:05d}.pkg" for i in range(n)], bodies, "",
                               args.small_concurrency, nginx.pid, lambda pid, comm: "nginx", timeout)
        res["nginx"] = r
        log(f"nginx WebDAV PUT: {n} x {args.small_kib} KiB in {r['seconds']:.2f}s = {r['per_s']:.0f}/s, "
            f"{r['server_cpu_ms_per_upload']:.2f} CPU-ms each (other load {r['other_cores']:.2f} cores)")
        if r["statuses"].get(201, 0) + r["statuses"].get(204, 0) != n:
            errors.append(f"nginx WebDAV PUT: statuses {r['statuses']}; first answers: {r['failures']}")
        procs.stop(nginx)
    except Exception as e:  # noqa: BLE001
        errors.append(f"nginx WebDAV: {e!r}")
    if odst is not None:
        try:
            os.sync()
            grouped = event_appends(port, token)
            r = time_small_uploads(port, [f"/api/v1/packages/small-{i:05d}.pkg" for i in range(n)], bodies,
                                   f"Authorization: Bearer {token}\r\n", args.small_concurrency,
                                   odst.pid, odst_classify, timeout)
            after = event_appends(port, token)
            # events appended per round trip (group commit): /metrics is per process, so only
            # with one gateway process (with more, a random one answers: no figure)
            if after and args.workers == 1:
                r["append_rounds"] = after["rounds"] - grouped.get("rounds", 0)
                r["events_per_round"] = (after["events"] - grouped.get("events", 0)) / max(1, r["append_rounds"])
            res["odst"] = r
            log(f"odst PUT: {n} x {args.small_kib} KiB in {r['seconds']:.2f}s = {r['per_s']:.0f}/s, "
                f"{r['server_cpu_ms_per_upload']:.2f} CPU-ms each {r['server_cpu_s']} "
                f"({r['server_kernel_ms_per_upload']:.2f} in the kernel; "
                f"{r['server_switches_per_upload']:.1f} context switches each) "
                f"(other load {r['other_cores']:.2f} cores; "
                f"{format(r['events_per_round'], '.1f') if 'events_per_round' in r else 'n/a'} "
                "events per append round trip)")
            if r["statuses"].get(201, 0) != n:
                errors.append(f"odst small uploads: statuses {r['statuses']}; first answers: {r['failures']}")
            got = get_package(port, token, f"small-{n - 1:05d}.pkg")
            want = hashlib.sha512(bodies[-1]).hexdigest()
            if not isinstance(got, dict) or got.get("sha512") != want:
                errors.append(f"odst small upload small-{n - 1:05d}.pkg: package JSON {str(got)[:200]}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"odst small uploads: {e!r}")
    if "odst" in res and "nginx" in res:
        res["ratio"] = ratio(res["odst"]["per_s"], res["nginx"]["per_s"])
        res["cpu_ratio"] = ratio(res["odst"]["server_cpu_ms_per_upload"], res["nginx"]["server_cpu_ms_per_upload"])
    return res


_sha1_cache: dict[str, str] = {}


def sha1_of(path: Path) -> str:
    key = f"{path}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
    if key not in _sha1_cache:
        h = hashlib.sha1()
        with open(path, "rb") as f:
            while b := f.read(8 * MIB):
                h.update(b)
        _sha1_cache[key] = h.hexdigest()
    return _sha1_cache[key]


def event_appends(port, token) -> dict[str, float]:
    """The gateway's group commit so far (/metrics odst_event_appends): rounds, events."""
    req = urllib.request.Request(f"http://{HOST}:{port}/metrics", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
    except Exception:  # noqa: BLE001 (an older odst: no figure)
        return {}
    return {m[0]: float(m[1]) for m in re.findall(r'^odst_event_appends_total\{kind="(\w+)"\} (\S+)$', text, re.M)}


def get_package(port, token, name):
    req = urllib.request.Request(f"http://{HOST}:{port}/api/v1/packages/{name}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:300]!r}"
    except Exception as e:  # noqa: BLE001
        return f"{e!r}"


def phase_download(args, R, errors, servers, bench_file, size, chunk, aligned, pkg_path,
                   work, sampler):
    res: dict = {"range_checks": {}, "single_stream": {}, "wrk": {}, "wrk_check": {}}
    if not servers:
        return res
    os.sync()
    warm(bench_file)
    # 1. correctness of Range handling (tiny, bounded)
    for name, port, pid, _ in servers:
        try:
            checks = range_checks(port, pkg_path, bench_file, size)
        except Exception as e:  # noqa: BLE001
            errors.append(f"range checks {name}: {e!r}")
            continue
        res["range_checks"][name] = checks
        fails = [c for c in checks if c["severity"] == "fail"]
        if fails and name == "odst":
            errors.append("odst Range checks failed: " + "; ".join(
                f"{c['check']}: {c['detail']}" for c in fails))
    # 2. single-stream whole-file curl (the first run also warms the server's cache)
    timeout = max(120.0, size / (5 * MB))
    for name, port, pid, _ in servers:
        url = f"http://{HOST}:{port}{pkg_path}"
        runs = []
        for i in range(args.repeats):
            try:
                dt, status, got, err = curl_download(url, timeout)
            except Exception as e:  # noqa: BLE001
                errors.append(f"curl download {name}: {e!r}")
                break
            runs.append({"s": dt, "status": status, "bytes": got, "stderr": err})
            if status != 200 or got != size:
                errors.append(f"curl download {name}: HTTP {status}, {got} bytes of {size}, {err}")
            log(f"curl {name} #{i + 1}: {dt:.2f}s HTTP {status}")
        ok = [r["s"] for r in runs if r["status"] == 200 and r["bytes"] == size]
        med = median(ok)
        res["single_stream"][name] = {"runs": runs, "median_s": med,
                                      "mb_per_s": size / med / MB if med else None}
    # 3. wrk: throughput pass (no response() callback: it would copy every body into Lua)
    lua = write_lua(work / "range.lua", size=size, chunk=chunk, aligned=aligned,
                    url_path=pkg_path, check=False)
    lua_check = write_lua(work / "range-check.lua", size=size, chunk=chunk, aligned=aligned,
                          url_path=pkg_path, check=True)
    # Rounds alternate the order (A B, B A, ...) so a drift in background load hits both.
    runs: dict[str, list[dict]] = {name: [] for name, *_ in servers}
    for rnd in range(args.rounds):
        order = servers if rnd % 2 == 0 else list(reversed(servers))
        for name, port, pid, classify in order:
            try:
                if args.warmup > 0 and rnd == 0:
                    run_wrk(port, lua, threads=args.wrk_threads, conns=args.connections,
                            duration=args.warmup, url_path=pkg_path)
                if sampler and name == "odst":
                    sampler.set_phase("download")
                w = run_wrk(port, lua, threads=args.wrk_threads, conns=args.connections,
                            duration=args.duration, url_path=pkg_path, server_pid=pid,
                            classify=classify)
                if sampler:
                    sampler.set_phase("other")
                main_group = "gateway" if name == "odst" else "nginx"
                w["server_cpu_main_s"] = w["server_cpu_s"].get(main_group, 0)
                w["loadavg_1m"] = os.getloadavg()[0]
                runs[name].append(w)
                served_gib = w["bytes"] / GIB
                log(f"wrk {name} round {rnd + 1}: {w['mb_per_s']:.0f} MB/s, "
                    f"{w['req_per_s']:.0f} req/s, server "
                    f"{w['server_cpu_main_s'] / served_gib if served_gib else 0:.2f} CPU-s/GiB, "
                    f"other load {w['other_cores']:.2f} cores, load average {w['loadavg_1m']:.2f}")
                errs = {k: w[k] for k in ("err_connect", "err_read", "err_write", "err_status",
                                          "err_timeout") if w[k]}
                if errs:
                    errors.append(f"wrk {name}: errors {errs}")
                apr = w["avg_bytes_per_response"] or 0
                if not (chunk <= apr < chunk + 4096):
                    errors.append(f"wrk {name}: {apr:.0f} bytes per response on average, "
                                  f"expected ~{chunk} (1 MiB body + headers): Range not honoured?")
            except Exception as e:  # noqa: BLE001
                errors.append(f"wrk {name}: {e}")
            finally:
                if sampler:
                    sampler.set_phase("other")
    for name, rs in runs.items():
        if not rs:
            continue
        gib = sum(r["bytes"] for r in rs) / GIB
        secs = sum(r["seconds"] for r in rs)
        res["wrk"][name] = {
            "rounds": rs,
            "mb_per_s": median([r["mb_per_s"] for r in rs]),
            "mb_per_s_each": [round(r["mb_per_s"]) for r in rs],
            "req_per_s": median([r["req_per_s"] for r in rs]),
            "lat_p50_us": median([r["lat_p50_us"] for r in rs]),
            "lat_p99_us": median([r["lat_p99_us"] for r in rs]),
            "server_cpu_s_per_gib": sum(r["server_cpu_main_s"] for r in rs) / gib if gib else None,
            "nats_cpu_s": sum(r["server_cpu_s"].get("nats", 0) for r in rs),
            "wrk_client_cpu_s_per_gib": sum(r["wrk_client_cpu_s"] for r in rs) / gib if gib else None,
            "other_cores": sum(r["other_cpu_s"] for r in rs) / secs if secs else None,
            "loadavg_1m": [r["loadavg_1m"] for r in rs],
        }
    # separate short pass per server that inspects every response
    if args.check_duration > 0:
        for name, port, pid, classify in servers:
            try:
                c = run_wrk(port, lua_check, threads=args.wrk_threads, conns=args.connections,
                            duration=args.check_duration, url_path=pkg_path)
                res["wrk_check"][name] = c
                if c["nother"] or c["badlen"] or c["badcr"] or not c["n206"]:
                    errors.append(f"wrk check {name}: {c['n206']} x 206, {c['nother']} other "
                                  f"({c['other_codes'].strip()}), {c['badlen']} bad body "
                                  f"length, {c['badcr']} bad Content-Range")
            except Exception as e:  # noqa: BLE001
                errors.append(f"wrk check {name}: {e}")
    if "odst" in res["wrk"] and "nginx" in res["wrk"]:
        res["ratio"] = ratio(res["wrk"]["odst"]["mb_per_s"], res["wrk"]["nginx"]["mb_per_s"])
        res["cpu_ratio"] = ratio(res["wrk"]["odst"]["server_cpu_s_per_gib"],
                                 res["wrk"]["nginx"]["server_cpu_s_per_gib"])
    ss = res["single_stream"]
    if "odst" in ss and "nginx" in ss:
        res["single_stream_ratio"] = ratio(ss["odst"].get("mb_per_s"), ss["nginx"].get("mb_per_s"))
    return res


def phase_big(args, errors, big_file, odst, port, token, sampler, work):
    res: dict = {"big_mib": args.big_mib}
    size = args.big_mib * MIB
    timeout = max(300.0, size / (5 * MB))
    os.sync()
    warm(big_file)
    res["rss_before_kib"] = status_kib(odst.pid, "VmRSS")
    res["hwm_before_kib"] = status_kib(odst.pid, "VmHWM")
    res["hwm_reset"] = reset_hwm(odst.pid)
    sampler.set_phase("big_upload")
    try:
        m, status, info = curl_upload(big_file, f"http://{HOST}:{port}/api/v1/packages/big.pkg",
                                      token, work / "logs" / "upload-big.body", timeout,
                                      odst.pid)
        dt = m.wall
    finally:
        sampler.set_phase("other")
    # one more sample after the fact so the sampler's max covers the very end
    time.sleep(0.25)
    res["hwm_after_kib"] = status_kib(odst.pid, "VmHWM")
    res["rss_after_kib"] = status_kib(odst.pid, "VmRSS")
    res["peak_sampled_kib"] = sampler.peak_main.get("big_upload")
    res["peak_sampled_python_sum_kib"] = sampler.peak_python_sum.get("big_upload")
    res["status"] = status
    res["curl"] = info
    res["seconds"] = dt
    res["mb_per_s"] = size / dt / MB
    res["gateway_cpu_s_per_gib"] = m.server_cpu.get("gateway", 0) / (size / GIB)
    res["other_cores"] = m.other_cores
    # Peak: VmHWM after a reset is exact; otherwise the 100 ms samples.
    candidates = [res["peak_sampled_kib"] or 0]
    if res["hwm_reset"] and res["hwm_after_kib"]:
        candidates.append(res["hwm_after_kib"])
    res["peak_rss_mib"] = max(candidates) / 1024
    if status not in (200, 201):
        errors.append(f"big upload: HTTP {status}, curl exit {info['curl_exit']}, "
                      f"{info.get('stderr')}, body {str(info.get('body'))[:300]!r}")
    log(f"big upload {args.big_mib} MiB: {dt:.2f}s HTTP {status}, peak RSS "
        f"{res['peak_rss_mib']:.0f} MiB")
    return res


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #

def fmt(v, spec=".2f", unit=""):
    if v is None:
        return "-"
    return f"{v:{spec}}{unit}"


def verdict(ok):
    return "-" if ok is None else ("meets" if ok else "MISSES")


def print_report(R: dict, out: Path) -> None:
    p = R["params"]
    up = R.get("upload", {})
    dl = R.get("download", {})
    mem = R.get("memory", {})
    w = dl.get("wrk", {})
    ss = dl.get("single_stream", {})
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(metric, odst, ref, r, target, ok):
        rows.append((metric, odst, ref, r, target, ok))

    size_lbl = f"{p['size_mib']} MiB"
    row(f"upload {size_lbl}: odst PUT vs sha512sum (median s)",
        fmt(up.get("odst_median_s"), ".2f", " s"), fmt(up.get("sha512sum_median_s"), ".2f", " s"),
        fmt(up.get("ratio"), ".2f", "x"), f"<= {TARGET_UPLOAD_RATIO}",
        verdict(None if up.get("ratio") is None else up["ratio"] <= TARGET_UPLOAD_RATIO))
    row("upload throughput (MB/s)", fmt(up.get("odst_mb_per_s"), ".0f"),
        fmt(up.get("sha512sum_mb_per_s"), ".0f"), "", "", "")
    row("  (info) openssl dgst -sha512 (OpenSSL's SHA-512)", "",
        fmt(up.get("openssl_sha512_s"), ".2f", " s"),
        fmt(ratio(up.get("odst_median_s"), up.get("openssl_sha512_s")), ".2f", "x"), "", "")
    row("  (info) dd bs=1M conv=fsync of the same file", "",
        fmt(up.get("dd_fsync_s"), ".2f", " s"), "", "", "")
    row("upload CPU-s per GiB (gateway vs sha512sum)", fmt(up.get("gateway_cpu_s_per_gib")),
        fmt(up.get("sha512sum_cpu_s_per_gib")),
        fmt(ratio(up.get("gateway_cpu_s_per_gib"), up.get("sha512sum_cpu_s_per_gib")), ".2f", "x"),
        f"<= {TARGET_UPLOAD_CPU_S_PER_GIB}", verdict(None if up.get("gateway_cpu_s_per_gib") is None
                                                     else up["gateway_cpu_s_per_gib"] <= TARGET_UPLOAD_CPU_S_PER_GIB))
    if up.get("server_kernel_s_per_gib") is not None:
        row("  (info) of which in the kernel (median); 1-min load at each upload",
            fmt(up["server_kernel_s_per_gib"]), " ".join(f"{x:.1f}" for x in up.get("load1", [])), "", "", "")
    sm = R.get("small", {})
    so_, sn_ = sm.get("odst", {}), sm.get("nginx", {})
    if sm:
        row(f"small uploads {sm['count']} x {sm['kib']} KiB, {sm['concurrency']} conns (/s) vs nginx WebDAV PUT",
            fmt(so_.get("per_s"), ".0f"), fmt(sn_.get("per_s"), ".0f"), fmt(sm.get("ratio"), ".3f", "x"),
            f">= {TARGET_SMALL_PER_S}/s", verdict(None if so_.get("per_s") is None
                                                  else so_["per_s"] >= TARGET_SMALL_PER_S))
        row("  server CPU-ms per small upload (all its processes)", fmt(so_.get("server_cpu_ms_per_upload")),
            fmt(sn_.get("server_cpu_ms_per_upload")), fmt(sm.get("cpu_ratio"), ".1f", "x"), "", "")
        row("  of which in the kernel (ms) / context switches per upload",
            f"{fmt(so_.get('server_kernel_ms_per_upload'))} / {fmt(so_.get('server_switches_per_upload'), '.1f')}",
            f"{fmt(sn_.get('server_kernel_ms_per_upload'))} / {fmt(sn_.get('server_switches_per_upload'), '.1f')}",
            "", "", "")
        row("  latency p50 / p99 (ms)",
            f"{fmt(so_.get('lat_p50_ms'), '.1f')} / {fmt(so_.get('lat_p99_ms'), '.1f')}",
            f"{fmt(sn_.get('lat_p50_ms'), '.1f')} / {fmt(sn_.get('lat_p99_ms'), '.1f')}", "", "", "")
        row("  noise: other CPU busy (cores)", fmt(so_.get("other_cores")), fmt(sn_.get("other_cores")),
            "", "~0", "")
        row("  events per append round trip (group commit)", fmt(so_.get("events_per_round"), ".1f"), "",
            "", "", "")
    wo, wn = w.get("odst", {}), w.get("nginx", {})
    row(f"wrk {p['connections']} conn, 1 MiB ranges (MB/s, median of {p['rounds']})",
        fmt(wo.get("mb_per_s"), ".0f"), fmt(wn.get("mb_per_s"), ".0f"), fmt(dl.get("ratio"), ".2f", "x"),
        f">= {TARGET_DOWNLOAD_RATIO}",
        verdict(None if dl.get("ratio") is None else dl["ratio"] >= TARGET_DOWNLOAD_RATIO))
    row("  each round (MB/s)", " ".join(map(str, wo.get("mb_per_s_each", []))) or "-",
        " ".join(map(str, wn.get("mb_per_s_each", []))) or "-", "", "", "")
    row("wrk requests/s", fmt(wo.get("req_per_s"), ".0f"), fmt(wn.get("req_per_s"), ".0f"),
        "", "", "")
    row("wrk latency p50 / p99 (ms)",
        f"{fmt(_ms(wo.get('lat_p50_us')), '.1f')} / {fmt(_ms(wo.get('lat_p99_us')), '.1f')}",
        f"{fmt(_ms(wn.get('lat_p50_us')), '.1f')} / {fmt(_ms(wn.get('lat_p99_us')), '.1f')}",
        "", "", "")
    row("server CPU-s per GiB served (wrk)", fmt(wo.get("server_cpu_s_per_gib")),
        fmt(wn.get("server_cpu_s_per_gib")), fmt(dl.get("cpu_ratio"), ".2f", "x"),
        f"<= {TARGET_DOWNLOAD_CPU_RATIO}",
        verdict(None if dl.get("cpu_ratio") is None else dl["cpu_ratio"] <= TARGET_DOWNLOAD_CPU_RATIO))
    row("  load average (1 min) at each round's end",
        " ".join(f"{x:.1f}" for x in wo.get("loadavg_1m", [])) or "-",
        " ".join(f"{x:.1f}" for x in wn.get("loadavg_1m", [])) or "-", "", "", "")
    row("wrk client CPU-s per GiB", fmt(wo.get("wrk_client_cpu_s_per_gib")),
        fmt(wn.get("wrk_client_cpu_s_per_gib")), "", "", "")
    row("noise: other CPU busy during upload / wrk (cores)",
        f"{fmt(up.get('other_cores_median'))} / {fmt(wo.get('other_cores'))}",
        f"- / {fmt(wn.get('other_cores'))}", "", "~0", "")
    wc = dl.get("wrk_check", {})
    row("wrk check pass: 206 / other / bad len / bad C-R", _chk(wc.get("odst")), _chk(wc.get("nginx")),
        "", "all 206", verdict(_chk_ok(wc.get("odst"))))
    so, sn = ss.get("odst", {}), ss.get("nginx", {})
    row("single-stream curl whole file (median s)", fmt(so.get("median_s"), ".2f", " s"),
        fmt(sn.get("median_s"), ".2f", " s"), "", "", "")
    row("single-stream curl (MB/s)", fmt(so.get("mb_per_s"), ".0f"), fmt(sn.get("mb_per_s"), ".0f"),
        fmt(dl.get("single_stream_ratio"), ".2f", "x"), "", "")
    rc = dl.get("range_checks", {})
    row("Range/HEAD/If-Range checks passed", _rc(rc.get("odst")), _rc(rc.get("nginx")), "",
        "all", verdict(None if rc.get("odst") is None else
                       all(c["severity"] != "fail" for c in rc["odst"])))
    if mem.get("peak_rss_mib") is not None:
        row(f"peak RSS during {mem['big_mib']} MiB upload", fmt(mem["peak_rss_mib"], ".0f", " MiB"),
            "", "", f"< {TARGET_PEAK_RSS_MIB} MiB", verdict(mem["peak_rss_mib"] < TARGET_PEAK_RSS_MIB))
        row(f"{mem['big_mib']} MiB upload (s, MB/s)",
            f"{fmt(mem.get('seconds'), '.1f')} s, {fmt(mem.get('mb_per_s'), '.0f')}", "", "", "", "")
    elif mem.get("skipped"):
        row("peak RSS during big upload", "skipped", "", "", f"< {TARGET_PEAK_RSS_MIB} MiB", "-")

    head = ("metric", "odst", "reference", "ratio", "target", "verdict")
    print()
    print(f"ODST benchmark  {R['meta']['started']}  host {R['meta']['host']}  "
          f"{R['meta']['cpus']} CPUs  kernel {R['meta']['kernel']}")
    print(f"file {p['size_mib']} MiB random; reference = sha512sum (upload), nginx sendfile "
          f"(download); {p['workers']} worker process(es) per server (nginx worker_processes, ODST "
          f"http_workers), nginx sending {'ODST' + chr(39) + 's stored copy' if p.get('nginx_file') == 'store' else 'the input file'}; "
          f"wrk {p['rounds']} x {p['duration']:g} s/server, {p['wrk_threads']} threads, "
          f"{p['range_requests']}; MB = 10^6 bytes")
    la0, la1 = R["meta"].get("loadavg_start"), R["meta"].get("loadavg_end")
    if la0 and la1:
        busy = ("  (machine was busy at the start: figures may be noisy; see the noise row)"
                if la0[0] > 0.7 and not (R["meta"].get("idle_wait") or {}).get("idle") else "")
        print(f"load average 1/5/15 min: start {la0[0]:.2f}/{la0[1]:.2f}/{la0[2]:.2f}, "
              f"end {la1[0]:.2f}/{la1[1]:.2f}/{la1[2]:.2f}{busy}")
    iw = R["meta"].get("idle_wait")
    if iw:
        print(f"waited {iw['waited_s']:.0f} s for an idle machine: "
              f"{'idle' if iw['idle'] else 'never idle, ran anyway'}")
    print_table(head, rows)
    by_phase = mem.get("peak_rss_kib_by_phase")
    if by_phase:
        print("odst serve peak RSS by phase (100 ms samples): " + ", ".join(
            f"{k} {v / 1024:.0f} MiB" for k, v in by_phase.items()))
    for name in ("odst", "nginx"):
        fails = [c for c in (rc.get(name) or []) if not c["ok"]]
        for c in fails:
            print(f"  {name} check {c['severity'].upper()}: {c['check']}: {c['detail']}")
    if R["errors"]:
        print("errors / problems:")
        for e in R["errors"]:
            print(f"  - {e}")
    print(f"JSON: {out}")


def _ms(us):
    return None if us is None else us / 1000


def _chk(c):
    if not c:
        return "-"
    return f"{c['n206']}/{c['nother']}/{c['badlen']}/{c['badcr']}"


def _chk_ok(c):
    if not c:
        return None
    return c["n206"] > 0 and not (c["nother"] or c["badlen"] or c["badcr"])


def _rc(checks):
    if checks is None:
        return "-"
    n_fail = sum(1 for c in checks if c["severity"] == "fail")
    n_warn = sum(1 for c in checks if c["severity"] == "warn")
    s = f"{len(checks) - n_fail - n_warn}/{len(checks)}"
    if n_warn:
        s += f" ({n_warn} warn)"
    return s


if __name__ == "__main__":
    sys.exit(main())
