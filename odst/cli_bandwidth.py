"""``odst bandwidth …``: link limits and timetables, local networks, download caps, urgent
packages, through the Admin API (/api/v1/bandwidth). ``cli.py`` adds the parser."""

from __future__ import annotations

import argparse
import json
from urllib.parse import quote

from odst.client import Client

MB = 1_000_000


def _rate(bps: int) -> str:
    return "unlimited" if not bps else f"{bps / MB:g} MB/s"


def _show(out: dict) -> None:
    print(f"site {out['site']}, time zone {out['timezone']}, now {out['local_time']}")
    d = out["default"]
    print(f"default (every link without its own): send {_rate(d['send_bps'])}, receive {_rate(d['receive_bps'])}"
          + "".join(f"\n  window {_window(w)}" for w in d["windows"]))
    for link in out["links"]:
        print(f"{link['peer']} {link.get('name') or ''} ({'local, exempt' if link['local'] else link['policy']['source']})")
        for direction in ("send", "receive"):
            x = link[direction]
            print(f"  {direction:<7} {x['state']:<8} limit {_rate(x['limit_bps']):<12} "
                  f"measured {x['measured_bps'] / MB:.2f} MB/s"
                  + (f"  window {_window(x['window'])}" if x["window"] else ""))
    ln = out["local_networks"]
    print(f"local networks ({'exempt' if ln['exempt'] else 'limited like the rest'}): {', '.join(ln['cidrs'])}")
    dl = out["downloads"]
    if dl:
        print(f"Mac downloads: egress {_rate(dl['egress_bps'])}, at once {dl['max_concurrent'] or 'no cap'}, "
              f"per client {dl['per_client'] or 'no cap'}; now {dl['active']}, peak {dl['peak']}, "
              f"refused {dl['refused']}")
    for u in out["urgent"]:
        print(f"urgent: {u['name']} (marked by {u['marked_by']}{': ' + u['reason'] if u['reason'] else ''})")


def _window(w: dict) -> str:
    return (f"{','.join(w['days'])} {w['start']}-{w['end']} "
            + ("paused" if w["paused"] else _rate(w["limit_bps"])))


def cmd_bandwidth(args) -> int:
    c = Client(args.server, args.token)
    what = args.bandwidth_command
    if what == "set":
        body = {"send": args.send, "receive": args.receive, "burst": args.burst, "windows": args.window or [],
                "local": args.local}
        out = c.request("PUT", f"/api/v1/bandwidth/links/{quote(args.link, safe='')}", json=body)
    elif what == "clear":
        out = c.request("DELETE", f"/api/v1/bandwidth/links/{quote(args.link, safe='')}")
    elif what == "local":
        body = {"exempt": not args.no_exempt} | ({"cidrs": args.cidr} if args.cidr else {})
        out = c.request("PUT", "/api/v1/bandwidth/local", json=body)
    elif what == "downloads":
        out = c.request("PUT", "/api/v1/bandwidth/downloads", json={
            "egress": args.egress, "max_concurrent": args.max_concurrent, "per_client": args.per_client})
    elif what == "urgent":
        out = c.request("PUT", f"/api/v1/bandwidth/urgent/{quote(args.name, safe='')}",
                        json={"urgent": not args.off, "reason": args.reason})
    else:
        out = c.request("GET", "/api/v1/bandwidth")
    if getattr(args, "json", False):
        print(json.dumps(out, indent=2, ensure_ascii=False))
    else:
        _show(out)
    return 0


def add_parser(sub, client_flags) -> None:
    p = sub.add_parser("bandwidth", help="replication limits and timetables per link, download caps, urgent packages")
    bw = p.add_subparsers(dest="bandwidth_command", required=True)
    q = bw.add_parser("show", help="per link: the limit in force now, the window state, the measured rate")
    client_flags(q)
    q.add_argument("--json", action="store_true")
    q = bw.add_parser("set", help="limits and weekly timetable of a link (a peer's site id) or of 'default'",
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="rates: bytes per second, 20MB (10^6), 2MiB, 500k, or off\n"
                             "window: 'DAYS HH:MM-HH:MM RATE|paused' in the site's time zone, e.g.\n"
                             "  --window 'mon-fri 08:00-18:00 2MB' --window 'daily 00:00-06:00 off'\n"
                             "the first window that covers the time replaces --send/--receive")
    client_flags(q)
    q.add_argument("link", metavar="PEER|default")
    q.add_argument("--send", default="0", help="what this site sends to the peer (default: unlimited)")
    q.add_argument("--receive", default="0", help="what this site pulls from the peer (default: unlimited)")
    q.add_argument("--burst", default="0", help="bucket size (default: 1/8 s at the rate, at least 1 MiB)")
    q.add_argument("--window", action="append", metavar="'DAYS HH:MM-HH:MM RATE|paused'")
    q.add_argument("--local", choices=["auto", "yes", "no"], default="auto",
                   help="yes: never limited; no: limited even on a local network; auto: by the local networks")
    q.add_argument("--json", action="store_true")
    q = bw.add_parser("clear", help="drop a link's own limits (it follows the default), or the default")
    client_flags(q)
    q.add_argument("link", metavar="PEER|default")
    q.add_argument("--json", action="store_true")
    q = bw.add_parser("local", help="the networks counted local (exempt from limits unless --no-exempt)")
    client_flags(q)
    q.add_argument("--cidr", action="append", help="a network, e.g. 10.0.0.0/8 (repeat; default: private ranges)")
    q.add_argument("--no-exempt", action="store_true", help="limit local links like the others")
    q.add_argument("--json", action="store_true")
    q = bw.add_parser("downloads", help="caps on Mac downloads (beyond them: 503 with Retry-After)")
    client_flags(q)
    q.add_argument("--egress", default="0", help="total bytes per second to Macs (default: no limit)")
    q.add_argument("--max", dest="max_concurrent", type=int, default=0, help="downloads at once (0: no cap)")
    q.add_argument("--per-client", type=int, default=0, help="downloads at once per client address (0: no cap)")
    q.add_argument("--json", action="store_true")
    q = bw.add_parser("urgent", help="mark a package urgent: it crosses paused windows and limits everywhere")
    client_flags(q)
    q.add_argument("name")
    q.add_argument("--off", action="store_true", help="no longer urgent")
    q.add_argument("--reason", default="", help="why (kept in the log with who marked it)")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bandwidth)
