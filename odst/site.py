"""The composition root of a running site: key, broker, event log, projector, store.

``Site.open`` wires the parts together; the gateway and the CLI take a Site.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import sys
import time
from pathlib import Path

import structlog

from odst.accounts import passwords
from odst.accounts.sessions import SessionStore
from odst.bus import authorization as authz
from odst.bus import connect, until_ready
from odst.bus.embedded import BrokerConfig, BrokerError, EmbeddedBroker
from odst.bus.external import SYSTEM_SEED_FILE, AuthInclude
from odst.bus.guard import ConsumerGuard
from odst.bus.identity import client_seed_path, load_or_create_client_seed, public_key_of_seed, read_seed, \
    user_public_key
from odst.bus.users import authorization_users
from odst.config import ConfigError, Settings
from odst.datadir import DataDirLock, SiteBusy, key_path, read_model_path, run_dir
from odst.events import catalogue as ev
from odst.events.log import EVENTS_STREAM, AppendFailed, EventLog
from odst.events.signing import SiteKey
from odst.events.watch import watch_own_log
from odst.notify.service import Notifier
from odst.peering.mirrors import Linker
from odst.peering.registration import RegistrationService
from odst.projections import views
from odst.projections.db import connect as connect_read_model
from odst.projections.projector import Projector
from odst.projections.status import ProjectionStatus
from odst.projections.watcher import ReadModelWatcher
from odst.replicator.replicator import Replicator
from odst.replicator.transport import ChunkServer
from odst.stats import SiteStats
from odst.store.files import PackageStore, Store

log = structlog.get_logger("odst.site")

ALL_ROLES = frozenset({"projector", "gateway", "replicator"})
APPLICANT_S = 600  # how long a joined invitation's site may use the leaf port for registering
BROKER_RESTARTS = 5  # the embedded broker dying this many times in a row ends `odst serve` (exit 1)
STALE_TEMP_S = 6 * 3600  # a temp file untouched this long, with other processes about, is abandoned


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Site:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.data = Path(settings.data)
        self.key: SiteKey | None = None
        self.broker: EmbeddedBroker | None = None
        self.nc = None
        self.js = None
        self.log: EventLog | None = None
        self.projector: ProjectionStatus | None = None  # a Projector, or a ReadModelWatcher of another process's
        self.store: PackageStore = Store(settings.store_dir)
        self.reader = None
        self.nats_url = ""
        self._client_nkey = ""
        self._applicants: dict[str, float] = {}  # NKey -> monotonic expiry (admit_applicant)
        self.guard = None  # projector role: deletes consumers that aim the event log elsewhere
        self.lock = DataDirLock(self.data)
        self.printed_token: str | None = None
        self.linker = None
        self.log_watch = None  # odst.events.watch.LogWatch: is EVENTS still the log the read model folded?
        self.replicator = None
        self.chunk_server = None
        self.registration = None
        self.notifier = None
        self.sessions = None  # web UI sessions (gateway role)
        self.printed_password: str | None = None
        self.roles: frozenset[str] = ALL_ROLES
        self.stats = SiteStats()
        self._tasks: list[asyncio.Task] = []
        self.exit_code = 0  # non-zero when the site stopped itself (its broker cannot be kept up)
        self.on_fatal = None  # how a role without HTTP is told to stop (odst.cli)
        self.stopping = asyncio.Event()  # set when shutdown begins: long-lived responses end

    @property
    def id(self) -> str:
        return self.key.site_id

    @property
    def accepted_stages(self) -> list[str]:
        """Stages replicated here: the site's last StagesAccepted, else the accept_stages setting."""
        chosen = views.site_setting(self.reader, "accepted_stages") if self.reader is not None else None
        if chosen is None:
            return self.settings.accepted_stages
        return [s for s in chosen["value"] if s in self.settings.stages]

    async def open(self, *, roles: frozenset[str] = ALL_ROLES, bootstrap: bool = True) -> "Site":
        """Start the parts of a site this process runs.

        ``odst serve`` runs every role in one process over the embedded broker and
        holds the data directory exclusively. ``odst projector|gateway|replicator``
        run one role each against a shared NATS (``--nats``) and data directory;
        exactly one projector writes the read model, the others read it.
        """
        self.roles = frozenset(roles)
        unknown = self.roles - ALL_ROLES
        if unknown or not self.roles:
            raise ValueError(f"unknown roles {sorted(unknown)}")
        all_in_one = self.roles == ALL_ROLES
        if not all_in_one and not self.settings.nats:
            raise SiteBusy("a single role shares its broker with the others: pass --nats URL "
                           "(or run everything in one process with `odst serve`)")
        self.data.mkdir(parents=True, exist_ok=True)
        if all_in_one or "projector" in self.roles:
            self.lock.acquire()  # one projector (one read-model writer) per data directory
        self.key = SiteKey.load_or_create(key_path(self.data))
        structlog.contextvars.bind_contextvars(site=self.key.site_id)
        if self.settings.nats:
            self.nats_url = self.settings.nats
            seed = self._external_seed()
        else:
            seed = load_or_create_client_seed(self.data)
            host, port = self.settings.nats_listen.rsplit(":", 1)
            self.broker = EmbeddedBroker(
                BrokerConfig(site=self.key.site_id, store_dir=self.data / "nats", host=host,
                             port=int(port), sync_interval=self.settings.sync_interval,
                             leaf_listen=self.settings.leaf_listen or None,
                             leaf_remotes=list(self.settings.leaf_remotes),
                             authorization=self._authorization(public_key_of_seed(seed)),
                             leaf_seed=self.key.nkey_seed(),
                             leaf_deny_imports=authz.remote_deny_imports(self.key.site_id),
                             leaf_deny_exports=authz.remote_deny_exports(self.key.site_id)),
                run_dir(self.data))
            self.nats_url = self.broker.start()
            self._client_nkey = public_key_of_seed(seed)
        self.nc = await connect(self.nats_url, seed=seed, site=self.key.site_id,
                                name=f"odst-{self.key.site_id}-{'+'.join(sorted(self.roles))}",
                                max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        self.js = self.nc.jetstream(timeout=10)
        if self.settings.nats:
            info = await until_ready(self.js.account_info, timeout=90)
            domain = info.domain or ""
            if domain != self.key.site_id:
                raise SiteBusy(
                    f"the NATS server at {self.nats_url} has JetStream domain {domain or '(none)'!r}; ODST needs "
                    f"the site id {self.key.site_id!r} (print it with `odst site-id --data {self.data}`) as "
                    "domain in its jetstream block, or peers' mirrors of this site never sync")
        self.log = EventLog(self.js, self.key, chain_state=self._chain_state,
                            replicas=self.settings.stream_replicas)
        restored = await until_ready(self.log.ensure_stream, timeout=90)
        self.store.ensure()
        self.linker = Linker(self)
        if "projector" in self.roles:
            self.projector = Projector(self.js, read_model_path(self.data),
                                       {self.key.site_id: self.key.public_key}, [EVENTS_STREAM])
            self.reader = connect_read_model(read_model_path(self.data))
            self.projector.start()
            self.log_watch = await watch_own_log(self.log, lambda: views.recorded(self.reader, EVENTS_STREAM, self.id),
                                                 data=self.data, restored=restored)
            if self.projector.checkpoint(EVENTS_STREAM) == 0 and (await self.log.head())[0] == 0:
                await self.log.append(ev.SiteFounded(site=self.key.site_id,
                                                     public_key=self.key.public_key.hex(),
                                                     name=self.settings.site_name), actor="system")
            await self.caught_up(timeout=120)
            # a crashed upload or pull leaves temp files; alone on the data dir, sweep them all
            self.store.adopt_spellings(views.file_holders(self.reader, self.id))
            self.store.sweep(views.published_names(self.reader, self.id),
                             older_than_s=0 if all_in_one else STALE_TEMP_S)
            if bootstrap and self.log_watch.healthy:
                await self._bootstrap_admin_token()
                await self._bootstrap_admin_user()
            await self.linker.sync()
            self.sync_authorization()
            self._tasks.append(asyncio.create_task(self._link_peers(), name="linker"))
            self.guard = await ConsumerGuard(self.nc, self.js, self.id,
                                             lambda: [s.name for s in views.nats_subscribers(self.reader)]).start()
        else:
            self.projector = ReadModelWatcher(self.js, read_model_path(self.data))
            await self.projector.wait_ready(self.key.site_id, timeout=120)
            self.reader = connect_read_model(read_model_path(self.data))
            self.log_watch = await watch_own_log(self.log, lambda: views.recorded(self.reader, EVENTS_STREAM, self.id),
                                                 data=None)
        if self.broker is not None:
            self._tasks.append(asyncio.create_task(self._supervise_broker(), name="broker-supervisor"))
        self.chunk_server = ChunkServer(self)
        if "replicator" in self.roles:
            await self.chunk_server.start()  # serve chunks over NATS (queue group across replicators)
            self.replicator = Replicator(self)
            await self.replicator.start()
        if "gateway" in self.roles:
            self.sessions = SessionStore(self.data / "sessions.sqlite", idle_s=self.settings.session_idle_s,
                                         max_s=self.settings.session_max_s)
            self.registration = RegistrationService(self)
            await self.registration.start()
        if self.roles & {"projector", "replicator"}:
            self.notifier = await Notifier(self).start()  # webhooks and email digests
        if all_in_one or "projector" in self.roles:
            (run_dir(self.data) / "site.json").write_text(json.dumps(
                {"pid": os.getpid(), "site": self.id, "nats": self.nats_url, "http": self.settings.http}))
        log.info("site open", data=str(self.data), nats=self.nats_url, roles=sorted(self.roles))
        return self

    def _external_seed(self) -> str | None:
        """The credential for a NATS server ODST does not run: ``nats_credentials``, else the
        data directory's client key when one was made (``odst nats-config`` makes it)."""
        if self.settings.nats_credentials:
            return read_seed(Path(self.settings.nats_credentials))
        path = client_seed_path(self.data)
        return read_seed(path) if path.exists() else None

    def _authorization(self, client_nkey: str) -> str:
        """The broker's users: this site's processes, its peers' leaf identities, its
        subscribers, from the read model (as it is on disk before the projector runs)."""
        reader = self.reader
        if reader is None:
            if not read_model_path(self.data).exists():
                return authz.render_users(authz.users(self.key.site_id, client_nkey, [], [], [EVENTS_STREAM]))
            reader = connect_read_model(read_model_path(self.data))
        try:
            now = time.monotonic()
            self._applicants = {k: t for k, t in self._applicants.items() if t > now}
            return authz.render_users(authorization_users(reader, self.key.site_id, client_nkey,
                                                          self._applicants))
        finally:
            if reader is not self.reader:
                reader.close()

    def admit_applicant(self, public_key_hex: str) -> bool:
        """This site's admin is joining an invitation from the site with this key: accept its
        leaf link (as a peer's) for APPLICANT_S, so that a firewalled inviter can be reached.
        True when the broker's users changed (its leaf link reconnects within about a second)."""
        if self.broker is None or not self.settings.leaf_listen:
            return False  # no one can dial us: nothing to admit
        nkey = user_public_key(bytes.fromhex(public_key_hex))
        known = nkey in self._applicants
        self._applicants[nkey] = time.monotonic() + APPLICANT_S
        return not known and self.broker.reload(self._authorization(self._client_nkey))

    _auth_include = None  # external NATS with nats_auth_file: odst.bus.external.AuthInclude

    def sync_authorization(self) -> None:
        """Projector role: peers or subscribers changed in the read model -> reload the broker's
        users (a removed peer's leaf link is cut at once). With a NATS server ODST does not run,
        rewrite the auth.conf it includes (``nats_auth_file``) and ask its servers to reload."""
        if self.broker is not None and self.reader is not None:
            if self.broker.reload(self._authorization(self._client_nkey)):
                log.info("NATS users updated", peers=len(views.peer_sites(self.reader, self.id)))
        elif self.settings.nats_auth_file and self.reader is not None and self._external_seed():
            if self._auth_include is None:
                self._auth_include = AuthInclude(self.id, Path(self.settings.nats_auth_file), self.nats_url,
                                                 self.data / SYSTEM_SEED_FILE)
            self._auth_include.update(self._authorization(public_key_of_seed(self._external_seed())))

    async def _supervise_broker(self) -> None:
        """Restart the embedded broker when it dies (back-off 0.5 s doubling to 8 s); after
        BROKER_RESTARTS failures in a row, stop the site with exit code 1 so that systemd
        or the container runtime restarts the whole of it."""
        loop = asyncio.get_running_loop()
        failures, backoff = 0, 0.5
        while True:
            await asyncio.sleep(0.5)
            if self.broker.alive():
                failures, backoff = 0, 0.5
                continue
            try:
                await loop.run_in_executor(None, self.broker.restart)
                log.warning("broker restarted", url=self.broker.url)
                continue
            except (BrokerError, OSError) as exc:
                failures += 1
                log.error("broker restart failed", error=str(exc)[-500:], failures=failures)
            if failures >= BROKER_RESTARTS:
                log.error("the embedded broker cannot be kept running; stopping the site")
                self.exit_code = 1
                self.begin_stop()
                if self.on_fatal is not None:
                    self.on_fatal()
                else:  # the HTTP server stops on SIGTERM, as it would for systemd's stop
                    os.kill(os.getpid(), signal.SIGTERM)
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 8.0)

    async def _link_peers(self) -> None:
        """Projector role: mirror every peer the read model learns of, as soon as it does."""
        while True:
            try:
                await self.linker.sync()
                self.sync_authorization()
                await self.linker.watch()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("linking peers failed; retrying", error=f"{type(exc).__name__}: {exc}")
            await self.projector.wait_changed(5.0)

    async def caught_up(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            lag = await self.projector.lag()
            if not any(lag.values()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"projector still behind after {timeout}s: {lag}")
            await self.projector.wait_changed(0.5)

    async def _bootstrap_admin_token(self) -> None:
        if views.tokens(self.reader, self.id):
            return
        given = os.environ.get("ODST_ADMIN_TOKEN", "")
        token = given or "odst_" + secrets.token_urlsafe(32)
        await self.append(ev.TokenCreated(token_id=secrets.token_hex(8), name="bootstrap admin",
                                          role="admin", token_sha256=token_digest(token)),
                          actor="system")
        if not given:
            self.printed_token = self._show_once("admin-token", "Bootstrap admin token", token)

    async def _bootstrap_admin_user(self) -> None:
        """A site with no users gets ``admin`` (ODST_ADMIN_PASSWORD, or a generated one shown once)."""
        if self.reader.execute("SELECT 1 FROM users LIMIT 1").fetchone():
            return
        given = os.environ.get("ODST_ADMIN_PASSWORD", "")
        password = given or secrets.token_urlsafe(12)
        try:
            passwords.check_new_password(password, "admin")
        except passwords.PasswordRejected as exc:
            raise ConfigError(f"ODST_ADMIN_PASSWORD: {exc.detail}") from None
        await self.append(ev.UserCreated(username="admin", role="admin", display_name="Administrator",
                                         password_sealed=await passwords.seal_async(self.key, password)),
                          actor="system")
        if not given:
            self.printed_password = self._show_once("admin-password", "Web UI sign-in: user admin, password",
                                                    password)

    def _show_once(self, filename: str, label: str, secret: str) -> str:
        """Write a generated secret to <data>/<filename> (mode 0600) and print it once."""
        path = self.data / filename
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        print(f"{label} (shown once, also in {path}):\n{secret}", file=sys.stderr, flush=True)
        return secret

    def _chain_state(self) -> tuple[int, int, str]:
        checkpoint = self.projector.checkpoint(EVENTS_STREAM)
        row = views.site_chain(self.reader, self.key.site_id)
        return (checkpoint, row["last_seq"], row["last_hash"]) if row else (checkpoint, 0, "")

    async def append(self, event: ev.Event, *, actor: str, wait: float = 30.0):
        """Append an event and wait until the read model has applied it (read-your-writes).

        Raises AppendFailed if the projector does not apply it in time or refuses it.
        """
        appended = await self.log.append(event, actor=actor)
        if not await self.projector.wait_for(EVENTS_STREAM, appended.seq, timeout=wait):
            raise AppendFailed(f"event {appended.envelope.id} was stored but not applied within {wait}s")
        if self.reader.execute("SELECT 1 FROM events WHERE id=?", (appended.envelope.id,)).fetchone() is None:
            q = self.reader.execute("SELECT reason FROM quarantine WHERE stream=? AND stream_seq=?",
                                    (EVENTS_STREAM, appended.seq)).fetchone()
            self.log.forget_head()
            raise AppendFailed(f"event {appended.envelope.id} was refused by the projector: "
                               f"{q[0] if q else 'unknown reason'}")
        return appended

    async def health(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "broker not connected"
        if self.broker is not None and self.broker.problem():
            return False, self.broker.problem()
        if self.log_watch is not None and self.log_watch.problems:
            return False, self.log_watch.reason()
        if self.projector.error:
            return False, f"projector: {self.projector.error}"
        try:
            lag = await asyncio.wait_for(self.projector.lag(), 5)
        except Exception as exc:
            return False, f"broker not answering: {type(exc).__name__}"
        alarms = views.peer_log_alarms(self.reader, self.id)
        if alarms:
            return False, "; ".join(alarms.values())
        behind = {s: n for s, n in lag.items() if n}
        if behind:
            return False, f"projections catching up: {behind}"
        return True, "ok"

    def begin_stop(self) -> None:
        """Called from a signal handler: let event streams end so the HTTP server stops at once."""
        try:
            asyncio.get_running_loop().call_soon_threadsafe(self.stopping.set)
        except RuntimeError:
            self.stopping.set()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.notifier:
            await self.notifier.stop()
        if self.guard:
            await self.guard.stop()
        if self.replicator:
            await self.replicator.stop()
        for service in (self.chunk_server, self.registration):
            if service:
                await service.stop()
        if self.log_watch:
            await self.log_watch.stop()
        if self.projector:
            await self.projector.stop()
        if self.sessions:
            self.sessions.close()
        if self.nc:
            # every component is stopped and every publish was awaited; drain() would wait up to
            # 30 s for messages that stopped subscribers (ordered consumers) will never take
            try:
                await self.nc.flush(timeout=2)
            except Exception:
                pass
            await self.nc.close()
        if self.broker:
            await asyncio.get_running_loop().run_in_executor(None, self.broker.stop)
        if self.lock.fd is not None:
            (run_dir(self.data) / "site.json").unlink(missing_ok=True)
        self.lock.release()
