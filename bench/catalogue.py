"""Catalogue benchmark: one site with thousands of packages, measured where an admin feels it.

    ./run bench-catalogue [--packages 5000] [--size-kib 8]

1. Starts site ``hq`` and uploads ``--packages`` packages (random ``--size-kib`` KiB each, four
   uploads at a time), in stages dev/test/prod.
2. List API: ``GET /api/v1/packages?limit=100&offset=…`` (a page of the UI), p50/p95 over
   ``--requests`` requests at random offsets, and the bytes of a page; for reference, the whole
   catalogue in one answer with and without ``include=chunks`` (what the UI used to load on
   every event: ``?limit=10000`` with every chunk hash).
3. Packages page in headless Debian Chromium (Playwright, ``/usr/bin/chromium``): time from
   navigation to the first 100 rows drawn, median of ``--renders`` fresh loads; then bytes the
   page receives per live update (a stage change made through the API by someone else: the SSE
   event plus the one row it fetches), counted with the DevTools protocol, median of 5.
4. A new site ``branch`` dials ``hq`` and registers: time until its read model holds the whole
   catalogue, and until it holds a verified copy of every package.
5. Stops both; ``odst audit`` and ``odst rebuild`` of ``hq``'s data directory, timed.

Prints a table and writes ``<work>/catalogue.json``. Everything listens on 127.0.0.1; every
process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import median  # noqa: E402
from harness.network import Network  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PASSWORD = "bench-password-123"
STAGES = ("dev", "test", "prod")
PAGE = 100


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def upload_all(net: Network, site, n: int, size: int) -> float:
    """Upload n packages, four at a time; returns seconds."""
    rnd = random.Random(1)
    bodies = [rnd.randbytes(size) for _ in range(min(n, 64))]
    local = threading.local()

    def one(i: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=site.url, timeout=60,
                                                 headers={"Authorization": f"Bearer {net.token}"})
        body = bodies[i % len(bodies)][:-8] + i.to_bytes(8, "big")  # every content different
        r = client.put(f"/api/v1/packages/App {i:05d}.pkg", content=body, params={"stage": STAGES[i % 3]})
        if r.status_code != 201:
            raise RuntimeError(f"upload {i}: {r.status_code} {r.text}")

    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        for k, _ in enumerate(pool.map(one, range(n)), 1):
            if k % 500 == 0:
                net.say(f"  {k}/{n} uploaded ({time.monotonic() - t0:.0f} s)")
    return time.monotonic() - t0


def list_api(site, token: str, n: int, requests: int) -> dict:
    out: dict = {}
    with httpx.Client(base_url=site.url, timeout=120, headers={"Authorization": f"Bearer {token}"}) as c:
        c.get("/api/v1/packages", params={"limit": PAGE})  # warm
        times, sizes = [], []
        rnd = random.Random(2)
        for _ in range(requests):
            offset = rnd.randrange(0, max(1, n - PAGE))
            t0 = time.perf_counter()
            r = c.get("/api/v1/packages", params={"limit": PAGE, "offset": offset})
            times.append(time.perf_counter() - t0)
            sizes.append(len(r.content))
            assert r.status_code == 200 and r.json()["total"] == n, r.text[:300]
        out["page_p50_ms"] = statistics.median(times) * 1000
        out["page_p95_ms"] = pct(times, 95) * 1000
        out["page_bytes"] = int(statistics.median(sizes))
        for label, params in (("all_rows", {"limit": 10000}), ("all_rows_with_chunks", {"limit": 10000, "include": "chunks"})):
            t0 = time.perf_counter()
            r = c.get("/api/v1/packages", params=params)
            out[f"{label}_ms"] = (time.perf_counter() - t0) * 1000
            out[f"{label}_bytes"] = len(r.content)
        t0 = time.perf_counter()
        r = c.get("/api/v1/packages", params={"q": "App 04", "limit": PAGE})
        out["search_ms"] = (time.perf_counter() - t0) * 1000
    return out


def browser(net: Network, site, renders: int) -> dict:
    from playwright.sync_api import sync_playwright

    out: dict = {}
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = b.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)
            page.goto(site.url + "/ui/")
            page.get_by_label("User name").fill("admin")
            page.get_by_label("Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            page.locator("table.packages tbody tr").nth(PAGE - 1).wait_for()
            times = []
            for _ in range(renders):
                page.goto("about:blank")
                page.goto(site.url + "/ui/#/packages", wait_until="commit")
                page.locator("table.packages tbody tr").nth(PAGE - 1).wait_for()
                times.append(page.evaluate("performance.now()"))
            out["render_ms_median"] = statistics.median(times)
            out["render_ms_all"] = [round(t) for t in times]

            # bytes per live update: everything the page receives (the SSE stream included)
            received: dict[str, int] = {}
            urls: dict[str, str] = {}
            cdp = page.context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.on("Network.requestWillBeSent", lambda e: urls.__setitem__(e["requestId"], e["request"]["url"]))
            cdp.on("Network.dataReceived", lambda e: received.__setitem__(
                e["requestId"], received.get(e["requestId"], 0) + e["dataLength"]))
            page.goto("about:blank")
            page.goto(site.url + "/ui/#/packages")
            page.locator("table.packages tbody tr").nth(PAGE - 1).wait_for()
            page.locator("#live.live").wait_for()
            per_update, per_request = [], []
            with httpx.Client(base_url=site.url, timeout=30, headers={"Authorization": f"Bearer {net.token}"}) as c:
                for k in range(5):
                    row = page.locator("table.packages tbody tr").nth(10 + k)
                    name = row.get_attribute("data-name")
                    stage = row.locator("select").input_value()
                    new = next(s for s in STAGES if s != stage)
                    quiet(received)
                    before = dict(received)
                    assert c.patch(f"/api/v1/packages/{name}", json={"stage": new}).status_code == 200
                    deadline = time.monotonic() + 30
                    while row.locator("select").input_value() != new:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"the row of {name} did not show stage {new}")
                        page.wait_for_timeout(20)
                    quiet(received)
                    delta = {urls.get(r, r): n - before.get(r, 0) for r, n in received.items() if n != before.get(r, 0)}
                    per_update.append(sum(delta.values()))
                    per_request.append(delta)
            out["live_update_bytes_median"] = statistics.median(per_update)
            out["live_update_bytes_all"] = per_update
            out["live_update_requests_example"] = {u.replace(site.url, ""): n for u, n in per_request[0].items()}
        finally:
            b.close()
    return out


def quiet(received: dict, seconds: float = 0.7, limit: float = 10.0) -> None:
    """Until nothing arrived for ``seconds`` (bounded): the end of a burst of traffic."""
    deadline = time.monotonic() + limit
    last = sum(received.values())
    still = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = sum(received.values())
        if now != last:
            last, still = now, time.monotonic()
        elif time.monotonic() - still >= seconds:
            return


def catch_up(net: Network, n: int) -> dict:
    branch = net.add("branch", dial=["hq"], env={"ODST_LOG_LEVEL": "warning"})
    t0 = time.monotonic()
    net.start(branch, timeout=120)
    net.register("hq", branch)
    out: dict = {}

    def total() -> int:
        got = net.try_get(branch, "/api/v1/packages?limit=1")
        return got["total"] if got else 0

    net.wait_until(lambda: total() == n, 1800, what="the catalogue at branch", interval=1.0)
    out["catalogue_s"] = time.monotonic() - t0

    last_note = [time.monotonic()]

    def held() -> bool:
        state = net.try_get(branch, "/api/v1/state", timeout=60)
        if not state:
            return False
        count = sum(1 for p in state["packages"] if branch.id in p["available_at"])
        if time.monotonic() - last_note[0] > 60:
            net.say(f"  branch holds {count}/{n} ({time.monotonic() - t0:.0f} s)")
            last_note[0] = time.monotonic()
        return count == n

    net.wait_until(held, 3600, what="every package at branch", interval=5.0)
    out["files_s"] = time.monotonic() - t0
    return out


def timed(*cmd: str) -> tuple[float, str]:
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "odst", *cmd], capture_output=True, text=True, timeout=3600)
    if p.returncode != 0:
        raise RuntimeError(f"odst {' '.join(cmd)} failed ({p.returncode}): {p.stdout[-2000:]}{p.stderr[-2000:]}")
    return time.monotonic() - t0, (p.stdout.strip().splitlines() or [""])[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packages", type=int, default=5000)
    ap.add_argument("--size-kib", type=int, default=8, help="size of each package (default 8 KiB)")
    ap.add_argument("--requests", type=int, default=200, help="list-page requests timed (default 200)")
    ap.add_argument("--renders", type=int, default=5, help="fresh loads of the Packages page (default 5)")
    ap.add_argument("--skip-catch-up", action="store_true", help="no second site")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    args = ap.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"needs {CHROMIUM} (./run test installs it)")
    work = Path(args.work or tempfile.mkdtemp(prefix="odst-bench-catalogue-"))
    shutil.rmtree(work / "sites", ignore_errors=True)  # a previous run's sites
    net = Network(work / "sites", title="catalogue", out=sys.stderr)
    results: dict = {"packages": args.packages, "size_kib": args.size_kib, "cpus": os.cpu_count()}

    def save(key: str, value) -> None:  # each figure as soon as it is measured: a cut run keeps them
        results[key] = value
        net.say(f"  {key}: {json.dumps(value)}")
        (work / "catalogue.json").write_text(json.dumps(results, indent=2))

    try:
        hq = net.add("hq", listen=True, env={"ODST_ADMIN_PASSWORD": PASSWORD, "ODST_LOG_LEVEL": "warning"})
        net.start(hq, timeout=120)
        with net.step(f"upload {args.packages} packages of {args.size_kib} KiB"):
            save("upload_s", upload_all(net, hq, args.packages, args.size_kib * 1024))
        with net.step("list API"):
            save("list", list_api(hq, net.token, args.packages, args.requests))
        with net.step("Packages page in Chromium"):
            save("ui", browser(net, hq, args.renders))
        if not args.skip_catch_up:
            with net.step("a new site catches up"):
                save("catch_up", catch_up(net, args.packages))
        net.stop(*net.sites.values())
        with net.step("odst audit / odst rebuild of hq"):
            for what in ("audit", "rebuild"):
                seconds, says = timed(what, "--data", str(hq.data))
                save(f"{what}_s", seconds)
                save(f"{what}_says", says)
    finally:
        net.close()
    (work / "catalogue.json").write_text(json.dumps(results, indent=2))
    report(results, work)
    return 0


def report(r: dict, work: Path) -> None:
    L, U = r["list"], r["ui"]
    rows = [
        (f"upload {r['packages']} × {r['size_kib']} KiB (4 at a time)", f"{r['upload_s']:.0f} s"),
        ("list API, a page of 100: p50 / p95", f"{L['page_p50_ms']:.1f} / {L['page_p95_ms']:.1f} ms, {L['page_bytes']:,} bytes"),
        ("  every row in one answer (no chunk hashes)", f"{L['all_rows_ms']:.0f} ms, {L['all_rows_bytes']:,} bytes"),
        ("  every row with chunk hashes (the old list)", f"{L['all_rows_with_chunks_ms']:.0f} ms, {L['all_rows_with_chunks_bytes']:,} bytes"),
        ("  search q= (a page)", f"{L['search_ms']:.1f} ms"),
        ("Packages page, navigation → 100 rows drawn", f"{U['render_ms_median']:.0f} ms (median of {len(U['render_ms_all'])})"),
        ("bytes per live update (SSE + row)", f"{U['live_update_bytes_median']:,.0f} bytes"),
    ]
    if "catch_up" in r:
        rows += [("new site: catalogue folded", f"{r['catch_up']['catalogue_s']:.1f} s"),
                 ("new site: every package held", f"{r['catch_up']['files_s']:.1f} s")]
    rows += [("odst audit (hq, stopped)", f"{r['audit_s']:.1f} s"), ("odst rebuild (hq, stopped)", f"{r['rebuild_s']:.1f} s")]
    width = max(len(k) for k, _ in rows)
    print(f"\nODST catalogue bench: {r['packages']} packages, {r['cpus']} CPUs ({work / 'catalogue.json'})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"  one live update: {U['live_update_requests_example']}")


if __name__ == "__main__":
    sys.exit(main())
