"""Catch-up benchmark: how long a new site takes to fold a peer's log of N events.

    .venv/bin/python bench/catchup.py [--events 10000] [--limit 600]

Starts site ``hq`` and appends ``--events`` small events (PackageStaged) straight into its log
as hq itself; then a new site ``branch`` dials hq and registers. Measures from the registration
until branch's read model has folded hq's whole chain (or ``--limit`` seconds), printing
progress (folded, the mirror's length, quarantined) every 3 s and one JSON line at the end.
Everything listens on 127.0.0.1; both sites are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from harness.network import Network  # noqa: E402
from harness.site import ADMIN_TOKEN  # noqa: E402
from odst.bus import connect_as_site  # noqa: E402
from odst.events import catalogue as ev  # noqa: E402
from odst.events.log import EventLog  # noqa: E402
from odst.events.signing import SiteKey  # noqa: E402


async def append_many(data: Path, n: int) -> int:
    nc = await connect_as_site(data)
    log = EventLog(nc.jetstream(), SiteKey.load_or_create(data / "site.key"))
    last = None
    for i in range(n):
        last = await log.append(ev.PackageStaged(name=f"p{i}.pkg", stage="test"), actor="bench")
    await nc.close()
    return last.envelope.seq if last else 0


async def mirror_length(data: Path, stream: str) -> int | str:
    nc = await connect_as_site(data)
    try:
        return (await nc.jetstream().stream_info(stream)).state.last_seq
    except Exception as exc:
        return type(exc).__name__
    finally:
        await nc.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--limit", type=float, default=600.0, help="give up after this many seconds")
    ap.add_argument("--work", default=None, help="scratch directory (default: a new temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="odst-bench-catchup-"))
    net = Network(work / "sites", title="catch-up", admin_token=ADMIN_TOKEN, out=sys.stderr)
    try:
        hq = net.add("hq", listen=True, env={"ODST_LOG_LEVEL": "warning"})
        net.start(hq, timeout=120)
        with net.step(f"append {args.events} events to hq's log"):
            last = asyncio.run(append_many(hq.data, args.events))
        hq_id = SiteKey.load_or_create(hq.data / "site.key").site_id
        branch = net.add("branch", dial=["hq"], env={"ODST_LOG_LEVEL": "warning"})
        net.start(branch, timeout=120)
        t0 = time.monotonic()
        net.register("hq", branch)
        db = sqlite3.connect(branch.data / "read-model.sqlite")

        def state() -> tuple[int, int]:
            row = db.execute("SELECT last_seq FROM sites WHERE site=?", (hq_id,)).fetchone()
            return (row[0] if row else 0), db.execute("SELECT count(*) FROM quarantine").fetchone()[0]

        noted = time.monotonic()
        while True:
            folded, quarantined = state()
            if folded >= last or time.monotonic() - t0 > args.limit:
                break
            if time.monotonic() - noted > 3:
                net.say(f"  {folded}/{last} folded, mirror {asyncio.run(mirror_length(branch.data, 'PEER_' + hq_id))},"
                        f" {quarantined} quarantined ({time.monotonic() - t0:.0f} s)")
                noted = time.monotonic()
            time.sleep(0.1)
        print(json.dumps({"events": last, "folded": folded, "quarantined": quarantined,
                          "seconds": round(time.monotonic() - t0, 2)}))
    finally:
        net.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
