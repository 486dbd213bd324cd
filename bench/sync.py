"""Catch-up bench: a new site pulls a catalogue of many small packages, against rsync.

    ./run bench-sync [--packages 3000 30000] [--size-kib 8] [--concurrency 8]

For each ``--packages`` N (a fresh pair of sites each):

1. Starts site ``hq`` and uploads N packages of ``--size-kib`` KiB (random, each different),
   ``--concurrency`` API PUTs at a time.
2. Yardstick: an ``rsync`` daemon serving hq's packages directory, pulled into an empty
   directory (``rsync -a rsync://…/mod/ dest/``), median of ``--rsync-repeats`` runs.
3. A new site ``branch`` dials hq and is started; then the two register, and the clock runs
   until branch's read model says it holds every package AND every file is in its store.
   Afterwards each of branch's files is compared with hq's (SHA-256): a figure is only printed
   for a catch-up that delivered the right bytes.

Prints, per N: seconds for rsync and for ODST, their ratio (target <= 10 at 3,000; the cost
per package at 30,000 no worse than at 3,000), milliseconds per package, CPU-seconds of
branch's processes (python + nats-server) per package and per GiB, hq's CPU, and the load
average beside each figure. Writes ``<work>/sync.json``. Everything listens on 127.0.0.1;
every process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import HOST, print_table  # noqa: E402
from bench.replication import CLK_TCK, RsyncDaemon, ensure_rsync, site_cpu  # noqa: E402
from harness.network import Network  # noqa: E402
from odst.datadir import read_model_path  # noqa: E402

TARGET_RATIO_3000 = 10.0
FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def fresh_group(work: Path) -> Path:
    """A new directory for one run's sites and rsync copies, in a block group ext4 chooses
    afresh: ``work`` is marked a top of a directory hierarchy (``chattr +T``) and the new
    directory's name is random (ext4 starts its search for a group at the name's hash).

    Without a journal (this VM's root file system), ext4 creates each file by scanning its
    group's inode bitmap past every inode freed there in the last 60-300 s (``recently_deleted``,
    a buffer lookup each). The files of the runs just before, removed in the same group, made
    that 65% of the CPU of creating files (perf): 0.27-0.33 ms of kernel time per file against
    0.04-0.06 ms in a fresh group, which moved branch's system time (0.2-0.6 ms per package)
    and rsync's yardstick (0.20-0.9 s) together, by what other runs had just removed. Where
    the flag cannot be set the run goes where it would have gone (then it may pay that)."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = struct.unpack("i", fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_TOPDIR_FL))
    except OSError as exc:
        print(f"note: {work} takes no ext4 TOPDIR flag ({exc.strerror}): file creation may pay "
              "for inodes other runs freed there in the last minutes", file=sys.stderr)
    finally:
        os.close(fd)
    run = work / f"run-{secrets.token_hex(4)}"
    run.mkdir()
    return run


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def upload_all(net: Network, site, n: int, size: int, concurrency: int) -> float:
    """Upload n different packages, ``concurrency`` PUTs at a time; returns seconds."""
    rnd = random.Random(n)
    bodies = [rnd.randbytes(size) for _ in range(min(n, 64))]
    local = threading.local()

    def one(i: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=site.url, timeout=120,
                                                 headers={"Authorization": f"Bearer {net.token}"})
        body = bodies[i % len(bodies)][:-8] + i.to_bytes(8, "big")  # every content different
        r = client.put(f"/api/v1/packages/Pkg {i:06d}.pkg", content=body)
        if r.status_code != 201:
            raise RuntimeError(f"upload {i}: {r.status_code} {r.text}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        for k, _ in enumerate(pool.map(one, range(n)), 1):
            if k % 2000 == 0:
                net.say(f"  {k}/{n} uploaded ({time.monotonic() - t0:.0f} s)")
    return time.monotonic() - t0


def rsync_pull(daemon: RsyncDaemon, work: Path, repeats: int) -> dict:
    """``rsync -a`` of the whole module into an empty directory, ``repeats`` times, each into
    a new one. None is removed here (``run_one`` does, after the catch-up): on ext4 without a
    journal each file created steps past every inode freed there in the last 60-300 s, reading its
    table block, so the files of one run removed before the next made the next one's creates
    (rsync's, then branch's) pay for them: rsync's time swung 0.23-1.16 s, and a tenth of
    branch's CPU in the catch-up was that walk (perf)."""
    times, cpus = [], []
    for i in range(repeats):
        dest = work / f"rsync-dest-{i}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        before = os.times()
        t0 = time.monotonic()
        p = subprocess.run(["rsync", "-a", f"rsync://{HOST}:{daemon.port}/mod/", f"{dest}/"],
                           capture_output=True, text=True, timeout=3600)
        times.append(time.monotonic() - t0)
        after = os.times()
        cpus.append(after.children_user + after.children_system - before.children_user - before.children_system)
        if p.returncode != 0:
            raise RuntimeError(f"rsync pull failed ({p.returncode}): {p.stderr[-500:]}")
    files = sum(1 for _ in dest.iterdir())
    return {"s": statistics.median(times), "all_s": times, "client_cpu_s": statistics.median(cpus),
            "files": files, "load": load()}


def held(db: Path, site_id: str) -> int:
    """Packages whose current content branch's read model says branch serves."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return 0
    try:
        return conn.execute("SELECT count(*) FROM packages p JOIN serving s ON s.key=p.key AND s.blake3=p.blake3"
                            " AND s.site=?", (site_id,)).fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def user_system(pid: int) -> tuple[float, float]:
    """(user, system) CPU-seconds of a process so far: system time is the kernel's work for it
    (file creation, renames, fsyncs, sockets), user time its own code (Python, SQLite, hashing)."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def profile(sites: list, folder: Path, gil: bool = False) -> list[subprocess.Popen]:
    """``py-spy record`` of each site's python process until stopped (SIGINT), collapsed stacks
    (flamegraph.pl input) each. ``gil``: only the thread holding the GIL is sampled (Python's
    CPU, less time blocked in fsync or SQLite's I/O, which the default samples count too)."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    folder.mkdir(parents=True, exist_ok=True)
    return [subprocess.Popen([spy, "record", "-p", str(s.proc.pid), "-r", "200", "--nonblocking",
                              *(["--gil"] if gil else []),
                              "-f", "raw", "-o", str(folder / f"{s.name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for s in sites]


class Timeline:
    """Every 50 ms while a catch-up runs: the bytes of hq's log in branch's mirror (its
    message blocks on disk), the events branch has folded from it (a checkpoint read) and its
    files (a directory listing): ~1 ms together. Reported: when 1, 25, 50, 75 and 100% of
    each was reached, to see where the seconds go (the mirror, the fold, the pulls)."""

    def __init__(self, branch, db: Path, hq_id: str, n: int, t0: float):
        self.branch, self.db, self.stream, self.n, self.t0 = branch, db, f"PEER_{hq_id}", n, t0
        self.samples: list[tuple[float, int, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _folded(self) -> int:
        try:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=1)
            try:
                row = conn.execute("SELECT coalesce(max(seq), 0) FROM checkpoints WHERE stream LIKE ?",
                                   (self.stream + "%",)).fetchone()
                return row[0]
            finally:
                conn.close()
        except sqlite3.Error:
            return 0

    def _mirrored(self) -> int:
        """Bytes of hq's log in branch's mirror, on disk (nats-server's message blocks)."""
        return sum(p.stat().st_size for p in (self.branch.data / "nats").glob(f"jetstream/*/streams/{self.stream}/msgs/*.blk"))

    def _sample(self) -> None:
        files = sum(1 for _ in self.branch.packages_dir.iterdir())
        self.samples.append((time.monotonic() - self.t0, files, self._folded(), self._mirrored()))

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        self._sample()  # the end itself (the catch-up was seen done between two samples)
        out = {}
        last = self.samples[-1] if self.samples else (0, 0, 0, 0)
        for label, col, total in (("mirrored", 3, last[3]), ("folded", 2, last[2]), ("files", 1, self.n)):
            out[label] = {f"{q}%": next((round(s[0], 2) for s in self.samples if s[col] >= total * q / 100), None)
                          for q in (1, 25, 50, 75, 100)}
        return out


def catch_up(net: Network, hq, n: int, profile_dir: Path | None = None, gil: bool = False,
             timeline: bool = False) -> dict:
    branch = net.add("branch", dial=["hq"], env={"ODST_LOG_LEVEL": "warning"})
    net.start(branch, timeout=120)
    db = read_model_path(branch.data)
    spies = profile([hq, branch], profile_dir, gil) if profile_dir else []
    cpu0, hq0 = site_cpu(branch), site_cpu(hq)
    split0 = {s.name: user_system(s.proc.pid) for s in (hq, branch)}
    t0 = time.monotonic()
    watch = Timeline(branch, db, hq.id, n, t0) if timeline else None
    net.register("hq", branch)
    last_note = time.monotonic()

    def done() -> bool:
        nonlocal last_note
        if time.monotonic() - last_note > 30:
            net.say(f"  branch holds {held(db, branch.id)}/{n} ({time.monotonic() - t0:.0f} s, load {load()})")
            last_note = time.monotonic()
        # the files first (a directory listing, ~1 ms), the read model's count only once they
        # are all there: that count is a join over every package (~13 ms of CPU at 3,000), and
        # asked every 0.1 s it took a tenth of a core from the two sites being measured
        return sum(1 for _ in branch.packages_dir.iterdir()) == n and held(db, branch.id) == n

    net.wait_until(done, 7200, what="every package at branch", interval=0.1)
    seconds = time.monotonic() - t0
    steps = watch.stop() if watch is not None else None
    cpu1, hq1 = site_cpu(branch), site_cpu(hq)
    split1 = {s.name: user_system(s.proc.pid) for s in (hq, branch)}
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for spy in spies:
        spy.wait(60)
    out = {"s": seconds, "load": load(),
           "branch_cpu_s": {k: (cpu1[k] or 0) - (cpu0[k] or 0) for k in cpu1},
           "hq_cpu_s": {k: (hq1[k] or 0) - (hq0[k] or 0) for k in hq1},
           # each site's python process: user and system CPU-seconds
           "python_user_system_s": {k: [round(split1[k][i] - split0[k][i], 2) for i in (0, 1)] for k in split1}}
    theirs, ours = digests(hq.packages_dir), digests(branch.packages_dir)
    if theirs != ours:
        wrong = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
        raise RuntimeError(f"branch's files differ from hq's: {len(wrong)} of them, e.g. {wrong[:5]}")
    out["files_checked"] = len(ours)
    if steps is not None:
        out["timeline_s"] = steps
    return out


def run_one(n: int, args, work: Path) -> dict:
    net = Network(work / f"sites-{n}", title=f"sync {n}", out=sys.stderr)
    size = args.size_kib * 1024
    result: dict = {"packages": n, "size_kib": args.size_kib}
    daemon = None
    try:
        hq = net.add("hq", listen=True, env={"ODST_LOG_LEVEL": "warning"})
        net.start(hq, timeout=120)
        with net.step(f"upload {n} packages of {args.size_kib} KiB, {args.concurrency} at a time"):
            result["upload_s"] = upload_all(net, hq, n, size, args.concurrency)
            result["upload_load"] = load()
        daemon = RsyncDaemon(work / f"rsync-{n}", hq.packages_dir)
        daemon.start()
        with net.step("rsync daemon pull of hq's packages directory"):
            result["rsync"] = rsync_pull(daemon, work / f"rsync-{n}", args.rsync_repeats)
            if result["rsync"]["files"] != n:
                raise RuntimeError(f"rsync pulled {result['rsync']['files']} files, not {n}")
        with net.step("a new site catches up"):
            result["odst"] = catch_up(net, hq, n, Path(args.profile) / str(n) if args.profile else None,
                                      args.profile_gil, args.timeline)
    finally:
        if daemon is not None:
            daemon.stop()
        net.close()
        if not args.keep:
            shutil.rmtree(work / f"sites-{n}", ignore_errors=True)
            shutil.rmtree(work / f"rsync-{n}", ignore_errors=True)  # rsync's copies, once branch is measured
            with contextlib.suppress(OSError):
                work.rmdir()  # fresh_group's
    o, r = result["odst"], result["rsync"]
    gib = n * size / (1 << 30)
    cpu = sum(o["branch_cpu_s"].values())
    result["ratio"] = o["s"] / r["s"]
    result["odst_ms_per_package"] = o["s"] / n * 1000
    result["rsync_ms_per_package"] = r["s"] / n * 1000
    result["branch_cpu_ms_per_package"] = cpu / n * 1000
    result["branch_cpu_s_per_gib"] = cpu / gib
    result["hq_cpu_ms_per_package"] = sum(o["hq_cpu_s"].values()) / n * 1000
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", type=int, nargs="+", default=[3000, 30000],
                    help="catalogue sizes, one run each (default 3000 30000)")
    ap.add_argument("--size-kib", type=int, default=8, help="size of each package (default 8 KiB)")
    ap.add_argument("--concurrency", type=int, default=8, help="uploads at once (default 8)")
    ap.add_argument("--rsync-repeats", type=int, default=3)
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="py-spy record hq's and branch's python during each catch-up into DIR/<N>/<site>.txt (collapsed stacks)")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: sample only the thread holding the GIL (Python's CPU, not I/O waits)")
    ap.add_argument("--timeline", action="store_true",
                    help="sample branch's mirror, folded events and files every 50 ms: when each quarter was reached")
    ap.add_argument("--keep", action="store_true", help="keep the sites' data directories")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    args = ap.parse_args()
    ensure_rsync()
    work = Path(args.work or tempfile.mkdtemp(prefix="odst-bench-sync-"))
    work.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    for n in args.packages:
        results.append(run_one(n, args, fresh_group(work)))
        (work / "sync.json").write_text(json.dumps(results, indent=2))
    report(results, work)
    return 0


def report(results: list[dict], work: Path) -> None:
    print(f"\nODST catch-up bench: a new site pulls N small packages; yardstick rsync daemon pull "
          f"({os.cpu_count()} CPUs, {work / 'sync.json'})")
    rows = []
    for r in results:
        o = r["odst"]
        rows.append([f"{r['packages']:,} x {r['size_kib']} KiB", f"{r['rsync']['s']:.2f} s ({r['rsync']['load']})",
                     f"{o['s']:.1f} s ({o['load']})", f"{r['ratio']:.1f}x",
                     f"{r['odst_ms_per_package']:.2f} / {r['rsync_ms_per_package']:.3f}",
                     f"{r['branch_cpu_ms_per_package']:.2f} ({r['branch_cpu_s_per_gib']:.0f}/GiB)",
                     f"{r['hq_cpu_ms_per_package']:.2f}"])
    print_table(["packages", "rsync (load)", "odst (load)", "odst/rsync", "ms/pkg odst / rsync",
                 "branch CPU-ms/pkg (CPU-s/GiB)", "hq CPU-ms/pkg"], rows)
    for r in results:
        us = r["odst"].get("python_user_system_s", {})
        print("  python CPU-ms per package, user + system: " + ", ".join(
            f"{site} {u / r['packages'] * 1000:.2f} + {s / r['packages'] * 1000:.2f}" for site, (u, s) in us.items())
            + f" ({r['packages']:,})")
    for r in results:
        for label, steps in r["odst"].get("timeline_s", {}).items():
            print(f"  {label} at (s): " + ", ".join(f"{q} {t}" for q, t in steps.items()) + f" ({r['packages']:,})")
    if results and results[0]["packages"] <= 3000:
        ok = results[0]["ratio"] <= TARGET_RATIO_3000
        print(f"  target at {results[0]['packages']:,}: <= {TARGET_RATIO_3000:.0f}x rsync: "
              f"{'met' if ok else 'NOT met'} ({results[0]['ratio']:.1f}x)")
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"  cost per package at {b['packages']:,} vs {a['packages']:,}: "
              f"{b['odst_ms_per_package'] / a['odst_ms_per_package']:.2f}x wall, "
              f"{b['branch_cpu_ms_per_package'] / a['branch_cpu_ms_per_package']:.2f}x branch CPU (linear: <= 1)")


if __name__ == "__main__":
    sys.exit(main())
