"""The deployment files (Dockerfile, compose files, NATS and nginx configs, systemd unit) hold
together, checked without a Docker engine: every service can start, every ``odst`` command
they run parses with the CLI, every variable they set is a setting, the NATS configs start a
server with the JetStream domain and leaf link ODST needs, and nginx serves the directory
where the store publishes packages."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
import pytest
import yaml

import nats
import nats.errors

from odst.bus import authorization as authz
from odst.bus.embedded import nats_server_binary
from odst.bus.external import render_auth, write_include, write_nats_config
from odst.bus.identity import client_seed_path, new_user_seed, public_key_of_seed, read_seed
from odst.bus.system import SYSTEM_ACCOUNT, SYSTEM_SEED_FILE, reload_servers
from odst.events.signing import SiteKey
from odst.cli import build_parser
from odst.config import Settings, load
from odst.naming import name_key
from odst.store.files import Store
from tests.conftest import free_port, run_odst, wait_until

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = ["compose.yaml", "compose.multisite.yaml"]
NATS_CONFS = sorted((DEPLOY / "nats").glob("*.conf"))

SETTING_VARS = {f"ODST_{f.name.upper()}" for f in fields(Settings)}
# Read from the environment by ODST, but not Settings (bootstrap token; the CLI client's).
EXTRA_ODST_VARS = {"ODST_ADMIN_TOKEN", "ODST_TOKEN", "ODST_SERVER", "ODST_ADMIN_PASSWORD", "ODST_NEW_PASSWORD"}
# Read by compose.yaml only (substituted into the compose file, never passed to odst).
COMPOSE_ONLY_VARS = {"ODST_IMAGE", "ODST_PORT", "ODST_NGINX_PORT"}
LONG_RUNNING_ROLES = {"serve", "gateway", "projector", "replicator"}
HARDENING = {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "ProtectHome": "yes",
             "PrivateTmp": "yes", "PrivateDevices": "yes"}
SITE_ID = "sabcdefghij234567"  # the shape odst.events.signing.site_id_for gives


# ---- reading the files ----------------------------------------------------------------------

def compose(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def compose_services() -> list[tuple[str, str, dict]]:
    return [(f, name, svc) for f in COMPOSE_FILES for name, svc in compose(f)["services"].items()]


def is_odst_service(svc: dict) -> bool:
    return "build" in svc or str(svc.get("image", "")).startswith("${ODST_IMAGE")


def volume_mounts(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume entry."""
    out = []
    for v in svc.get("volumes", []):
        parts = v.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        if instr.upper() == "FROM":
            stages.append([])
        if stages:  # instructions before the first FROM (global ARGs): dockerfile_base_image
            stages[-1].append((instr.upper(), rest.strip()))
    return stages


def dockerfile_base_image() -> str:
    """The default of the BASE_IMAGE build argument every stage starts FROM."""
    return re.search(r"^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)


def dockerfile_cmd() -> list[str]:
    return json.loads(next(a for i, a in dockerfile_stages()[-1] if i == "CMD"))


def odst_invocations(svc: dict) -> list[list[str]]:
    """The odst argv(s) a service of the ODST image runs (its entrypoint is `odst`), or the
    `odst ...` calls inside a shell entrypoint."""
    entrypoint, command = svc.get("entrypoint"), svc.get("command")
    if entrypoint is None:
        return [list(command) if command else dockerfile_cmd()]
    script = " ".join(command) if isinstance(command, list) else str(command)
    script = script.replace("$$", "$")
    return [shlex.split(m) for m in re.findall(r"\bodst\s+([^);&|>]+)", script)]


def parse_odst(argv: list[str]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`odst {shlex.join(argv)}` does not parse with odst's CLI:\n{err.getvalue()}")


def interpolated_vars(text: str) -> set[str]:
    text = text.replace("$$", "")
    return set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# ---- compose files ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_service_has_an_image_or_build_and_a_restart_policy(name):
    services = compose(name)["services"]
    assert services
    for svc_name, svc in services.items():
        assert "image" in svc or "build" in svc, f"{name}: {svc_name} has neither image nor build"
        if "build" in svc:
            context = svc["build"] if isinstance(svc["build"], str) else svc["build"]["context"]
            assert (ROOT / context / "Dockerfile").is_file()
        assert svc.get("restart") in ("no", "always", "unless-stopped", "on-failure"), \
            f"{name}: {svc_name} has no restart policy"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_volumes_are_declared_and_bind_mounts_exist(name):
    doc = compose(name)
    declared = set(doc.get("volumes") or {})
    used = set()
    for svc_name, svc in doc["services"].items():
        for source, target, _ in volume_mounts(svc):
            assert target.startswith("/"), f"{svc_name}: mount target {target!r} is not absolute"
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: {svc_name} mounts missing {source}"
            else:
                assert source in declared, f"{name}: volume {source} of {svc_name} not declared"
                used.add(source)
    assert declared == used, f"{name}: declared but unused volumes {declared - used}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_depends_on_targets_exist_and_can_satisfy_their_condition(name):
    services = compose(name)["services"]
    for svc_name, svc in services.items():
        for dep, how in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{svc_name} depends on unknown service {dep}"
            target = services[dep]
            condition = how.get("condition", "service_started")
            if condition == "service_healthy":
                hc = target.get("healthcheck", {})
                assert not hc.get("disable"), f"{svc_name} waits for {dep} to be healthy, which has no check"
                assert hc.get("test") or is_odst_service(target)  # else the Dockerfile HEALTHCHECK
            if condition == "service_completed_successfully":
                assert target.get("restart") == "no", f"{dep} is a one-shot: restart must be 'no'"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_long_running_services_have_a_healthcheck_or_say_why_not(name):
    for svc_name, svc in compose(name)["services"].items():
        if svc.get("restart") == "no":
            continue
        hc = svc.get("healthcheck")
        if is_odst_service(svc) and hc is None:
            continue  # the image's HEALTHCHECK
        assert hc, f"{name}: {svc_name} has no healthcheck"
        assert hc.get("disable") is True or hc.get("test"), f"{name}: {svc_name}: empty healthcheck"


@pytest.mark.parametrize("file,service", [(f, n) for f, n, s in compose_services() if is_odst_service(s)])
def test_odst_commands_in_compose_parse_with_the_cli(file, service):
    svc = compose(file)["services"][service]
    invocations = odst_invocations(svc)
    assert invocations, f"{file}: {service} runs no odst command"
    mounts = {target: source for source, target, _ in volume_mounts(svc)}
    services = compose(file)["services"]
    for argv in invocations:
        args = parse_odst(argv)
        if getattr(args, "data", None):
            assert args.data in mounts, f"{service}: --data {args.data} is not a mounted volume"
        if getattr(args, "nats", None):
            m = re.fullmatch(r"nats://([\w.-]+):4222", args.nats)
            assert m and m.group(1) in services, f"{service}: --nats {args.nats} is not a service here"
            assert m.group(1) in (svc.get("depends_on") or {}), f"{service} must wait for {m.group(1)}"
        if argv[0] in LONG_RUNNING_ROLES:
            assert svc.get("restart") in ("always", "unless-stopped", "on-failure")
        if getattr(args, "http", None):
            port = args.http.rsplit(":", 1)[1]
            assert args.http.startswith("0.0.0.0:"), "in a container the gateway must listen on all interfaces"
            published = [p.rsplit(":", 1)[1] for p in svc.get("ports", [])]
            assert port in published, f"{service}: gateway port {port} not published"
            test = " ".join(svc.get("healthcheck", {}).get("test", [])) or \
                next(a for i, a in dockerfile_stages()[-1] if i == "HEALTHCHECK")
            assert f"127.0.0.1:{port}/healthz" in test


def test_compose_roles_share_one_data_volume_and_one_nats():
    services = compose("compose.yaml")["services"]
    roles = {argv[0]: name for name, svc in services.items() if is_odst_service(svc)
             for argv in odst_invocations(svc)}
    assert {"projector", "gateway", "replicator"} <= set(roles)
    for role, name in roles.items():
        if role in LONG_RUNNING_ROLES:
            # the projector also keeps NATS's users (auth.conf in the nats-site volume) current
            extra = [("nats-site", "/etc/nats/site", False)] if role == "projector" else []
            assert volume_mounts(services[name]) == [("odst-data", "/data", False)] + extra, name
    assert services["replicator"]["deploy"]["replicas"] >= 2


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_site_id_and_users_reach_nats_through_a_shared_volume(name):
    """The one-shot site-id service runs `odst nats-config` into the volume the NATS service
    includes site.conf and auth.conf from; the one service running the projector role may
    rewrite auth.conf there (nats_auth_file), and nothing else writes to it."""
    services = compose(name)["services"]
    nats_services = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("nats:")}
    assert nats_services
    for nats_name, nats_svc in nats_services.items():
        mounts = {target: (source, ro) for source, target, ro in volume_mounts(nats_svc)}
        conf_source, _ = mounts["/etc/nats/nats.conf"]
        conf = (ROOT / conf_source).read_text()
        for include in ("site/site.conf", "site/auth.conf"):
            assert re.search(rf'^include "{include}"', conf, re.M), f"{conf_source} does not include {include}"
        assert "--config" in nats_svc["command"] and "/etc/nats/nats.conf" in nats_svc["command"]
        site_volume, ro = mounts["/etc/nats/site"]
        assert ro
        writers = {n: s for n, s in services.items() if (site_volume, "/etc/nats/site", False) in volume_mounts(s)}
        (one_shot,) = [n for n, s in writers.items() if s.get("restart") == "no"]
        assert nats_svc["depends_on"][one_shot]["condition"] == "service_completed_successfully"
        script = " ".join(writers[one_shot]["command"])
        assert "odst nats-config --data /data --out /etc/nats/site" in script
        data_volume = next(s for s, t, _ in volume_mounts(writers[one_shot]) if t == "/data")
        users = [n for n, s in services.items() if is_odst_service(s) and s.get("restart") != "no"
                 and any(f"nats://{nats_name}:4222" in a for argv in odst_invocations(s) for a in argv)]
        assert users
        for n in users:  # the site's roles connect with <data>/nats-client.nk from the same volume
            assert (data_volume, "/data", False) in volume_mounts(services[n])
        keepers = [n for n in writers if n != one_shot]
        assert len(keepers) == 1, f"{site_volume}: one projector keeps auth.conf, got {keepers}"
        keeper = services[keepers[0]]
        assert {argv[0] for argv in odst_invocations(keeper)} & {"projector", "serve"}
        assert keeper["environment"]["ODST_NATS_AUTH_FILE"] == "/etc/nats/site/auth.conf"


def test_nats_image_matches_the_nats_server_the_tests_run():
    out = subprocess.run([nats_server_binary(), "--version"], capture_output=True, text=True).stdout
    major, minor = re.search(r"v(\d+)\.(\d+)", out).groups()
    for _, name, svc in compose_services():
        image = str(svc.get("image", ""))
        if image.startswith("nats:"):
            assert image.startswith(f"nats:{major}.{minor}"), f"{name}: {image} vs nats-server {out.strip()}"


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_environment_variables_are_settings(name):
    text = (ROOT / name).read_text()
    for svc_name, svc in compose(name)["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{svc_name}: use the mapping form for environment"
        for key in env:
            if key.startswith("ODST_"):
                assert key in SETTING_VARS | EXTRA_ODST_VARS, f"{name}: {svc_name} sets unknown {key}"
    for var in interpolated_vars(text):
        assert var in SETTING_VARS | EXTRA_ODST_VARS | COMPOSE_ONLY_VARS, f"{name}: unknown ${{{var}}}"


def test_environment_defaults_in_compose_are_valid_settings():
    """compose.yaml's defaults, as compose would substitute them, load as ODST settings."""
    doc = compose("compose.yaml")
    env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
           for k, v in doc["services"]["gateway"]["environment"].items()}
    settings = load({"data": "/data"}, env=env)
    assert settings.log_format == "json"
    assert settings.context == "CasperShare"


# ---- nginx -----------------------------------------------------------------------------------

def nginx_conf() -> str:
    return (DEPLOY / "nginx" / "odst.conf").read_text()


def test_nginx_alias_is_where_the_store_publishes_packages():
    """compose mounts odst-data at /data in ODST and nginx; --data /data puts the store at
    /data/store, whose packages/ nginx serves from an internal location the gateway redirects
    /<context>/Packages/ to (X-Accel-Redirect: the gateway finds any spelling of a name)."""
    settings = load({"data": "/data"}, env={})
    packages = Store(settings.store_dir).packages
    aliases = dict(re.findall(r"location\s+(\S+)\s*\{\s*internal;\s*alias\s+(\S+);", nginx_conf()))
    assert aliases == {"/_odst_store/": f"{packages}/"}
    for prefix in (f"/{settings.context}/Packages/", "/Packages/"):
        block = re.search(r"location\s+" + re.escape(prefix) + r"\s*\{(.*?)\n    \}", nginx_conf(), re.S).group(1)
        assert "proxy_pass $odst_gateway;" in block
        assert "proxy_set_header X-ODST-Accel-Redirect /_odst_store/;" in block
    services = compose("compose.yaml")["services"]
    assert ("odst-data", "/data", True) in volume_mounts(services["nginx"])
    assert services["nginx"]["profiles"] == ["nginx"]
    assert any(p.endswith(":8080") for p in services["nginx"]["ports"])
    assert re.search(r"^\s*listen 8080;", nginx_conf(), re.M)
    assert "http://gateway:8080" in nginx_conf() and "gateway" in services
    for directive in ("sendfile on;", "client_max_body_size 0;", "proxy_request_buffering off;"):
        assert directive in nginx_conf()


@pytest.fixture
def gateway_stub():
    """A stand-in for the gateway: answers every request with what it received, and a download
    that nginx marks with X-ODST-Accel-Redirect with X-Accel-Redirect to the file named by the
    key of the name, as the gateway does."""
    received = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            received[self.path] = (self.command, len(body))
            accel = self.headers.get("X-ODST-Accel-Redirect")
            if accel and self.path.startswith(("/CasperShare/Packages/", "/Packages/")):
                self.send_response(200)
                self.send_header("X-Accel-Redirect", accel + quote(name_key(unquote(self.path.rsplit("/", 1)[1]))))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            out = json.dumps({"path": self.path, "method": self.command, "bytes": len(body)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_PUT = do_POST = do_HEAD = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], received
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def nginx_in_front(tmp_path: Path, packages: Path, gateway_url: str, port: int):
    """The shipped nginx config, run on 127.0.0.1:``port`` in front of ``gateway_url``, serving
    ``packages`` (a store's packages/); yields its base URL."""
    conf = nginx_conf()
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    assert "alias /data/store/packages/;" in conf
    conf = conf.replace("alias /data/store/packages/;", f"alias {packages}/;")
    conf = conf.replace("http://gateway:8080", gateway_url)
    (tmp_path / "odst.conf").write_text(conf)
    user = "user root root;" if os.geteuid() == 0 else ""  # workers must read tmp_path
    (tmp_path / "nginx.conf").write_text(f"""
{user}
daemon off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/client; proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi; uwsgi_temp_path {tmp_path}/uwsgi; scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/odst.conf;
}}
""")
    with open(tmp_path / "nginx.out", "wb") as out:
        proc = subprocess.Popen(["nginx", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"

        def up():
            if proc.poll() is not None:
                raise AssertionError(f"nginx exited: {(tmp_path / 'nginx.out').read_text()}")
            return httpx.get(base + "/Packages/none", timeout=1).status_code == 404
        wait_until(up, 15, what="nginx to listen")
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_serves_the_store_and_proxies_the_rest(tmp_path, gateway_stub):
    stub_port, received = gateway_stub
    port = free_port()
    store = Store(tmp_path / "data" / "store")
    store.ensure()
    payload = os.urandom(3 << 20)
    store.path("Firefox.pkg").write_bytes(payload)
    with nginx_in_front(tmp_path, store.packages, f"http://127.0.0.1:{stub_port}", port) as base:
        received.clear()
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.get("/CasperShare/Packages/Firefox.pkg")
            assert r.status_code == 200 and r.content == payload
            assert c.get("/Packages/Firefox.pkg").content == payload
            r = c.get("/CasperShare/Packages/Firefox.pkg", headers={"Range": "bytes=1048576-1048585"})
            assert r.status_code == 206 and r.content == payload[1048576:1048586]
            assert c.head("/CasperShare/Packages/Firefox.pkg").headers["content-length"] == str(len(payload))
            assert c.post("/CasperShare/Packages/Firefox.pkg", content=b"x").status_code == 403
            assert c.get("/CasperShare/Packages/FIREFOX.PKG").content == payload  # any spelling
            assert c.get("/_odst_store/firefox.pkg").status_code == 404  # internal: only by redirect
            assert set(received) == {"/CasperShare/Packages/Firefox.pkg", "/Packages/Firefox.pkg",
                                     "/CasperShare/Packages/FIREFOX.PKG"}  # the gateway decides
            assert all(method in ("GET", "HEAD") for method, _ in received.values())
            assert c.get("/CasperShare/Packages/").status_code in (403, 404)  # no listing
            received.clear()
            # everything else reaches the gateway, uploads of any size included
            assert c.get("/healthz").json() == {"path": "/healthz", "method": "GET", "bytes": 0}
            r = c.put("/api/v1/packages/Big.pkg?stage=test", content=payload)
            assert r.status_code == 200, r.text
            assert received["/api/v1/packages/Big.pkg?stage=test"] == ("PUT", len(payload))


# ---- NATS configs ----------------------------------------------------------------------------

def nats_conf_copy(src: Path, dest: Path, routes=(), **ports: int) -> tuple[Path, str]:
    """A runnable copy of a shipped config: site/ beside it written by `odst nats-config` from a
    data directory of its own (dest/odst-data), the store in dest, the compose ports (4222
    client, 8222 monitoring, 7422 leaf, 6222 routes) on loopback. (config path, site id)"""
    written = write_nats_config(load({"data": str(dest / "odst-data")}, env={}), dest / "site", list(routes))
    text = src.read_text()
    replacements = {'store_dir: "/data"': f'store_dir: "{dest / "js"}"'}
    for name, compose_port in (("client", 4222), ("http", 8222), ("leaf", 7422), ("route", 6222)):
        if name in ports:
            replacements[f'"0.0.0.0:{compose_port}"'] = f'"127.0.0.1:{ports[name]}"'
    if "hub_leaf" in ports:
        replacements['"nats-leaf://nats-a:7422"'] = f'"nats-leaf://127.0.0.1:{ports["hub_leaf"]}"'
    for old, new in replacements.items():
        assert old in text, f"{src.name} no longer has {old}: update compose files and this test"
        text = text.replace(old, new)
    path = dest / src.name
    path.write_text(text)
    return path, written.site


@pytest.mark.parametrize("conf", NATS_CONFS, ids=lambda p: p.name)
def test_nats_config_is_valid(conf, tmp_path):
    copy, _ = nats_conf_copy(conf, tmp_path, routes=["nats-route://127.0.0.1:6222"])
    r = subprocess.run([nats_server_binary(), "-t", "-c", str(copy)], capture_output=True, text=True,
                       env={**os.environ, "NODE_NAME": "n1"})
    assert r.returncode == 0, r.stdout + r.stderr
    text = conf.read_text()
    for required in ("max_payload: 8MB", "domain: $SITE_ID", "sync_interval: always",
                     'listen: "0.0.0.0:4222"', 'http: "0.0.0.0:8222"',
                     'include "site/site.conf"', 'include "site/auth.conf"'):
        assert required in text, f"{conf.name} lacks {required}"
    assert "no_auth_user" not in text  # no anonymous clients
    if "remotes" in text:  # a spoke presents its site key and keeps its hub away from its internals
        assert 'include "site/leaf.conf"' in text
        for var in ("nkey: $LEAF_NKEY", "deny_imports: $LEAF_DENY_IMPORTS", "deny_exports: $LEAF_DENY_EXPORTS"):
            assert var in text, f"{conf.name}: its leaf remote lacks {var}"
    if "cluster {" in text:  # routes authenticated
        assert 'include "site/cluster.conf"' in text
        for var in ("user: $ROUTE_USER", "password: $ROUTE_PASSWORD", "routes: $ROUTES"):
            assert var in text, f"{conf.name}: its cluster block lacks {var}"


def test_nats_config_command_writes_the_includes_private_and_stable(tmp_path):
    data, out = tmp_path / "data", tmp_path / "site"
    argv = ["nats-config", "--data", str(data), "--out", str(out), "--route", "nats-route://n1:6222",
            "--route", "nats-route://n2:6222"]
    first = run_odst(*argv)
    assert first.returncode == 0, first.stderr
    site_id = run_odst("site-id", "--data", str(data)).stdout.strip()
    assert (out / "site.conf").read_text() == f'SITE_ID: "{site_id}"\n'
    for name in ("auth.conf", "leaf.conf", "cluster.conf"):
        assert (out / name).stat().st_mode & 0o077 == 0, f"{name} is readable by others"
    for name in ("nats-client.nk", "nats-system.nk", "nats-route.secret"):
        assert (data / name).stat().st_mode & 0o777 == 0o600, name
    client = public_key_of_seed(read_seed(client_seed_path(data)))
    auth = (out / "auth.conf").read_text()
    assert f'{{"nkey": "{client}"}}' in auth and "system_account: SYS" in auth
    leaf = (out / "leaf.conf").read_text()
    assert f'LEAF_NKEY: "{SiteKey.load_or_create(data / "site.key").nkey_seed()}"' in leaf
    password = (data / "nats-route.secret").read_text().strip()
    assert f"nats-route://odst-route:{password}@n2:6222" in (out / "cluster.conf").read_text()
    before = {p.name: p.read_text() for p in out.iterdir()}
    assert run_odst(*argv).returncode == 0  # compose runs it at every `up`: same keys, same files
    assert {p.name: p.read_text() for p in out.iterdir()} == before
    bad = run_odst("nats-config", "--data", str(data), "--out", str(out), "--route", "n1:6222")
    assert bad.returncode == 2 and "nats-route://HOST:PORT" in bad.stderr


async def _connect(url: str, seed: str | None = None, **kw):
    async def quiet(exc):
        pass
    return await nats.connect(url, nkeys_seed_str=seed, connect_timeout=2, allow_reconnect=False,
                              max_reconnect_attempts=0, error_cb=quiet, **kw)


def refused(url: str, seed: str | None = None) -> bool:
    async def attempt():
        try:
            nc = await _connect(url, seed)
        except nats.errors.Error as exc:
            return "Authorization Violation" in str(exc)
        await nc.close()
        return False
    return asyncio.run(attempt())


async def request_until_answered(nc, subject: str, timeout: float = 15) -> dict:
    """A request through a leaf link that may still be coming up (interest not yet propagated)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return json.loads((await nc.request(subject, b"", timeout=1)).data)
        except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{subject}: no answer through the leaf link") from None
            await asyncio.sleep(0.1)


async def not_answered(nc, subject: str, payload: bytes = b"") -> bool:
    try:
        await nc.request(subject, payload, timeout=1.5)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return True
    return False


class NatsProcs:
    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, conf: Path) -> subprocess.Popen:
        with open(conf.parent / "nats.log", "wb") as log:
            p = subprocess.Popen([nats_server_binary(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=log)
        self.procs.append(p)
        return p

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(10)


@pytest.fixture
def nats_procs():
    procs = NatsProcs()
    yield procs
    procs.stop()


def monitor(ports, what):
    return httpx.get(f"http://127.0.0.1:{ports['http']}/{what}", timeout=2).json()


def leafs(ports) -> int:
    return monitor(ports, "leafz")["leafnodes"]


def shipped_hub_and_spoke(tmp_path):
    """The shipped hub and spoke configs on loopback ports: (ports, config, site id, data dir) each."""
    hub_ports = {"client": free_port(), "http": free_port(), "leaf": free_port()}
    spoke_ports = {"client": free_port(), "http": free_port()}
    hub_conf, hub_id = nats_conf_copy(DEPLOY / "nats" / "nats.conf", tmp_path / "hub", **hub_ports)
    spoke_conf, spoke_id = nats_conf_copy(DEPLOY / "nats" / "nats-spoke.conf", tmp_path / "spoke",
                                          hub_leaf=hub_ports["leaf"], **spoke_ports)
    return ((hub_ports, hub_conf, hub_id, tmp_path / "hub" / "odst-data"),
            (spoke_ports, spoke_conf, spoke_id, tmp_path / "spoke" / "odst-data"))


def test_shipped_nats_configs_admit_only_the_sites_users(tmp_path, nats_procs):
    """The shipped hub and spoke configs, started for real with what `odst nats-config` wrote:
    each has its site id as JetStream domain and 8MB max_payload; anonymous and unknown
    clients are refused; the hub refuses the spoke's leaf link until the spoke is among its
    users, then (reloaded over $SYS, no restart) accepts it; the hub's JetStream answers
    through the link as far as a peer's permissions go ($JS.<hub>.API.STREAM.INFO.EVENTS,
    not $JS.<hub>.API.INFO or STREAM.DELETE)."""
    (hub_ports, hub_conf, hub_id, hub_data), (spoke_ports, spoke_conf, spoke_id, spoke_data) = \
        shipped_hub_and_spoke(tmp_path)
    hub_url, spoke_url = (f"nats://127.0.0.1:{p['client']}" for p in (hub_ports, spoke_ports))
    hub = nats_procs.start(hub_conf)
    nats_procs.start(spoke_conf)

    def up(ports):
        try:
            return monitor(ports, "varz")
        except httpx.HTTPError:
            return None
    for ports, site in ((hub_ports, hub_id), (spoke_ports, spoke_id)):
        v = wait_until(lambda: up(ports), 15, what="nats-server to serve its monitoring port")
        assert v["server_name"] == site
        assert v["max_payload"] == 8 * 1024 * 1024
        assert v["jetstream"]["config"]["domain"] == site

    # no anonymous client, no unknown key, on either site
    for url in (hub_url, spoke_url):
        assert refused(url) and refused(url, new_user_seed())
    assert not refused(hub_url, read_seed(client_seed_path(hub_data)))

    # the spoke's link is refused while the hub does not know it (an unregistered leaf)
    spoke_log = tmp_path / "spoke" / "nats.log"
    wait_until(lambda: "Authorization Violation" in spoke_log.read_text(errors="replace"), 30,
               what="the hub to refuse the unregistered spoke's leaf link")
    assert leafs(hub_ports) == 0 and leafs(spoke_ports) == 0

    # registration makes the spoke's site key a peer in the hub's users: rewritten, reloaded
    hub_system = read_seed(hub_data / SYSTEM_SEED_FILE)
    spoke_nkey = public_key_of_seed(SiteKey.load_or_create(spoke_data / "site.key").nkey_seed())
    users = authz.users(hub_id, public_key_of_seed(read_seed(client_seed_path(hub_data))),
                        [authz.Peer(spoke_nkey, spoke_id)], [], ["EVENTS"])
    assert write_include(tmp_path / "hub" / "site" / "auth.conf",
                         render_auth(hub_id, authz.render_users(users), public_key_of_seed(hub_system)))
    assert len(asyncio.run(reload_servers(hub_url, hub_system)).servers) == 1
    wait_until(lambda: leafs(hub_ports) == 1 and leafs(spoke_ports) == 1, 30, what="the leaf link")
    assert hub.poll() is None and monitor(hub_ports, "varz")["config_load_time"] != monitor(hub_ports, "varz")["start"]

    async def through_the_link():
        hub_nc = await _connect(hub_url, read_seed(client_seed_path(hub_data)))
        spoke_nc = await _connect(spoke_url, read_seed(client_seed_path(spoke_data)),
                                  inbox_prefix=authz.inbox_prefix(spoke_id))
        system = await _connect(hub_url, hub_system)
        try:
            await hub_nc.jetstream().add_stream(name="EVENTS", subjects=[f"odst.{hub_id}.ev.>"])
            info = await request_until_answered(spoke_nc, f"$JS.{hub_id}.API.STREAM.INFO.EVENTS")
            assert info["config"]["name"] == "EVENTS", info
            assert await not_answered(spoke_nc, f"$JS.{hub_id}.API.INFO")
            assert await not_answered(spoke_nc, f"$JS.{hub_id}.API.STREAM.DELETE.EVENTS")
            await hub_nc.jetstream().stream_info("EVENTS")  # still there
            # the system user may ask for reloads, connection lists and kicks, and nothing else
            assert not await not_answered(system, "$SYS.REQ.SERVER.PING.CONNZ")
            for subject in ("$SYS.REQ.SERVER.PING.VARZ", "$SYS.REQ.SERVER.PING.JSZ",
                            f"$SYS.REQ.ACCOUNT.{SYSTEM_ACCOUNT}.CONNZ", f"$JS.{hub_id}.API.INFO"):
                assert await not_answered(system, subject), subject
        finally:
            for nc in (hub_nc, spoke_nc, system):
                await nc.close()
    asyncio.run(through_the_link())


def test_shipped_spoke_config_refuses_what_a_hostile_hub_sends(tmp_path, nats_procs):
    """The deny lists of leaf.conf reach the spoke's remote: a hub whose users give the
    spoke's link every right still cannot use the spoke's JetStream API or write its log."""
    (hub_ports, hub_conf, hub_id, hub_data), (spoke_ports, spoke_conf, spoke_id, spoke_data) = \
        shipped_hub_and_spoke(tmp_path)
    spoke_nkey = public_key_of_seed(SiteKey.load_or_create(spoke_data / "site.key").nkey_seed())
    hub_client = read_seed(client_seed_path(hub_data))
    hostile = [{"nkey": public_key_of_seed(hub_client)}, {"nkey": spoke_nkey}]  # no permissions: all
    write_include(tmp_path / "hub" / "site" / "auth.conf",
                  render_auth(hub_id, authz.render_users(hostile),
                              public_key_of_seed(read_seed(hub_data / SYSTEM_SEED_FILE))))
    nats_procs.start(hub_conf)
    nats_procs.start(spoke_conf)
    wait_until(lambda: _leafs_or_zero(hub_ports) == 1 and _leafs_or_zero(spoke_ports) == 1, 30,
               what="the leaf link")

    async def attack():
        hub_nc = await _connect(f"nats://127.0.0.1:{hub_ports['client']}", hub_client)
        spoke_nc = await _connect(f"nats://127.0.0.1:{spoke_ports['client']}",
                                  read_seed(client_seed_path(spoke_data)))
        try:
            await spoke_nc.jetstream().add_stream(name="EVENTS", subjects=[f"odst.{spoke_id}.ev.>"])
            api = f"$JS.{spoke_id}.API"
            assert (await request_until_answered(hub_nc, f"{api}.STREAM.INFO.EVENTS"))["state"]["messages"] == 0
            for subject, body in ((f"{api}.STREAM.DELETE.EVENTS", b""), (f"{api}.STREAM.PURGE.EVENTS", b""),
                                  (f"{api}.STREAM.UPDATE.EVENTS", json.dumps(
                                      {"name": "EVENTS", "subjects": [f"odst.{spoke_id}.ev.>"], "max_msgs": 1}).encode()),
                                  (f"{api}.INFO", b"")):
                assert await not_answered(hub_nc, subject, body), subject
            await hub_nc.publish(f"odst.{spoke_id}.ev.junk", b"junk")
            # messages on one link keep their order: once this answer is back, the junk was handled
            info = await request_until_answered(hub_nc, f"{api}.STREAM.INFO.EVENTS")
            assert info["state"]["messages"] == 0 and info["config"].get("max_msgs", -1) == -1, info
        finally:
            await hub_nc.close()
            await spoke_nc.close()
    asyncio.run(attack())


def _leafs_or_zero(ports) -> int:
    try:
        return leafs(ports)
    except httpx.HTTPError:
        return 0


# ---- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_builds_in_stages_and_runs_as_a_non_root_user_with_a_healthcheck():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    assert dockerfile_base_image().startswith("python:3.11-slim")
    assert all(s[0][0] == "FROM" and s[0][1].split()[0] == "${BASE_IMAGE}" for s in stages)
    final = stages[-1]
    instr = {}
    for i, a in final:
        instr.setdefault(i, []).append(a)
    user = instr["USER"][-1].split(":")[0]
    assert user not in ("root", "0")
    assert re.search(rf"useradd\b.*--uid 10001\b.*\b{user}\b", " ".join(instr["RUN"]))
    (healthcheck,) = instr["HEALTHCHECK"]
    assert "127.0.0.1:8080/healthz" in healthcheck and "curl" not in healthcheck
    assert instr["EXPOSE"] == ["8080"]
    assert json.loads(instr["VOLUME"][0]) == ["/data"]
    assert json.loads(instr["ENTRYPOINT"][0]) == ["odst"]
    env = " ".join(instr["ENV"])
    assert "ODST_LOG_FORMAT=json" in env
    for var in re.findall(r"\b(ODST_[A-Z_]+)=", env):
        assert var in SETTING_VARS, var
    args = parse_odst(dockerfile_cmd())
    assert args.command == "serve" and args.data == "/data" and args.http == "0.0.0.0:8080"
    for i, a in stages[0]:  # everything the builder copies exists in the repository
        if i == "COPY":
            for src in shlex.split(a)[:-1]:
                assert (ROOT / src).exists(), src


# ---- systemd -------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "odst.service"


def test_systemd_unit_runs_odst_serve_hardened():
    u = unit(UNIT)
    service = u["Service"]
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].startswith("/") and Path(argv[0]).name == "odst"
    args = parse_odst(argv[1:])
    assert args.command == "serve"
    assert args.http.startswith("127.0.0.1:"), "behind nginx: listen on loopback"
    data = args.data
    assert data in " ".join(service["ReadWritePaths"]).split()
    assert f"/var/lib/{service['StateDirectory'][0]}" == data
    assert service["User"][0] not in ("root", "0")
    for key, value in HARDENING.items():
        assert service[key] == [value], key
    assert service["KillMode"] == ["mixed"], "odst stops its own nats-server after draining"
    for line in service.get("Environment", []):
        for var in re.findall(r"\b(ODST_[A-Z_]+)=", line):
            assert var in SETTING_VARS | EXTRA_ODST_VARS
    assert u["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    # The unit's binary must exist for verify: point it at this checkout's odst.
    odst = Path(sys.executable).parent / "odst"
    if not odst.exists():
        pytest.skip("no odst console script beside the interpreter")
    copy = tmp_path / "odst.service"
    copy.write_text(UNIT.read_text().replace("/opt/odst/bin/odst", str(odst)))
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if "odst.service" in line]
    assert r.returncode == 0 and not complaints, "\n".join(complaints) or r.stderr


# ---- documentation ---------------------------------------------------------------------------

def test_deploy_readme_settings_table_lists_every_setting():
    text = (DEPLOY / "README.md").read_text()
    table = text[text.index("## Settings"):]
    table = table[:table.index("Not settings")]
    rows = set(re.findall(r"^\| `(ODST_[A-Z_]+)` \|", table, re.M))
    assert rows == SETTING_VARS, f"missing {SETTING_VARS - rows}, unknown {rows - SETTING_VARS}"
    for var in EXTRA_ODST_VARS | COMPOSE_ONLY_VARS:
        assert f"`{var}`" in text, var
    mentioned = set(re.findall(r"\bODST_[A-Z_]+[A-Z]\b", text))
    assert mentioned <= SETTING_VARS | EXTRA_ODST_VARS | COMPOSE_ONLY_VARS, mentioned
