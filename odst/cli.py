"""The ``odst`` command: run a site, talk to one, audit and rebuild its log."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from odst import __version__
from odst.bus.identity import write_secret
from odst.client import PAGE_SIZE, Client, ClientError
from odst.config import ConfigError, load, settings_env
from odst.datadir import SiteBusy, key_path
from odst.events.signing import SiteKey
from odst.logs import configure


def _fewer_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread its own malloc arena; 1 MiB chunk buffers freed on many
    threads fragment them (receiver peak RSS 198 MiB measured; 111 MiB with 1-2 arenas,
    same speed). Must run before threads start."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


def _freeze_startup_objects() -> None:
    """Move everything made while starting (modules, the site, the Litestar app) out of the
    cyclic GC's reach: it lives until exit, yet every full collection walked it, and the
    collection at interpreter exit took 0.4-2.7 s of a stop (measured under load; 0.2-0.4 s
    frozen). Objects made later are collected as before."""
    import gc
    gc.freeze()


def _run(coro):
    try:
        import uvloop
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def _site_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="data directory (default ./odst-data; env ODST_DATA)")
    p.add_argument("--config", type=Path, help="TOML settings file (default <data>/odst.toml)")
    p.add_argument("--nats", help="use an existing NATS server at this URL instead of the embedded one")


def _serve_flags(p: argparse.ArgumentParser) -> None:
    _site_flags(p)
    p.add_argument("--http", help="HOST:PORT for the gateway (default 127.0.0.1:8080; env ODST_HTTP)")
    p.add_argument("--nats-listen", help="embedded broker client address HOST:PORT (default 127.0.0.1:-1, any free port)")
    p.add_argument("--site-name", help="a human name for this site")
    p.add_argument("--store", help="package store directory (default <data>/store)")
    p.add_argument("--context", help="distribution point context (default CasperShare)")
    p.add_argument("--public-url", help="URL peers and Macs use to reach this gateway (default http://<http>)")
    p.add_argument("--leaf-listen", help="HOST:PORT: accept NATS leaf-node connections from other sites (a hub)")
    p.add_argument("--leaf-remote", action="append",
                   help="nats-leaf://HOST:PORT of a hub to dial (a spoke; repeatable)")
    p.add_argument("--accept-stage", action="append",
                   help="a stage this site replicates (repeatable; default: every stage)")


def _client_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help="site URL (env ODST_SERVER, default http://127.0.0.1:8080)")
    p.add_argument("--token", help="API token (env ODST_TOKEN)")


def _settings(args, **extra):
    flags = {"data": getattr(args, "data", None), "nats": getattr(args, "nats", None), **extra}
    return load(flags, config_file=getattr(args, "config", None))


def cmd_serve(args, roles=None) -> int:
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after serving, which would kill us before the
        broker and projector are stopped; we stop them in order and exit 0 instead."""

        on_exit = None

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            if self.on_exit:
                self.on_exit()

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    # deferred: only the commands that serve load the site and Litestar (~0.6 s of imports `odst upload` skips)
    from odst.bootstrap import build, gateway_context
    from odst.gateway.app import create_gateway
    from odst.site import ALL_ROLES
    roles = roles or ALL_ROLES
    _fewer_malloc_arenas()

    settings = _settings(args, http=args.http, site_name=args.site_name, store=args.store,
                         context=args.context, nats_listen=args.nats_listen, leaf_listen=args.leaf_listen,
                         leaf_remotes=args.leaf_remote or None, public_url=args.public_url,
                         accept_stages=args.accept_stage or None)
    configure(settings.log_format, settings.log_level)
    if "gateway" in roles:  # a port that is not ours fails here, before the data directory is made
        from odst.gateway import listener
        try:
            listener.check(settings.data, settings.http_host, settings.http_port)
        except (listener.PortTaken, listener.AddressInvalid) as exc:
            print(f"odst: {exc}", file=sys.stderr)
            return 2
    _private_data_dir(settings.data)

    async def main() -> int:
        try:
            site = await build(settings, roles)
        except SiteBusy as exc:
            print(f"odst: {exc}", file=sys.stderr)
            return 2
        if "gateway" not in roles:
            _freeze_startup_objects()
            return await _run_until_signalled(site)
        from odst.gateway.listener import AddressInvalid, PortTaken, listen
        helpers = []
        bound = None
        try:
            bound = listen(settings.data, settings.http_host, settings.http_port)
            sock = bound.socket
            if roles == ALL_ROLES and settings.http_workers > 1:
                helpers = _start_gateway_helpers(settings, site.nats_url, settings.http_workers - 1)
            config = uvicorn.Config(create_gateway(gateway_context(site)), loop="none", http=_http_protocol(settings), ws="none",
                                    lifespan="off", access_log=False, log_config=None,
                                    timeout_keep_alive=settings.http_keepalive_s, timeout_graceful_shutdown=10,
                                    # only a listed proxy may name the client (sign-in limits count per address)
                                    proxy_headers=bool(settings.trusted_proxies),
                                    forwarded_allow_ips=list(settings.trusted_proxies) or None)
            _freeze_startup_objects()
            server = Server(config)
            server.on_exit = site.begin_stop
            print(f"odst: site {site.id} serving on http://{settings.http} (data {settings.data}"
                  f"{f', {settings.http_workers} gateway processes' if helpers else ''})",
                  file=sys.stderr, flush=True)
            await server.serve(sockets=[sock])
            return site.exit_code or (0 if server.started else 1)
        except (PortTaken, AddressInvalid) as exc:
            print(f"odst: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"odst: cannot listen on {settings.http}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        finally:
            _stop_processes(helpers)
            if bound is not None:
                bound.close()
            await site.close()

    return _run(main())


def _http_protocol(settings):
    """HTTP/1.1 for the gateway: uvicorn's httptools protocol (the fastest measured for uploads
    and downloads) with the request head bounded in size and time, which httptools alone is not
    (odst.gateway.protocol says why and how)."""
    import functools

    # deferred: uvicorn and httptools load only for the commands that serve
    from odst.gateway.protocol import GuardedHttpToolsProtocol, HeadLimits
    return functools.partial(GuardedHttpToolsProtocol, limits=HeadLimits(
        max_bytes=settings.http_max_header_bytes, timeout_s=settings.http_header_timeout_s),
        send_timeout_s=settings.send_timeout_s, body_timeout_s=settings.body_timeout_s)


def _private_files() -> None:
    """Whatever umask ODST is started with, what it creates is its user's alone: files 0600,
    directories 0700. The data directory holds the site key, credentials, the log and the read
    model; nats-server and gateway helpers, our children, inherit the umask too."""
    import os
    os.umask(os.umask(0o077) | 0o077)


def _private_data_dir(data: Path) -> None:
    """A data directory made by an older ODST, an installer or systemd's StateDirectory may be
    open to others: close it, and the embedded broker's store, before the site opens them."""
    for d in (Path(data), Path(data) / "nats"):
        try:
            if d.is_dir() and d.stat().st_mode & 0o077:
                d.chmod(0o700)
        except OSError as exc:
            print(f"odst: warning: cannot make {d} private (mode 0700): {exc.strerror or exc}",
                  file=sys.stderr)


def _start_gateway_helpers(settings, nats_url: str, n: int) -> list:
    """`odst serve` with http_workers > 1: more gateway processes on the same port and broker."""
    import os
    import subprocess

    from odst.bus.embedded import _set_pdeathsig

    cmd = [sys.executable, "-m", "odst", "gateway", "--data", str(settings.data), "--nats", nats_url,
           "--http", settings.http]
    # the helpers run with this process's settings (flags included: --site-name, --context, ...)
    env = {**os.environ, **settings_env(settings), "ODST_HTTP_WORKERS": "1"}
    return [subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, preexec_fn=_set_pdeathsig)
            for _ in range(n)]


def _stop_processes(procs: list) -> None:
    import signal
    import subprocess
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()


async def _run_until_signalled(site) -> int:
    """A role without HTTP (projector, replicator): run until SIGINT/SIGTERM, then stop in order."""
    import signal
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"odst: site {site.id} running {'+'.join(sorted(site.roles))} (data {site.settings.data})",
          file=sys.stderr, flush=True)
    try:
        site.on_fatal = stop.set
        await stop.wait()
        return site.exit_code
    finally:
        await site.close()


def cmd_role(args) -> int:
    return cmd_serve(args, roles=frozenset({args.command}))


def cmd_site_id(args) -> int:
    settings = _settings(args)
    print(SiteKey.load_or_create(key_path(settings.data)).site_id)
    return 0


def cmd_nats_config(args) -> int:
    from odst.bus.external import NatsConfigError, write_nats_config  # deferred: it imports nats
    try:
        written = write_nats_config(_settings(args), Path(args.out), args.route or [])
    except NatsConfigError as exc:
        print(f"odst: {exc}", file=sys.stderr)
        return 2
    print(f"site {written.site}: {written.users} NATS users; wrote " + ", ".join(str(f) for f in written.files))
    return 0


def cmd_upload(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"odst: {path} is not a file", file=sys.stderr)
        return 2
    pkg, new = Client(args.server, args.token).upload(path, args.name or path.name, args.stage,
                                                      progress=not args.quiet, replace=args.replace)
    out = {k: pkg[k] for k in ("name", "size", "sha1", "sha512", "stage")}
    out["result"] = "uploaded" if new else "identical"  # identical: these bytes were already there
    print(json.dumps(out, indent=2, ensure_ascii=False))
    print(f"odst: {pkg['name']}: " + ("new content uploaded" if new else
                                      "identical to the content already stored under this name; nothing changed"),
          file=sys.stderr)
    return 0


def _site_names(c: Client) -> dict[str, str]:
    """Site id -> the site's name, for this site and its peers (a site without a name keeps its id)."""
    me = c.request("GET", "/api/v1/site")
    names = {me["site"]: me.get("name") or ""}
    for p in c.request("GET", "/api/v1/peers")["peers"]:
        names.setdefault(p["site"], p.get("name") or "")
    return names


def _site_label(names: dict[str, str], site: str) -> str:
    return names.get(site) or site


def _table(headers: list[str], rows: list[list]) -> None:
    """Tab-separated rows under a header line: columns for people, `cut -f` for scripts."""
    print("\t".join(headers))
    for row in rows:
        print("\t".join(str(x) for x in row))


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def cmd_packages(args) -> int:
    c = Client(args.server, args.token)
    packages, total = c.packages(limit=args.limit, page_size=args.page_size)
    out = {"packages": packages, "count": len(packages), "total": total, "offset": 0}
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    names = _site_names(c) if out["packages"] else {}
    cols = ["NAME", "SIZE", "STAGE", "SHA1"] + (["SHA512"] if args.sha512 else []) + ["AVAILABLE AT"]
    rows = []
    for p in out["packages"]:
        sites = ",".join(_site_label(names, s) for s, a in p["availability"].items() if a["status"] == "available")
        rows.append([p["name"], p["size"], p["stage"], p["sha1"]] + ([p["sha512"]] if args.sha512 else [])
                    + [sites or "-"])
    if not rows:
        print("no packages", file=sys.stderr)
        return 0
    _table(cols, rows)
    if len(rows) < total:
        print(f"showing {len(rows)} of {total} packages", file=sys.stderr)
    return 0


def cmd_package(args) -> int:
    """One package in full: the hashes Jamf asks for (SHA-512, MD5 is not kept), stage and copies."""
    from urllib.parse import quote

    c = Client(args.server, args.token)
    p = c.request("GET", f"/api/v1/packages/{quote(args.name, safe='')}")
    if args.json:
        print(json.dumps(p, indent=2, ensure_ascii=False))
        return 0
    names = _site_names(c)
    uploaded = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(p["uploaded_at"] / 1000)) if p.get("uploaded_at") else "-"
    for label, value in (("name", p["name"]), ("stage", p["stage"]), ("size", f"{p['size']} bytes"),
                         ("sha512", p["sha512"]), ("sha1", p["sha1"]), ("blake3", p["blake3"]),
                         ("chunks", len(p.get("chunks") or [])), ("uploaded", uploaded),
                         ("uploaded by", p.get("uploaded_by") or "-")):
        print(f"{label + ':':<13}{value}")
    print("copies:")
    for site, a in p["availability"].items():
        extra = f" ({a['detail']})" if a.get("detail") else ""
        print(f"  {_site_label(names, site)}\t{a['status']}{extra}")
    if not p["availability"]:
        print("  none yet")
    return 0


def cmd_delete(args) -> int:
    from urllib.parse import quote

    print(json.dumps(Client(args.server, args.token).request(
        "DELETE", f"/api/v1/packages/{quote(args.name, safe='')}"), ensure_ascii=False))
    return 0


def cmd_stage(args) -> int:
    from urllib.parse import quote

    out = Client(args.server, args.token).request(
        "PATCH", f"/api/v1/packages/{quote(args.name, safe='')}", json={"stage": args.stage})
    print(f"{out['name']}: stage {out['stage']}")
    return 0


def cmd_jamf(args) -> int:
    """odst jamf …: the running site does the work with its Jamf Pro credentials (admin token)."""
    client = Client(args.server, args.token)
    if args.jamf_cmd == "check-connection":
        out = client.request("POST", "/api/v1/jamf/check-connection")
        print(f"Jamf Pro {out.get('version') or '(version unknown)'} at {out['url']}: connected ({out['auth']})")
    elif args.jamf_cmd == "register-dp":
        out = client.request("POST", "/api/v1/jamf/distribution-points",
                             json={"all_sites": args.all_sites, "failover": args.failover or ""})
        for dp in out["distribution_points"]:
            print(f"{dp['action']:8} {dp['name']} (id {dp['record_id']}, {dp['api']} API): {dp['url']}")
    elif args.jamf_cmd == "sync":
        out = client.request("POST", "/api/v1/jamf/sync", json={"dry_run": not args.apply})
        for a in out["actions"]:
            verb = ("would " if out["dry_run"] and a["action"] != "failed" else "") + a["action"]
            print(f"{verb:16} {a['name']}" + (f" (record {a['record_id']})" if a.get("record_id") else "")
                  + (f" {a['hash_type']} {a['hash_value'][:16]}…" if a.get("hash_value") else "")
                  + (f": {a['detail']}" if a.get("detail") else ""))
        if not out["actions"]:
            print("nothing to do: every record is in sync")
    elif args.jamf_cmd == "check":
        out = client.request("POST", "/api/v1/jamf/check")
        for p in out["packages"]:
            extra = f" (expected {p['expected'][:16]}…, Jamf Pro has {p['found'][:16] or '-'})" \
                if p["state"] == "hash_differs" else (f": {p['detail']}" if p.get("detail") else "")
            print(f"{p['state']:13} {p['name']}" + (f" record {p['record_id']}" if p.get("record_id") else "") + extra)
        print(f"{out['drift']} of {len(out['packages'])} packages drift from Jamf Pro")
        return 1 if out["drift"] else 0
    return 0


def cmd_peer(args) -> int:
    from urllib.parse import quote

    c = Client(args.server, args.token)
    if args.peer_command == "invite":
        out = c.request("POST", "/api/v1/peers/invites", json={"ttl_s": args.ttl})
        print(f"invitation {out['invite_id']}, valid until "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(out['expires_ts'] / 1000))}; "
              "on the other site run: odst peer join <token>", file=sys.stderr)
        print(out["token"])
    elif args.peer_command == "join":
        out = c.request("POST", "/api/v1/peers/join", json={"token": args.invite})
        print(f"registered with site {out['site']} {out.get('name') or ''} (via {out['via']})")
    elif args.peer_command == "remove":
        out = c.request("DELETE", f"/api/v1/peers/{quote(args.site, safe='')}")
        print(f"removed {out['removed']}; its events after seq {out['upto_seq']} are ignored here")
    else:
        out = c.request("GET", "/api/v1/peers")
        if args.json:
            print(json.dumps(out, indent=2, ensure_ascii=False))
            return 0
        if not out["peers"]:
            print("no peers: this site shares packages with no other site yet "
                  "(odst peer invite here, then odst peer join <token> on the other site)")
        for p in out["peers"]:
            link = p["link"]
            print(f"{p['site']}\t{p['name'] or '-'}\t{link.get('link')}\tlag={link.get('lag')}\t"
                  f"{'registered here' if p['registered_here'] else 'via ' + ','.join(p['vouched_by'])}\t"
                  f"{p['http_url']}")
    return 0


def _new_password(args) -> str:
    """The new password: $ODST_NEW_PASSWORD (scripts), else asked twice at the terminal."""
    import getpass
    import os

    given = os.environ.get("ODST_NEW_PASSWORD", "")
    if given:
        return given
    if not sys.stdin.isatty():
        raise ClientError("no terminal to ask for the password: set ODST_NEW_PASSWORD")
    first = getpass.getpass(f"new password for {args.username}: ")
    if first != getpass.getpass("again: "):
        raise ClientError("the two passwords differ")
    return first


def cmd_user(args) -> int:
    from urllib.parse import quote

    c = Client(args.server, args.token)
    path = f"/api/v1/users/{quote(getattr(args, 'username', '') or '', safe='')}"
    if args.user_command == "add":
        out = c.request("POST", "/api/v1/users", json={
            "username": args.username, "role": args.role, "display_name": args.display_name,
            "password": _new_password(args)})
        print(f"user {out['username']} ({out['role']}) created")
    elif args.user_command == "passwd":
        c.request("PATCH", path, json={"password": _new_password(args)})
        print(f"password of {args.username} changed; their sessions ended")
    elif args.user_command == "role":
        out = c.request("PATCH", path, json={"role": args.role})
        print(f"{out['username']} is now {out['role']}")
    elif args.user_command == "remove":
        c.request("DELETE", path)
        print(f"user {args.username} removed")
    else:
        for u in c.request("GET", "/api/v1/users")["users"]:
            print(f"{u['username']}\t{u['role']}\t{u['display_name'] or '-'}\tcreated by {u['created_by']}")
    return 0


def _how_to_subscribe(out: dict, seed_file: Path) -> str:
    """How a downstream service connects with a new subscriber credential."""
    url, site, name, inbox = ",".join(out["servers"]), out["site"], out["name"], out["inbox_prefix"]
    return "\n".join([
        f"broker: {url}   (site {site}; this site's events are odst.{site}.ev.>)",
        f"replies and push deliveries come only under its own inbox prefix {inbox}: connect with it",
        "nats-py:",
        f"    nc = await nats.connect({out['servers'][0]!r}, nkeys_seed={str(seed_file)!r}, inbox_prefix={inbox!r})",
        f"    sub = await nc.subscribe('odst.{site}.ev.>')                      # live events",
        "    js = nc.jetstream()",
        f"    # the whole log, resumable: a durable pull consumer, which must be named {name!r}",
        f"    log = await js.pull_subscribe('odst.*.ev.>', durable={name!r}, stream='EVENTS')",
        "    msgs = await log.fetch(100)                                   # then m.ack() each",
        "NATS CLI:",
        f"    nats --server {url} --nkey {seed_file} --inbox-prefix {inbox} sub 'odst.{site}.ev.>'",
        f"    nats --server {url} --nkey {seed_file} --inbox-prefix {inbox} consumer add EVENTS {name} "
        "--pull --filter 'odst.*.ev.>' --deliver all --ack explicit --defaults",
        f"    nats --server {url} --nkey {seed_file} --inbox-prefix {inbox} consumer next EVENTS {name} --count 10",
        f"may: {'; '.join(out['may'].values())}",
        "nothing else: no publishing, no stream or KV changes, no other consumers.",
    ])


def cmd_credentials(args) -> int:
    from urllib.parse import quote

    c = Client(args.server, args.token)
    if args.credentials_command == "add":
        out_path = Path(args.out or f"{args.name}.nk")
        if out_path.exists():
            raise ClientError(f"{out_path} exists; remove it or pass --out FILE")
        out = c.request("POST", "/api/v1/credentials", json={"name": args.name, "role": args.role})
        try:
            write_secret(out_path, out["seed"] + "\n")
        except OSError as exc:  # a seed nobody holds is no use: take the credential back
            c.request("DELETE", f"/api/v1/credentials/{quote(out['credential_id'], safe='')}")
            raise ClientError(f"cannot write {out_path} ({exc.strerror}); the credential was revoked again, "
                              "nothing is left behind") from None
        print(f"credential {out['credential_id']} {out['name']!r} ({out['role']}) created; its seed is in "
              f"{out_path} (mode 0600), shown this once: keep it like a password")
        print(_how_to_subscribe(out, out_path))
    elif args.credentials_command == "revoke":
        active = [x for x in c.request("GET", "/api/v1/credentials")["credentials"] if x["revoked_at"] is None]
        match = ([x for x in active if x["credential_id"] == args.credential]
                 or [x for x in active if x["name"].lower() == args.credential.lower()])
        if not match:
            raise ClientError(f"no active credential with id or name {args.credential!r}")
        c.request("DELETE", f"/api/v1/credentials/{quote(match[0]['credential_id'], safe='')}")
        print(f"credential {match[0]['credential_id']} {match[0]['name']!r} revoked; "
              "the broker refuses its seed from now on")
    else:
        out = c.request("GET", "/api/v1/credentials")
        if args.json:
            print(json.dumps(out, indent=2))
            return 0
        for x in out["credentials"]:
            created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(x["created_at"] / 1000))
            state = "active" if x["revoked_at"] is None else "revoked"
            print(f"{x['credential_id']}\t{x['name']}\t{x['role']}\t{state}\t{created}\t{x['created_by']}")
    return 0


def cmd_state(args) -> int:
    c = Client(args.server, args.token)
    out = c.request("GET", "/api/v1/state")
    if args.json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    names = _site_names(c)
    own = names.get(out["site"])
    print(f"site {own + ' (' + out['site'] + ')' if own else out['site']}  digest {out['digest']}")
    for p in out["packages"]:
        print(f"  {p['name']}\t{p['stage']}\t{','.join(_site_label(names, s) for s in p['available_at']) or '-'}")
    if not out["packages"]:
        print("  no packages")
    for t in out["transfers"]:
        print(f"  transfer {t['name']}: {t['status']} {t['chunks_done']}/{t['chunks_total']} {t['detail']}")
    return 0


def cmd_verify(args) -> int:
    out = Client(args.server, args.token).request("POST", "/api/v1/verify",
                                                  params={"repair": "false" if args.no_repair else "true"})
    print(f"checked {out['checked']}, ok {out['ok']}")
    for key in ("damaged", "missing", "repairing", "unrepairable"):
        if out[key]:
            print(f"{key}: {', '.join(out[key])}")
    return 1 if out["damaged"] or out["missing"] else 0


def cmd_scenario(args) -> int:
    """Run the scenario runner of the checkout this odst comes from (``harness/``, beside ``odst/``);
    an installed wheel has no harness, so say so and exit 2."""
    from pathlib import Path
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "harness" / "__init__.py").is_file() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from harness.runner import main as scenario_main
    except ImportError as exc:
        print(f"odst scenario: the scenario harness is not installed ({exc}); it is part of a checkout of "
              "the ODST repository, not of the odst package: run it from a clone "
              "(./run scenario list)", file=sys.stderr)
        return 2
    return scenario_main(args.scenario_args)


def cmd_audit(args) -> int:
    from odst.audit import run_audit  # deferred, as the site is: it imports the whole of bootstrap
    report = _run(run_audit(_settings(args)))
    print(report.summary())
    return 1 if report.violations else 0


def cmd_rebuild(args) -> int:
    from odst.audit import RebuildRefused, run_rebuild
    notes: list[str] = []
    try:
        n = _run(run_rebuild(_settings(args), force=args.force, notes=notes))
    except RebuildRefused as exc:
        print(f"odst: rebuild refused: {exc}", file=sys.stderr)
        return 1
    for note in notes:
        print(f"odst: {note}", file=sys.stderr)
    print(f"read model rebuilt from the log: {n} events")
    return 0


def cmd_recover(args) -> int:
    from odst.recovery import RecoveryRefused, recover
    try:
        report = _run(recover(_settings(args), args.sources, force=args.force))
    except RecoveryRefused as exc:
        print(f"odst: recovery refused: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odst", description=__doc__)
    parser.add_argument("--version", action="version", version=f"odst {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run a complete site (embedded NATS, projector, gateway, replicator)")
    _serve_flags(p)
    p.set_defaults(func=cmd_serve)

    for role, text in (("projector", "fold the event log into the read model (one per data directory)"),
                       ("gateway", "serve the Admin API and downloads from the read model (several may run)"),
                       ("replicator", "pull packages from peers (several may run; they share the work)")):
        p = sub.add_parser(role, help=f"run one role against a shared NATS (--nats): {text}")
        _serve_flags(p)
        p.set_defaults(func=cmd_role)

    p = sub.add_parser("site-id", help="print this data directory's site id (creates the key if needed); "
                                       "an external NATS needs it as its JetStream domain")
    _site_flags(p)
    p.set_defaults(func=cmd_site_id)

    p = sub.add_parser("nats-config", help="write the files a NATS server ODST does not run includes (site id, "
                                           "users, leaf identity, route credential; deploy/nats/*.conf)")
    _site_flags(p)
    p.add_argument("--out", required=True, help="directory the NATS config includes them from, e.g. /etc/nats/site")
    p.add_argument("--route", action="append", metavar="URL",
                   help="a cluster node's route URL nats-route://HOST:6222 (repeatable: every node, itself "
                        "included): writes cluster.conf with the route credential")
    p.set_defaults(func=cmd_nats_config)

    p = sub.add_parser("upload", help="upload a package to a running site, with progress")
    _client_flags(p)
    p.add_argument("file")
    p.add_argument("--name", help="package name (default: the file's name)")
    p.add_argument("--stage", help="stage of the package (default: the site's default_stage)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--replace", action="store_true",
                   help="replace the package of that name with this content (every site keeps serving "
                        "the old one until it holds the new one; default stage: the package's)")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("packages", help="list the packages of a running site")
    _client_flags(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--sha512", action="store_true", help="add a SHA512 column (the checksum Jamf Pro records)")
    p.add_argument("--limit", type=_positive_int, default=None,
                   help="show the first N packages (by name) and say how many there are; default: all")
    p.add_argument("--page-size", type=_positive_int, default=PAGE_SIZE, help=argparse.SUPPRESS)  # tests
    p.set_defaults(func=cmd_packages)

    p = sub.add_parser("package", help="one package in full: size, SHA-512 and other hashes, stage, copies")
    _client_flags(p)
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_package)

    p = sub.add_parser("delete", help="delete a package (its history stays in the log)")
    _client_flags(p)
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("stage", help="change a package's stage")
    _client_flags(p)
    p.add_argument("name")
    p.add_argument("stage")
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("peer", help="register sites with each other")
    peer = p.add_subparsers(dest="peer_command", required=True)
    q = peer.add_parser("invite", help="print a one-time invitation token (last line)")
    _client_flags(q)
    q.add_argument("--ttl", type=int, default=24 * 3600, help="seconds the invitation stays valid")
    q = peer.add_parser("join", help="register this site with the site that made the invitation")
    _client_flags(q)
    q.add_argument("invite")
    q = peer.add_parser("list", help="peers and their link state")
    _client_flags(q)
    q.add_argument("--json", action="store_true")
    q = peer.add_parser("remove", help="stop trusting a peer")
    _client_flags(q)
    q.add_argument("site")
    p.set_defaults(func=cmd_peer)

    p = sub.add_parser("jamf", help="Jamf Pro: connection, distribution point records, package records, drift")
    _client_flags(p)
    jamf = p.add_subparsers(dest="jamf_cmd", required=True)
    jamf.add_parser("check-connection", help="get a token and Jamf Pro's version with the site's settings")
    q = jamf.add_parser("register-dp", help="create or update the site's Jamf Pro distribution point record")
    q.add_argument("--all-sites", action="store_true", help="every site of the network, not only this one")
    q.add_argument("--failover", metavar="SITE", help="the site (name or id) Macs fail over to")
    q = jamf.add_parser("sync", help="show what the package record sync would change (--apply: do it now)")
    q.add_argument("--apply", action="store_true", help="write the records now instead of a dry run")
    jamf.add_parser("check", help="compare Jamf Pro's package records with ODST (exit 1 on drift)")
    p.set_defaults(func=cmd_jamf)

    p = sub.add_parser("user", help="local users of the web UI (admin token)")
    user = p.add_subparsers(dest="user_command", required=True)
    q = user.add_parser("add", help="create a user (password from $ODST_NEW_PASSWORD or asked twice)")
    _client_flags(q)
    q.add_argument("username")
    q.add_argument("--role", choices=["admin", "operator", "auditor"], default="operator")
    q.add_argument("--display-name", default="")
    q = user.add_parser("passwd", help="set a user's password (ends their sessions)")
    _client_flags(q)
    q.add_argument("username")
    q = user.add_parser("role", help="change a user's role")
    _client_flags(q)
    q.add_argument("username")
    q.add_argument("role", choices=["admin", "operator", "auditor"])
    q = user.add_parser("remove", help="remove a user (ends their sessions)")
    _client_flags(q)
    q.add_argument("username")
    q = user.add_parser("list", help="list users")
    _client_flags(q)
    p.set_defaults(func=cmd_user)

    p = sub.add_parser("credentials", help="NATS credentials for services that read the event log (admin token)")
    cred = p.add_subparsers(dest="credentials_command", required=True)
    q = cred.add_parser("add", help="create one; its seed is written to a 0600 file, shown this once")
    _client_flags(q)
    q.add_argument("--role", choices=["subscriber"], required=True,
                   help="subscriber: read-only (event subjects, event streams through its own consumer)")
    q.add_argument("name", help="letters, digits, '_' and '-' (also the name of its durable consumer)")
    q.add_argument("--out", help="seed file to write (default ./NAME.nk); never overwritten")
    q = cred.add_parser("list", help="list credentials, revoked ones too")
    _client_flags(q)
    q.add_argument("--json", action="store_true")
    q = cred.add_parser("revoke", help="revoke a credential by id or name: its seed is refused from then on")
    _client_flags(q)
    q.add_argument("credential", metavar="ID|NAME")
    p.set_defaults(func=cmd_credentials)

    p = sub.add_parser("state", help="replicated state, its digest, and transfers in progress")
    _client_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_state)

    p = sub.add_parser("verify", help="re-hash stored packages; repair damaged ones from peers")
    _client_flags(p)
    p.add_argument("--no-repair", action="store_true", help="only report")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("scenario", help="run multi-site stories from scenarios/ (odst scenario run scenarios/NAME)",
                       add_help=False)
    p.add_argument("scenario_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_scenario)

    p = sub.add_parser("audit", help="verify the whole log and compare a rebuild with the read model")
    _site_flags(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("rebuild", help="replace the read model with one rebuilt from the log (site stopped)")
    _site_flags(p)
    p.add_argument("--force", action="store_true",
                   help="rebuild even from a log shorter than the read model (what is lost is listed)")
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("recover", help="restore this site's own log from a peer's mirror of it, verified, then "
                                       "rebuild (site stopped; the data directory needs only site.key)")
    _site_flags(p)
    p.add_argument("--from", dest="sources", action="append", required=True, metavar="URL",
                   help="a registered peer's HTTP base URL, e.g. http://peer:8080 (repeatable: the longest "
                        "verified copy wins, and copies that disagree stop the recovery)")
    p.add_argument("--force", action="store_true",
                   help="replace a local log that is not a prefix of the peer's copy (saved to <data>/run first), "
                        "or accept a copy shorter than what the read model had seen")
    p.set_defaults(func=cmd_recover)

    from odst import cli_bandwidth
    cli_bandwidth.add_parser(sub, _client_flags)  # odst bandwidth ...
    return parser


def _audit_errors() -> tuple[type[Exception], ...]:
    """odst.audit's AuditError, if a command loaded it (it can be raised only then)."""
    audit = sys.modules.get("odst.audit")
    return (audit.AuditError,) if audit else ()


def main(argv: list[str] | None = None) -> int:
    _private_files()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "func", None) is cmd_scenario:  # its own parser reads its flags, --help included
        args.scenario_args = unknown + args.scenario_args
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "server") and args.server is None:
        import os
        args.server = os.environ.get("ODST_SERVER", "http://127.0.0.1:8080")
    try:
        return args.func(args) or 0
    except (ConfigError, ClientError, *_audit_errors()) as exc:
        print(f"odst: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
