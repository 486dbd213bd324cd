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

import httpx
import pytest
import yaml

from odst.bus.embedded import nats_server_binary
from odst.cli import build_parser
from odst.config import Settings, load
from odst.store.files import Store
from tests.conftest import free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent
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
        stages[-1].append((instr.upper(), rest.strip()))
    return stages


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
    volumes = {tuple(volume_mounts(services[n])) for r, n in roles.items() if r in LONG_RUNNING_ROLES}
    assert volumes == {(("odst-data", "/data", False),)}
    assert services["replicator"]["deploy"]["replicas"] >= 2


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_site_id_reaches_nats_through_a_shared_volume(name):
    """The one-shot site-id service writes site.conf where the NATS service includes it from."""
    services = compose(name)["services"]
    nats_services = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("nats:")}
    assert nats_services
    for nats_name, nats in nats_services.items():
        mounts = {target: (source, ro) for source, target, ro in volume_mounts(nats)}
        conf_source, _ = mounts["/etc/nats/nats.conf"]
        conf = (ROOT / conf_source).read_text()
        assert re.search(r'^include "site/site.conf"', conf, re.M)
        assert "--config" in nats["command"] and "/etc/nats/nats.conf" in nats["command"]
        site_volume, ro = mounts["/etc/nats/site"]
        assert ro
        writers = [n for n, s in services.items()
                   if (site_volume, "/etc/nats/site", False) in volume_mounts(s)]
        assert len(writers) == 1, f"{nats_name}: who writes {site_volume}? {writers}"
        writer = services[writers[0]]
        assert nats["depends_on"][writers[0]]["condition"] == "service_completed_successfully"
        script = " ".join(writer["command"])
        assert "odst site-id --data /data" in script and "/etc/nats/site/site.conf" in script
        # ... from the same data volume the site's ODST services use
        data_volume = next(s for s, t, _ in volume_mounts(writer) if t == "/data")
        users = [n for n, s in services.items() if is_odst_service(s) and s.get("restart") != "no"
                 and any(f"nats://{nats_name}:4222" in a for argv in odst_invocations(s) for a in argv)]
        assert users
        for n in users:
            assert (data_volume, "/data", False) in volume_mounts(services[n])


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
    /data/store, whose packages/ nginx must serve for /<context>/Packages/."""
    settings = load({"data": "/data"}, env={})
    packages = Store(settings.store_dir).packages
    aliases = dict(re.findall(r"location\s+(\S+)\s*\{\s*alias\s+(\S+);", nginx_conf()))
    assert aliases == {f"/{settings.context}/Packages/": f"{packages}/", "/Packages/": f"{packages}/"}
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
    """A stand-in for the gateway: answers every request with what it received."""
    received = {}

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            received[self.path] = (self.command, len(body))
            out = json.dumps({"path": self.path, "method": self.command, "bytes": len(body)}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_PUT = do_POST = _answer

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], received
    server.shutdown()
    server.server_close()


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_serves_the_store_and_proxies_the_rest(tmp_path, gateway_stub):
    stub_port, received = gateway_stub
    port = free_port()
    store = Store(tmp_path / "data" / "store")
    store.ensure()
    payload = os.urandom(3 << 20)
    store.path("Firefox.pkg").write_bytes(payload)
    conf = nginx_conf()
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("alias /data/store/packages/;", f"alias {store.packages}/;")
    conf = conf.replace("http://gateway:8080", f"http://127.0.0.1:{stub_port}")
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
        with httpx.Client(base_url=base, timeout=30) as c:
            r = c.get("/CasperShare/Packages/Firefox.pkg")
            assert r.status_code == 200 and r.content == payload
            assert c.get("/Packages/Firefox.pkg").content == payload
            r = c.get("/CasperShare/Packages/Firefox.pkg", headers={"Range": "bytes=1048576-1048585"})
            assert r.status_code == 206 and r.content == payload[1048576:1048586]
            assert c.head("/CasperShare/Packages/Firefox.pkg").headers["content-length"] == str(len(payload))
            assert c.post("/CasperShare/Packages/Firefox.pkg", content=b"x").status_code == 403
            assert c.get("/CasperShare/Packages/").status_code in (403, 404)  # no listing
            assert received == {}
            # everything else reaches the gateway, uploads of any size included
            assert c.get("/healthz").json() == {"path": "/healthz", "method": "GET", "bytes": 0}
            r = c.put("/api/v1/packages/Big.pkg?stage=test", content=payload)
            assert r.status_code == 200, r.text
            assert received["/api/v1/packages/Big.pkg?stage=test"] == ("PUT", len(payload))
    finally:
        proc.terminate()
        proc.wait(10)


# ---- NATS configs ----------------------------------------------------------------------------

def nats_conf_copy(src: Path, dest: Path, **ports: int) -> Path:
    """A runnable copy of a shipped config: the site id in site/site.conf beside it, the
    store in dest, the compose ports (4222 client, 8222 monitoring, 7422 leaf) on loopback."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "site").mkdir(exist_ok=True)
    (dest / "site" / "site.conf").write_text(f'SITE_ID: "{ports.pop("site_id", SITE_ID)}"\n')
    text = src.read_text()
    replacements = {'store_dir: "/data"': f'store_dir: "{dest / "js"}"'}
    for name, compose_port in (("client", 4222), ("http", 8222), ("leaf", 7422)):
        if name in ports:
            replacements[f'"0.0.0.0:{compose_port}"'] = f'"127.0.0.1:{ports[name]}"'
    if "hub_leaf" in ports:
        replacements['"nats-leaf://nats-a:7422"'] = f'"nats-leaf://127.0.0.1:{ports["hub_leaf"]}"'
    for old, new in replacements.items():
        assert old in text, f"{src.name} no longer has {old}: update compose files and this test"
        text = text.replace(old, new)
    path = dest / src.name
    path.write_text(text)
    return path


@pytest.mark.parametrize("conf", NATS_CONFS, ids=lambda p: p.name)
def test_nats_config_is_valid(conf, tmp_path):
    copy = nats_conf_copy(conf, tmp_path)
    r = subprocess.run([nats_server_binary(), "-t", "-c", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    text = conf.read_text()
    for required in ("max_payload: 8MB", "domain: $SITE_ID", "sync_interval: always",
                     'listen: "0.0.0.0:4222"', 'http: "0.0.0.0:8222"'):
        assert required in text, f"{conf.name} lacks {required}"


def test_nats_configs_run_as_hub_and_spoke_with_their_site_ids_as_domains(tmp_path):
    """The shipped hub and spoke configs, started for real: each has its site id as JetStream
    domain and 8MB max_payload, the spoke links to the hub, and the hub's JetStream answers
    through the leaf link at $JS.<hub id>.API, which is how ODST mirrors a peer's stream."""
    import nats

    hub_id, spoke_id = "shub2345abcdefghi", "sspoke2345abcdef"
    hub_ports = {"client": free_port(), "http": free_port(), "leaf": free_port()}
    spoke_ports = {"client": free_port(), "http": free_port()}
    hub_conf = nats_conf_copy(DEPLOY / "nats" / "nats.conf", tmp_path / "hub", site_id=hub_id, **hub_ports)
    spoke_conf = nats_conf_copy(DEPLOY / "nats" / "nats-spoke.conf", tmp_path / "spoke", site_id=spoke_id,
                                hub_leaf=hub_ports["leaf"], **spoke_ports)
    procs = []
    for c in (hub_conf, spoke_conf):
        with open(c.parent / "nats.log", "wb") as log:
            procs.append(subprocess.Popen([nats_server_binary(), "-c", str(c)],
                                          stdout=subprocess.DEVNULL, stderr=log))
    try:
        def varz(ports):
            return httpx.get(f"http://127.0.0.1:{ports['http']}/varz", timeout=2).json()

        def leafs(ports):
            return httpx.get(f"http://127.0.0.1:{ports['http']}/leafz", timeout=2).json()["leafnodes"]
        wait_until(lambda: leafs(hub_ports) == 1 and leafs(spoke_ports) == 1, 30, what="leaf link")
        for ports, site in ((hub_ports, hub_id), (spoke_ports, spoke_id)):
            v = varz(ports)
            assert v["server_name"] == site
            assert v["max_payload"] == 8 * 1024 * 1024
            assert v["jetstream"]["config"]["domain"] == site

        async def hub_info_through_spoke():
            nc = await nats.connect(f"nats://127.0.0.1:{spoke_ports['client']}")
            try:
                for _ in range(100):  # the leaf link carries the hub's JetStream API once up
                    try:
                        msg = await nc.request(f"$JS.{hub_id}.API.INFO", b"", timeout=1)
                        return json.loads(msg.data)
                    except Exception:
                        await asyncio.sleep(0.1)
                raise AssertionError("hub JetStream not reachable through the leaf link")
            finally:
                await nc.close()
        info = asyncio.run(hub_info_through_spoke())
        assert info.get("domain") == hub_id, info
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


# ---- Dockerfile ------------------------------------------------------------------------------

def test_dockerfile_builds_in_stages_and_runs_as_a_non_root_user_with_a_healthcheck():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and a runtime"
    assert all(s[0] == ("FROM", s[0][1]) and s[0][1].startswith("python:3.11-slim") for s in stages)
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
