#!/usr/bin/env python3
"""Jamf Pro sync benchmark: time from an upload until Jamf Pro's record is in sync across 3
sites, and the replace window per site.

Starts three real ``odst serve`` sites on 127.0.0.1 through the one harness (hub ``hq``,
spokes ``b`` and ``c``, registered with each other) and the tests' stand-in Jamf Pro server
(``tests/jamf_standin.py``, which validates every request against jamf-pro-sdk's models:
install the test extra). ``hq`` keeps the records. Per run, a package (``--size-mib``,
default 1024, deterministic pseudo-random bytes, a new name per run) is uploaded at ``b`` in
stage ``prod``; the bench measures, from the start of the upload:

* the upload's 201 at b;
* the package available at all three sites (GET /api/v1/state polled every 50 ms);
* the stand-in holding a package record for it with the right SHA-512 (polled every 50 ms),
  i.e. "in sync across 3 sites";
* from the event log: the JamfPackageSynced event's time minus the last site's
  PackageAvailable (how long the record lagged the last site).

Then it REPLACES the package at ``b`` with new content of the same size (PUT ?replace=true)
and measures, from the replace's answer (201):

* per site, until that site serves the new version: a HEAD of its download URL every 50 ms
  answers with the new version's ETag (what a Mac sees; each site serves the old bytes until
  then);
* until Jamf Pro's record holds the new version's SHA-512 (the hash moves after the last
  site swapped: the run fails if a site still served the old version when it moved).

Jamf Pro tokens live ``--token-lifetime`` seconds (default 5); hq gets one just before each
upload, so it has expired long before the sync needs it (a 1 GiB upload and its replication
outlive many tokens, as a 2 GB upload-and-sync outlives a real 60 s token); the run fails if
the sync recorded a failed write or the stand-in saw an invalid request.

Usage (from the repo root):
    .venv/bin/python bench/jamf.py                    # 1 GiB
    .venv/bin/python bench/jamf.py --size-mib 2048    # the issue's 2 GB upload-and-sync
Output: a table on stdout, the story on stderr, everything in ``<work>/jamf.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median  # noqa: E402  (puts the checkout on sys.path)
from harness.network import Network, content_blocks  # noqa: E402
from tests.jamf_standin import CLIENT_ID, CLIENT_SECRET, JamfStandin  # noqa: E402

MIB = 1 << 20


def record_lag(net: Network, name: str, blake3: str | None, problems: list[str]) -> float | None:
    """From hq's log: the JamfPackageSynced of the content (``blake3``; None: the first one) minus
    the last site's report that it serves it (PackageUploaded/Replaced/Available), in seconds."""
    def synced() -> list[dict]:
        history = net.get("hq", f"/api/v1/events?name={quote(name)}&limit=1000")["events"]
        mine = [e for e in history if blake3 is None or e["envelope"]["event"].get("blake3") == blake3]
        return [e for e in mine if e["type"] == "JamfPackageSynced"], mine

    try:  # the record is written before its event is appended: wait for the event
        net.wait_until(lambda: synced()[0], 30, f"the JamfPackageSynced event of {name}")
    except Exception:
        problems.append(f"{name}: no JamfPackageSynced event at hq")
        return None
    events, mine = synced()
    failed = [e for e in events if e["envelope"]["event"]["result"] != "ok"]
    if failed:
        problems.append(f"{name}: {len(failed)} failed writes: {failed[0]['envelope']['event']['detail']}")
    served = max(e["ts"] for e in mine if e["type"] in ("PackageUploaded", "PackageReplaced", "PackageAvailable"))
    return (events[0]["ts"] - served) / 1000


def replace_window(net: Network, standin: JamfStandin, name: str, size: int, problems: list[str]) -> dict:
    """Replace ``name`` at b with new content; the time from the answer until each site serves it
    (HEAD of its download URL) and until Jamf Pro's record holds the new SHA-512."""
    seed = f"{name}:v2"
    sha512 = hashlib.sha512()
    for block in content_blocks(size, seed):
        sha512.update(block)
    want = sha512.hexdigest()
    net.request("hq", "POST", "/api/v1/jamf/check-connection")
    issued = standin.tokens_issued
    t0 = time.monotonic()
    pkg = net.upload("b", name, size, seed=seed, replace=True)
    answered = time.monotonic()
    new_tag = f'"{pkg["blake3"]}"'
    served: dict[str, float] = {}
    moved = None
    url = {s: f"{net[s].url}/CasperShare/Packages/{quote(name)}" for s in ("hq", "b", "c")}
    deadline = answered + 600 + size / (20 * MIB)
    with httpx.Client(timeout=10) as http:

        def poll(s: str) -> None:
            r = http.head(url[s])
            if r.status_code != 200:
                problems.append(f"{name}: HEAD at {s} answered {r.status_code} during the replace")
            elif r.headers.get("etag") == new_tag and s not in served:
                served[s] = time.monotonic() - answered

        while time.monotonic() < deadline and (len(served) < 3 or moved is None):
            for s in ("hq", "b", "c"):
                if s not in served:
                    poll(s)
            record = standin.by_file(name)
            if moved is None and record and record.get("hashValue") == want:
                moved = time.monotonic() - answered
                for s in [s for s in ("hq", "b", "c") if s not in served]:
                    poll(s)  # the hash moved before this HEAD: the site must serve the new version by now
                    if s not in served:
                        problems.append(f"{name}: Jamf Pro's hash moved while {s} still served the old version")
            time.sleep(0.05)
    if moved is None or len(served) < 3:
        problems.append(f"{name}: replace not served everywhere / record not moved within the deadline")
    out = {"replace_upload_s": round(answered - t0, 3),
           "replace_record_moved_s": round(moved, 3) if moved is not None else None,
           "replace_record_after_last_site_s": record_lag(net, name, pkg["blake3"], problems),
           "replace_tokens_issued": standin.tokens_issued - issued}
    for s in ("hq", "b", "c"):
        out[f"replace_served_{s}_s"] = round(served[s], 3) if s in served else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--token-lifetime", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/odst-bench-jamf"))
    args = ap.parse_args()
    size = args.size_mib * MIB
    shutil.rmtree(args.work, ignore_errors=True)
    standin = JamfStandin(token_lifetime=args.token_lifetime).start()
    env = {"ODST_JAMF_URL": standin.url, "ODST_JAMF_CLIENT_ID": CLIENT_ID, "ODST_JAMF_CLIENT_SECRET": CLIENT_SECRET,
           "ODST_JAMF_CHECK_INTERVAL_S": "3600"}
    net = Network(args.work / "sites", title="jamf bench", out=sys.stderr)
    runs, problems = [], []
    try:
        net.hub("hq", ["b", "c"], hq={"env": env})
        net.start()
        net.register("hq", "b")
        net.register("hq", "c")
        for i in range(args.repeats):
            name = f"bench-{i}-{secrets.token_hex(3)}.pkg"
            seed = f"{name}:b"
            sha512 = hashlib.sha512()
            for block in content_blocks(size, seed):
                sha512.update(block)
            want = sha512.hexdigest()
            net.request("hq", "POST", "/api/v1/jamf/check-connection")  # hq holds a token through the upload
            issued = standin.tokens_issued
            t0 = time.monotonic()
            net.upload("b", name, size, stage="prod", seed=seed)
            t_upload = time.monotonic() - t0
            t_all = None
            deadline = t0 + 600 + size / (20 * MIB)
            while time.monotonic() < deadline:
                if t_all is None and all(net.available_at(s, name) for s in ("hq", "b", "c")):
                    t_all = time.monotonic() - t0
                record = standin.by_file(name)
                if record and record.get("hashValue") == want:
                    break
                time.sleep(0.05)
            else:
                problems.append(f"{name}: no record in sync within the deadline")
                continue
            t_record = time.monotonic() - t0
            if t_all is None:
                problems.append(f"{name}: record written before all three sites served the content")
            runs.append({"name": name, "size": size, "upload_s": round(t_upload, 3),
                         "all_sites_s": round(t_all, 3) if t_all else None, "record_in_sync_s": round(t_record, 3),
                         "record_after_last_site_s": record_lag(net, name, None, problems),
                         "tokens_issued": standin.tokens_issued - issued})
            runs[-1].update(replace_window(net, standin, name, size, problems))
            net.say(f"run {i}: {runs[-1]}")
        if standin.errors:
            problems += [f"stand-in: {e}" for e in standin.errors]
    finally:
        net.close()
        standin.stop()
    out = {"size_mib": args.size_mib, "token_lifetime_s": args.token_lifetime, "runs": runs, "problems": problems,
           "median": {k: median([r[k] for r in runs if r.get(k) is not None])
                      for k in ("upload_s", "all_sites_s", "record_in_sync_s", "record_after_last_site_s",
                                "replace_upload_s", "replace_served_hq_s", "replace_served_b_s",
                                "replace_served_c_s", "replace_record_moved_s",
                                "replace_record_after_last_site_s")}}
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "jamf.json").write_text(json.dumps(out, indent=2))
    print(f"Jamf Pro record in sync across 3 sites, then the replace window, {args.size_mib} MiB, tokens of "
          f"{args.token_lifetime:g} s ({len(runs)} run(s), medians; replace_* from the replace's answer):")
    for k, v in out["median"].items():
        print(f"  {k:28} {v if v is not None else '-'} s")
    print(f"  tokens issued per run        {[r['tokens_issued'] for r in runs]}")
    for p in problems:
        print(f"  PROBLEM: {p}")
    return 2 if problems or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
