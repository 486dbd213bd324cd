"""A NATS server ODST does not start: the files its config includes, and reloading them.

``odst nats-config --data DIR --out DIR2`` writes what the shipped configs
(``deploy/nats/*.conf``) include from ``DIR2``:

* ``site.conf``: ``SITE_ID``, the server's name and JetStream domain.
* ``auth.conf``: the ``authorization { users: [...] }`` block exactly as the embedded broker
  has it (odst.bus.authorization: the site's processes, every peer's leaf identity, every
  event subscriber), plus the system account (odst.bus.system: its one user may only ask
  servers to reload, list their connections and leaf links and close one).
* ``leaf.conf`` (0600): ``LEAF_NKEY`` (the site key as the NKey seed a spoke's leaf remote
  presents to its hub) and ``LEAF_DENY_IMPORTS``/``LEAF_DENY_EXPORTS``, what a spoke refuses
  from and never sends to its hub. NATS config variables hold arrays, so the shipped spoke
  config references them.
* ``cluster.conf`` (0600, with ``--route``): ``ROUTE_USER``, ``ROUTE_PASSWORD`` and
  ``ROUTES`` (the route URLs with the credential), so a cluster's routes are authenticated.

The site's roles then connect with ``<data>/nats-client.nk``. When peers or subscribers
change, the projector rewrites ``auth.conf`` (setting ``nats_auth_file``) and asks every
server of the cluster to reload it with a request to ``$SYS.REQ.SERVER.<id>.RELOAD`` as the
system user (``<data>/nats-system.nk``): in compose the projector cannot signal the NATS
container, and a request reaches every node of a cluster. Then it closes, on every node, the
accepted leaf links of keys that are no user any more (a removed peer's), which nats-server
does not check again on a reload (odst.bus.system.LinkCutter).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import structlog

from odst.bus import authorization as authz
from odst.bus.identity import load_or_create_client_seed, public_key_of_seed, read_seed, write_secret
from odst.bus.system import LinkCutter, load_or_create_system_seed, render_system_account, user_keys
from odst.bus.users import authorization_users
from odst.datadir import key_path, read_model_path
from odst.events.log import EVENTS_STREAM
from odst.events.signing import SiteKey
from odst.projections.db import connect as connect_read_model

log = structlog.get_logger("odst.bus")

ROUTE_SECRET_FILE = "nats-route.secret"
ROUTE_USER = "odst-route"
SITE_FILE, AUTH_FILE, LEAF_FILE, CLUSTER_FILE = "site.conf", "auth.conf", "leaf.conf", "cluster.conf"

HEADER = "# Written by `odst nats-config` for site {site}; do not edit: the next run replaces it.\n"
AUTH_HEADER = ("# The site's projector rewrites it when peers or subscribers change (setting\n"
               "# nats_auth_file) and asks the servers to reload it.\n")


class NatsConfigError(Exception):
    """The include files cannot be written or reloaded; the message says what to do."""


# ---- rendering (pure) -----------------------------------------------------------------------

def render_site(site: str) -> str:
    return f'SITE_ID: "{site}"\n'


def render_auth(site: str, authorization_block: str, system_nkey: str) -> str:
    """The site's users (odst.bus.authorization.render_users) and the system user."""
    return HEADER.format(site=site) + AUTH_HEADER + authorization_block + "\n" + render_system_account(system_nkey)


def render_leaf(site: str, leaf_seed: str) -> str:
    return (HEADER.format(site=site)
            + f"LEAF_NKEY: {json.dumps(leaf_seed)}\n"
            + f"LEAF_DENY_IMPORTS: {json.dumps(authz.remote_deny_imports(site))}\n"
            + f"LEAF_DENY_EXPORTS: {json.dumps(authz.remote_deny_exports(site))}\n")


def route_url(url: str, password: str) -> str:
    """nats-route://HOST:PORT with the route credential in it (what a dialing node presents)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not rest or "@" in rest or scheme not in ("nats-route", "nats", "tls"):
        raise NatsConfigError(f"route {url!r} must be nats-route://HOST:PORT (without credentials)")
    return f"{scheme}://{ROUTE_USER}:{password}@{rest}"


def render_cluster(site: str, password: str, routes: list[str]) -> str:
    return (HEADER.format(site=site)
            + f"ROUTE_USER: {json.dumps(ROUTE_USER)}\n"
            + f"ROUTE_PASSWORD: {json.dumps(password)}\n"
            + f"ROUTES: {json.dumps([route_url(r, password) for r in routes])}\n")


# ---- files -----------------------------------------------------------------------------------

def load_or_create_route_password(data: Path) -> str:
    """One route password per site, kept in the data directory: every node of the cluster gets
    the same cluster.conf, and running the command again does not cut the routes."""
    path = Path(data) / ROUTE_SECRET_FILE
    if not path.exists():
        write_secret(path, secrets.token_hex(24) + "\n")
    return path.read_text().strip()


def write_include(path: Path, text: str) -> bool:
    """Replace an include atomically when its text changed (False: nothing to do). A file that
    exists keeps its group and mode (at most 0640), so a nats-server running as another user
    in that group still reads what the projector rewrites; a new one is 0600."""
    path = Path(path)
    try:
        if path.read_text() == text:
            return False
        st = path.stat()
        mode, gid = st.st_mode & 0o640 | 0o600, st.st_gid
    except FileNotFoundError:
        mode, gid = 0o600, None
    write_secret(path, text)
    try:
        if gid is not None and gid != os.getegid():
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        log.warning("could not keep the include's group and mode", path=str(path), error=str(exc))
    return True


@dataclass(frozen=True)
class Written:
    site: str
    files: list[Path]
    users: int


def write_nats_config(settings, out: Path, routes: list[str] = ()) -> Written:
    """What ``odst nats-config`` does: the includes of a site's NATS server, from its data
    directory (site key, client key, read model). Creates the keys it needs."""
    data, out = Path(settings.data), Path(out)
    data.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    key = SiteKey.load_or_create(key_path(data))
    client_seed = (read_seed(Path(settings.nats_credentials)) if settings.nats_credentials
                   else load_or_create_client_seed(data))
    client_nkey = public_key_of_seed(client_seed)
    if read_model_path(data).exists():
        reader = connect_read_model(read_model_path(data), readonly=True)
        try:
            users = authorization_users(reader, key.site_id, client_nkey)
        finally:
            reader.close()
    else:
        users = authz.users(key.site_id, client_nkey, [], [], [EVENTS_STREAM])
    system_nkey = public_key_of_seed(load_or_create_system_seed(data))
    texts = {SITE_FILE: render_site(key.site_id),
             AUTH_FILE: render_auth(key.site_id, authz.render_users(users), system_nkey),
             LEAF_FILE: render_leaf(key.site_id, key.nkey_seed())}
    if routes:
        texts[CLUSTER_FILE] = render_cluster(key.site_id, load_or_create_route_password(data), list(routes))
    for name, text in texts.items():
        write_include(out / name, text)
    return Written(key.site_id, [out / n for n in texts], len(users))


# ---- reload ----------------------------------------------------------------------------------

class AuthInclude:
    """The projector's hold on ``auth.conf`` of a NATS server ODST does not run: rewrite it
    when the site's users change, then reload every server and cut the leaf links of keys that
    are no user any more (odst.bus.system.LinkCutter), again until that works."""

    def __init__(self, site: str, path: Path, servers: str, system_seed_path: Path, names=None, current=None):
        self.site, self.path = site, Path(path)
        self.system_seed_path = Path(system_seed_path)
        self.cutter = LinkCutter(servers, system_seed_path, names, current)
        self._checked = False  # the first update reloads and cuts whatever changed: a link of a key
        # removed while no projector ran (or before its cut was done) is not left up

    @property
    def pending(self) -> bool:
        return self.cutter.pending

    def update(self, users: list[dict]) -> None:
        """Called with the site's users (odst.bus.authorization.users) whenever the read model
        may have changed them. Never raises: a problem is logged (and retried at the next
        call), peers' mirrors go on."""
        try:
            system_nkey = public_key_of_seed(read_seed(self.system_seed_path))
            changed = write_include(self.path, render_auth(self.site, authz.render_users(users), system_nkey))
        except (OSError, ValueError) as exc:
            log.error("cannot write the NATS users include: run `odst nats-config` for this data directory "
                      "and check nats_auth_file", path=str(self.path), error=f"{type(exc).__name__}: {exc}")
            return
        if changed:
            log.info("NATS users written", path=str(self.path))
        if changed or not self._checked or self.cutter.pending:
            self._checked = True
            self.cutter.reloaded(user_keys(users))
