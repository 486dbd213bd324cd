#!/usr/bin/env python3
"""ODST bandwidth benchmark (issue 14): link limits, windows, urgency, download caps.

Real ``odst serve`` processes on 127.0.0.1 through the checkout's ``harness.Network``:
A listens, B dials A, they are registered. Then, one after the other:

1. **Receive limit** (the puller's side): B limits its link to A to ``--rate-mb`` (20)
   MB/s receive (``local: no``, or loopback would be exempt). A package of ``--size-mib``
   (1024) is pulled by B; B's progress is sampled every 50 ms. Figures: MB/s over the whole
   transfer and over the middle ``--average-s`` (30) seconds, the highest 1-second rate
   (target: average 19-21 MB/s, no second over 1.5x the limit).
2. **Send limit** (the server's side): the same with the limit set at A on its link to B
   (send), and none at B, ``--send-size-mib`` (256).
3. **A window closing mid-transfer**: while B pulls at the limit, B's link gets a paused
   window covering now (``daily 00:00-24:00 paused``). Figure: seconds from the API's answer
   until B's chunk count stops growing (target < 2 s); it is checked to stay stopped for
   3 s; then the window is removed and the transfer resumes. The chunks A served for this
   content are counted: at most the file's chunks + a few (target: chunks + 8).
4. **Urgent crosses a paused link**: with B's link paused, A gets ``normal.pkg`` and
   ``hotfix.pkg``; ``hotfix.pkg`` is marked urgent (at A, by the bench's admin token);
   it becomes available at B while ``normal.pkg`` still has no chunks there.
5. **Download caps**: A caps Mac downloads at ``--cap`` (50) at once and ``--egress-mb``
   (50) MB/s; ``--clients`` (200) concurrent ``curl --retry`` fetch a ``--dl-size-mib``
   (4) MiB package. Figures: the most downloads at once A saw (target: == cap), how many
   were refused with 503 + Retry-After, all completed, every file's SHA-256 right, and
   the egress rate.

It is a report: a missed target is marked, the run goes on. Output: a table on stdout,
progress on stderr, JSON in ``<work>/bandwidth.json`` (``--work``, default
/tmp/odst-bench-bw).

    .venv/bin/python bench/bandwidth.py                         # full run, ~3 min
    .venv/bin/python bench/bandwidth.py --size-mib 256 --send-size-mib 128 --clients 100   # quicker
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median  # noqa: E402,F401  (puts the checkout's harness on sys.path)
from harness.network import Network, content_blocks  # noqa: E402

MIB = 1 << 20
MB = 1_000_000


class Sampler(threading.Thread):
    """(t, chunks_done) of one content's transfer at a site, every 50 ms."""

    def __init__(self, net: Network, site, blake3: str = "", name: str = ""):
        super().__init__(daemon=True)
        self.net, self.site, self.blake3, self.name = net, site, blake3, name
        self.samples: list[tuple[float, int]] = []
        self.done_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            st = self.net.try_get(self.site, "/api/v1/state")
            t = time.monotonic()
            if st:
                for tr in st["transfers"]:
                    if tr["name"] == self.name:
                        self.samples.append((t, tr["chunks_done"]))
                        if tr["status"] == "available" and self.done_at is None:
                            self.done_at = t
            time.sleep(0.05)

    def at(self, t: float) -> float:
        """Chunks done at time t (linear between samples)."""
        s = self.samples
        if not s or t <= s[0][0]:
            return s[0][1] if s else 0
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return c0 + (c1 - c0) * (t - t0) / max(t1 - t0, 1e-9)
        return s[-1][1]

    def last_growth(self, after: float) -> float | None:
        """Time of the last sample after ``after`` whose count grew."""
        last = None
        for (t0, c0), (t1, c1) in zip(self.samples, self.samples[1:]):
            if t1 >= after and c1 > c0:
                last = t1
        return last


def rate_figures(sampler: Sampler, chunk_bytes: int, average_s: float) -> dict:
    s = sampler.samples
    moving = [(t, c) for t, c in s if c > 0]
    start = moving[0][0] if moving else s[0][0]
    end = sampler.done_at or s[-1][0]
    total = (s[-1][1]) * chunk_bytes
    seconds = []
    t = start
    while t + 1 <= end:
        seconds.append((sampler.at(t + 1) - sampler.at(t)) * chunk_bytes)
        t += 1
    mid = (start + end) / 2
    a0, a1 = max(start, mid - average_s / 2), min(end, mid + average_s / 2)
    avg = (sampler.at(a1) - sampler.at(a0)) * chunk_bytes / max(a1 - a0, 1e-9)
    return {"seconds": round(end - start, 2), "overall_MBps": round(total / max(end - start, 1e-9) / MB, 2),
            "average_window_s": round(a1 - a0, 1), "average_MBps": round(avg / MB, 2),
            "max_second_MBps": round(max(seconds) / MB, 2) if seconds else None,
            "per_second_MBps": [round(x / MB, 2) for x in seconds]}


def served_to(net: Network, source, peer_id: str) -> int:
    return net.state(source)["chunks_served"].get(peer_id, 0)


def limit(net, site, peer_id, **body):
    return net.request(site, "PUT", f"/api/v1/bandwidth/links/{peer_id}", json=body)


def limited_transfer(net: Network, sender, receiver, *, limited, peer, direction: str, name: str, size: int,
                     rate: int, average_s: float) -> dict:
    """Limit ``direction`` (send or receive) at ``limited`` on its link to ``peer``, send a package
    of ``size`` bytes from ``sender`` to ``receiver`` while sampling the receiver, lift the limit:
    the rate figures (rate_figures)."""
    limit(net, limited, peer.id, **{direction: rate}, local="no")
    sampler = Sampler(net, receiver, name=name)
    sampler.start()
    net.upload(sender, name, size)
    net.wait_available(name, [receiver], timeout=size / rate * 2 + 60)
    time.sleep(0.2)  # the sampler's last period
    sampler.stop.set()
    sampler.join()
    net.request(limited, "DELETE", f"/api/v1/bandwidth/links/{peer.id}")
    return rate_figures(sampler, MIB, average_s)


def rate_marks(label: str, fig: dict, rate_mb: float) -> list[tuple[str, str, bool]]:
    """The average within 5 % of the limit, and no second above 1.5 times it."""
    return [(f"{label}: average over {fig['average_window_s']} s", f"{fig['average_MBps']} MB/s",
             0.95 * rate_mb <= fig["average_MBps"] <= 1.05 * rate_mb),
            ("  highest second", f"{fig['max_second_MBps']} MB/s", (fig["max_second_MBps"] or 0) <= 1.5 * rate_mb)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/odst-bench-bw")
    ap.add_argument("--rate-mb", type=float, default=20.0)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--send-size-mib", type=int, default=256)
    ap.add_argument("--average-s", type=float, default=30.0)
    ap.add_argument("--cap", type=int, default=50)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--egress-mb", type=float, default=50.0)
    ap.add_argument("--dl-size-mib", type=int, default=4)
    ap.add_argument("--only", default="receive,send,window,urgent,downloads",
                    help="comma-separated parts to run (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    rate = int(args.rate_mb * MB)
    results: dict = {"args": vars(args), "load_before": os.getloadavg()}
    marks: list[tuple[str, str, bool]] = []

    net = Network(work / "sites", title="bandwidth bench", out=sys.stderr)
    try:
        a = net.add("a", listen=True)
        b = net.add("b", dial=["a"])
        net.start()
        net.register(a, b)

        # 1. receive limit at B
        if "receive" in only:
            with net.step(f"1. B receives from A at most {args.rate_mb} MB/s: {args.size_mib} MiB"):
                fig = limited_transfer(net, a, b, limited=b, peer=a, direction="receive", name="recv.pkg",
                                       size=args.size_mib * MIB, rate=rate, average_s=args.average_s)
                results["receive_limit"] = fig
                marks += rate_marks(f"receive limit {args.rate_mb} MB/s", fig, args.rate_mb)

        # 2. send limit at A
        if "send" in only:
            with net.step(f"2. A sends to B at most {args.rate_mb} MB/s: {args.send_size_mib} MiB"):
                send_bytes = args.send_size_mib * MIB
                fig = limited_transfer(net, a, b, limited=a, peer=b, direction="send", name="send.pkg",
                                       size=send_bytes, rate=rate,
                                       average_s=min(args.average_s, send_bytes / rate * 0.8))
                results["send_limit"] = fig
                marks += rate_marks(f"send limit {args.rate_mb} MB/s (server side)", fig, args.rate_mb)

        # 3. a window closing mid-transfer, then opening again
        if "window" in only:
            with net.step("3. a paused window closes the link mid-transfer; reopening resumes"):
                size = 256 * MIB
                limit(net, b, a.id, receive=rate, local="no")
                served_before = served_to(net, a, b.id)
                sampler = Sampler(net, b, name="window.pkg")
                sampler.start()
                net.upload(a, "window.pkg", size)
                net.wait_until(lambda: sampler.samples and sampler.samples[-1][1] >= 64, 60, "64 chunks at B")
                limit(net, b, a.id, receive=rate, local="no", windows=["daily 00:00-24:00 paused"])
                t_set = time.monotonic()
                at_pause = sampler.samples[-1][1]
                time.sleep(3.5)
                stopped_at = sampler.last_growth(t_set - 1) or t_set
                count_a = sampler.samples[-1][1]
                time.sleep(3.0)
                count_b = sampler.samples[-1][1]
                pause_s = stopped_at - t_set
                results["window"] = {"pause_after_s": round(max(pause_s, 0), 2), "chunks_at_pause": at_pause,
                                     "chunks_while_paused": count_b - count_a}
                marks.append(("window closing: transfer stops after", f"{max(pause_s, 0):.2f} s", pause_s < 2.0))
                marks.append(("  chunks fetched in the 3 s after it had stopped", str(count_b - count_a), count_b == count_a))
                limit(net, b, a.id, receive=rate, local="no")  # the window is gone: open again
                net.wait_available("window.pkg", [b], timeout=120)
                sampler.stop.set()
                sampler.join()
                served = served_to(net, a, b.id) - served_before
                chunks = size // MIB
                results["window"] |= {"chunks": chunks, "served": served}
                marks.append((f"resumed: chunks A served for a {chunks}-chunk file", str(served), served <= chunks + 8))

        # 4. urgent crosses a paused link
        if "urgent" in only:
            with net.step("4. an urgent package crosses a paused link; a normal one waits"):
                limit(net, b, a.id, receive=rate, local="no", windows=["daily 00:00-24:00 paused"])
                net.upload(a, "normal.pkg", 16 * MIB)
                net.upload(a, "hotfix.pkg", 16 * MIB)
                t0 = time.monotonic()
                net.request(a, "PUT", "/api/v1/bandwidth/urgent/hotfix.pkg", json={"urgent": True,
                                                                                   "reason": "bench: security fix"})
                net.wait_available("hotfix.pkg", [b], timeout=60)
                urgent_s = time.monotonic() - t0
                normal = [t for t in net.state(b)["transfers"] if t["name"] == "normal.pkg"]
                normal_done = normal[0]["chunks_done"] if normal else 0
                normal_there = net.available_at(b, "normal.pkg")
                results["urgent"] = {"hotfix_seconds": round(urgent_s, 2), "normal_chunks_at_b": normal_done,
                                     "normal_available": normal_there, "normal_detail": normal[0]["detail"] if normal else ""}
                marks.append(("urgent package across a paused link", f"{urgent_s:.2f} s", True))
                marks.append(("  normal package meanwhile: chunks at B", str(normal_done),
                              normal_done == 0 and not normal_there))
                history = net.get(a, "/api/v1/events", params={"type": "PackageUrgencySet"})
                items = history.get("events", history.get("items", []))
                marks.append(("  who marked it is in the log", ", ".join(sorted({e.get("actor", "?") for e in items})),
                              bool(items)))
                net.request(b, "DELETE", f"/api/v1/bandwidth/links/{a.id}")
                net.wait_available("normal.pkg", [b], timeout=60)

        # 5. download caps
        if "downloads" in only:
            with net.step(f"5. {args.clients} Macs against a cap of {args.cap} downloads at once"):
                data = b"".join(content_blocks(args.dl_size_mib * MIB, "download-bench"))
                digest = hashlib.sha256(data).hexdigest()
                net.upload(a, "mac.pkg", data=data)
                net.request(a, "PUT", "/api/v1/bandwidth/downloads",
                            json={"max_concurrent": args.cap, "egress": int(args.egress_mb * MB)})
                time.sleep(1.2)  # the gateway reads caps at most a second old
                out = work / "dl"
                out.mkdir(parents=True, exist_ok=True)
                url = f"{a.url}/CasperShare/Packages/mac.pkg"
                t0 = time.monotonic()
                procs = [subprocess.Popen(["curl", "-sS", "--fail", "--retry", "1000", "--retry-max-time", "600",
                                           "-o", str(out / f"{i}.pkg"), url], stderr=subprocess.PIPE)
                         for i in range(args.clients)]
                codes = [p.wait() for p in procs]
                elapsed = time.monotonic() - t0
                ok = sum(1 for c in codes if c == 0)
                good = sum(1 for i in range(args.clients)
                           if (out / f"{i}.pkg").exists()
                           and hashlib.sha256((out / f"{i}.pkg").read_bytes()).hexdigest() == digest)
                st = net.get(a, "/api/v1/bandwidth")["downloads"]
                egress = args.clients * len(data) / elapsed / MB
                results["downloads"] = {"completed": ok, "hashes_ok": good, "peak": st["peak"], "refused": st["refused"],
                                        "seconds": round(elapsed, 2), "egress_MBps": round(egress, 1)}
                marks.append((f"downloads at once (cap {args.cap})", str(st["peak"]), st["peak"] == args.cap))
                marks.append(("  refused with 503 + Retry-After", str(st["refused"]), st["refused"] > 0))
                marks.append((f"  completed with curl --retry / hashes right (of {args.clients})", f"{ok} / {good}",
                              ok == good == args.clients))
                marks.append((f"  egress (limit {args.egress_mb} MB/s)", f"{egress:.1f} MB/s",
                              egress <= args.egress_mb * 1.05))
    finally:
        net.close()

    results["load_after"] = os.getloadavg()
    (work / "bandwidth.json").write_text(json.dumps(results, indent=2))
    width = max(len(m[0]) for m in marks)
    print(f"\nODST bandwidth bench ({work / 'bandwidth.json'}); load average before "
          f"{results['load_before'][0]:.1f}, after {results['load_after'][0]:.1f} on {os.cpu_count()} cores")
    for what, value, met in marks:
        print(f"  {what:<{width}}  {value:>14}  {'ok' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
