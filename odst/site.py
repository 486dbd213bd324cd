"""A running site: the parts this process runs, as ``odst.bootstrap.build`` made them.

The CLI holds one to stop it; the gateway gets only ``bootstrap.gateway_context`` of it. What
is left here is what belongs to the site as a whole: its health, the broker's users (peers,
subscribers, an inviter while joining), keeping the embedded broker up, linking peers, and
stopping everything in order.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sqlite3
import time
from pathlib import Path

import structlog

from odst import tasks
from odst.bus import authorization as authz
from odst.bus.embedded import BrokerError, EmbeddedBroker, wait_for_jetstream
from odst.bus.external import AuthInclude
from odst.bus.hubs import ExternalHubWatch, HubGuard, disabled_remotes, read_hubs
from odst.bus.identity import client_seed_path, public_key_of_seed, raw_public_key, read_seed
from odst.bus.system import SYSTEM_SEED_FILE, LinkCutter, user_keys
from odst.bus.users import authorization_users, legacy_mirrors
from odst.config import Settings
from odst.datadir import DataDirLock, read_model_path, run_dir
from odst.events import catalogue as ev
from odst.events.log import EVENTS_STREAM, Appended, EventLog
from odst.events.signing import SiteKey, site_id_for
from odst.peering.registration import Registrar
from odst.projections import views
from odst.projections.appender import ConfirmedAppender
from odst.projections.db import connect as connect_read_model
from odst.projections.status import ProjectionStatus
from odst.stats import SiteStats
from odst.store.files import PackageStore, Store

log = structlog.get_logger("odst.site")

ALL_ROLES = frozenset({"projector", "gateway", "replicator"})
APPLICANT_S = 600  # how long a joined invitation's site may use the leaf port for registering
BROKER_RESTARTS = 5  # the embedded broker dying this many times in a row ends `odst serve` (exit 1)
LINK_EVERY_S = 5.0  # link_peers' pass at least this often, whatever was folded
LINK_RETRY_S = 0.25  # a peer known but not mirrored yet: tried again this soon (link_retry)
# ... for this long, then doubling up to LINK_EVERY_S: a new peer's leaf link comes up within
# its dialer's reconnect interval (1 s) of the registration; doubling from the start put the
# pass that found it up to a second later (a new site's catch-up waited 0.6-0.9 s for it)
LINK_STEADY_S = 5.0
LINK_SOON_S = 0.025  # after a redial, how often the peers' logs are looked for until the next pass
REDIAL_WAIT_S = 1.0  # how long a redial waits for the users' reload under way to be in force
# Events that change nothing link_peers looks at (peers, their keys and names, credentials):
# a package's life, and Jamf Pro's records of them.
LINK_IGNORES = frozenset(views.PACKAGE_EVENTS) | {"JamfPackageSynced", "JamfDriftDetected", "JamfDriftCleared"}


def link_retry(backoff: float | None, waited_s: float) -> float:
    """link_peers' wait before its next pass while a known peer is not mirrored yet, ``waited_s``
    into that state (``backoff``: the wait before, None at first): LINK_RETRY_S for the first
    LINK_STEADY_S, then doubling up to LINK_EVERY_S (a peer down for long is not asked for its
    log four times a second)."""
    if backoff is None or waited_s < LINK_STEADY_S:
        return LINK_RETRY_S
    return min(backoff * 2, LINK_EVERY_S)


def _peer_of(nkey: str) -> str:
    """The site whose key a NATS user NKey is (a peer's leaf identity), for the log."""
    try:
        return site_id_for(raw_public_key(nkey))
    except ValueError:
        return ""


class Site:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.data = Path(settings.data)
        self.key: SiteKey | None = None
        self.broker: EmbeddedBroker | None = None
        self.nc = None
        self.js = None
        self.events: EventLog | None = None  # the site's own signed, chained event log
        self.projection: ProjectionStatus | None = None  # a Projector, or a ReadModelWatcher of another process's
        self.writer: ConfirmedAppender | None = None  # append + wait for the fold: every writer's path
        self.commit = None  # the gateway's append: a GroupCommit, or a helper's ChainClient (bootstrap)
        self.chain_service = None  # projector role: appends the gateway helpers' events (odst.projections.handoff)
        self.registrar: Registrar | None = None
        self.store: PackageStore = Store(settings.store_dir)
        self.reader: sqlite3.Connection | None = None
        self.nats_url = ""
        self.client_nkey = ""
        self._applicants: dict[str, float] = {}  # public key (hex) -> monotonic expiry (admit_applicant)
        self.guard = None  # projector role: deletes consumers that aim the event log elsewhere
        self.lock = DataDirLock(self.data)  # held by the projector (the one read-model writer)
        self.printed_token: str | None = None
        self.linker = None
        self.mirror_resume = None  # odst.peering.mirrors.MirrorResume: listens before JetStream restores
        self.log_watch = None  # odst.events.watch.LogWatch: is EVENTS still the log the read model folded?
        self.replicator = None
        self.integrity = None  # replicator role: the one re-check of stored files (odst.replicator.integrity)
        self.healers: list = []  # the background Scrubber and RejectionWatch (odst.replicator.scrub)
        self.chunk_server = None
        self.bandwidth = None  # odst.replicator.bandwidth.Bandwidth: link limits, download caps
        self.registration = None
        self.notifier = None
        self.sessions = None  # web UI sessions (gateway role)
        self.printed_password: str | None = None
        self.roles: frozenset[str] = ALL_ROLES
        self.stats = SiteStats()
        self.tasks: list[asyncio.Task] = []
        self.jamf = None  # odst.jamf.sync.JamfService when jamf_url is set
        self.exit_code = 0  # non-zero when the site stopped itself (its broker cannot be kept up)
        self.on_fatal = None  # how a role without HTTP is told to stop (odst.cli)
        self.stopping = asyncio.Event()  # set when shutdown begins: long-lived responses end

    @property
    def id(self) -> str:
        return self.key.site_id

    @property
    def name(self) -> str:
        """This site's name: its last SiteRenamed, else the site_name setting."""
        return views.site_name(self.reader, self.id, self.settings) if self.reader is not None \
            else self.settings.site_name

    def external_seed(self) -> str | None:
        """The credential for a NATS server ODST does not run: ``nats_credentials``, else the
        data directory's client key when one was made (``odst nats-config`` makes it)."""
        if self.settings.nats_credentials:
            return read_seed(Path(self.settings.nats_credentials))
        path = client_seed_path(self.data)
        return read_seed(path) if path.exists() else None

    @functools.cached_property
    def legacy_mirrors(self) -> bool:
        """Whether this site keeps a peer's mirror made before path-labelled deliveries
        (authorization.LEGACY_DELIVERIES): any peer may then deliver into it."""
        old = legacy_mirrors(self.data / "nats" / "jetstream")
        if old:
            log.warning("mirrors made by an older ODST: any registered peer can write into them",
                        mirrors=old)
        return bool(old)

    def broker_users(self, client_nkey: str) -> str:
        """The broker's users, rendered (odst.bus.authorization.render_users)."""
        return authz.render_users(self.nats_users(client_nkey))

    def nats_users(self, client_nkey: str) -> list[dict]:
        """The broker's users: this site's processes, its peers' leaf identities, its
        subscribers, from the read model (as it is on disk before the projector runs)."""
        reader = self.reader
        if reader is None:
            if not read_model_path(self.data).exists():
                return authz.users(self.key.site_id, client_nkey, [], [], [EVENTS_STREAM])
            reader = connect_read_model(read_model_path(self.data))
        try:
            now = time.monotonic()
            self._applicants = {k: t for k, t in self._applicants.items() if t > now}
            return authorization_users(reader, self.key.site_id, client_nkey, self._applicants, self.legacy_mirrors)
        finally:
            if reader is not self.reader:
                reader.close()

    def admit_applicant(self, public_key_hex: str) -> bool:
        """This site's admin is joining an invitation from the site with this key: accept its
        leaf link (as a peer's) for APPLICANT_S, so that a firewalled inviter can be reached.
        True when the broker's users changed (its leaf link reconnects within about a second)."""
        if self.broker is None or not self.settings.leaf_listen:
            return False  # no one can dial us: nothing to admit
        known = public_key_hex in self._applicants
        self._applicants[public_key_hex] = time.monotonic() + APPLICANT_S
        return not known and self.broker.reload(self.broker_users(self.client_nkey))

    _auth_include = None  # external NATS with nats_auth_file: odst.bus.external.AuthInclude
    _link_cutter = None  # embedded broker: odst.bus.system.LinkCutter

    def sync_authorization(self) -> None:
        """Projector role: peers or subscribers changed in the read model -> reload the broker's
        users. nats-server then checks client connections again, but not an accepted leaf link,
        so after each such reload every leaf link authenticated with a key that is no user any
        more (a removed peer's, an applicant's whose time ran out) is closed, on the embedded
        broker or on every server of a NATS ODST does not run (odst.bus.system.LinkCutter, one
        log line per link, by the key nats-server verified, not the name the remote gives); its
        re-dial is refused, and the other peers' links stay up. With a NATS server ODST does
        not run, rewrite the auth.conf it includes (``nats_auth_file``); its servers reload it."""
        if self.broker is not None and self.reader is not None:
            users = self.nats_users(self.client_nkey)
            if self._link_cutter is None:
                self._link_cutter = LinkCutter(self.nats_url, self.data / SYSTEM_SEED_FILE, _peer_of,
                                               lambda: user_keys(self.nats_users(self.client_nkey)), single=True)
            changed = self.broker.reload(authz.render_users(users))
            if changed:
                log.info("NATS users updated", peers=len(views.peer_sites(self.reader, self.id)))
            if changed or self._link_cutter.pending:
                self._link_cutter.reloaded(user_keys(users))
        elif self.settings.nats_auth_file and self.reader is not None and self.external_seed():
            if self._auth_include is None:
                self._auth_include = AuthInclude(
                    self.id, Path(self.settings.nats_auth_file), self.nats_url, self.data / SYSTEM_SEED_FILE, _peer_of,
                    lambda: user_keys(self.nats_users(public_key_of_seed(self.external_seed()))))
            self._auth_include.update(self.nats_users(public_key_of_seed(self.external_seed())))

    _hub_guard = None  # odst.bus.hubs.HubGuard (embedded broker) or ExternalHubWatch

    def removed_sites(self) -> frozenset[str]:
        """The peers this site removed, from the read model (as it is on disk before the projector runs)."""
        reader = self.reader
        if reader is None:
            if not read_model_path(self.data).exists():
                return frozenset()
            reader = connect_read_model(read_model_path(self.data))
        try:
            return frozenset(r.site for r in views.removed_peers(reader))
        finally:
            if reader is not self.reader:
                reader.close()

    def dialed_off(self) -> frozenset[str]:
        """The leaf remotes the embedded broker starts with disabled: those that lead to a removed
        peer (odst.bus.hubs)."""
        off = disabled_remotes(read_hubs(self.data), self.removed_sites()) & frozenset(self.settings.leaf_remotes)
        if off:
            log.warning("leaf remotes not dialed: they lead to removed peers; this site reaches no other site "
                        "through them until leaf_remotes names another hub (a removal is for good)",
                        urls=sorted(off))
        return off

    async def guard_hubs(self) -> None:
        """Projector role: dial no hub that is a removed peer (odst.bus.hubs); with a NATS server
        ODST does not run, name each of its links to one, for the operator to remove. A failure
        is logged and the check is made again at the next pass. Not while the users' reload
        runs (``LinkCutter.busy``): a connection made during nats-server's reload was refused
        now and then (bench: an ERROR and a traceback right after a registration)."""
        if self._link_cutter is not None and self._link_cutter.busy:
            return  # checked at the next pass, once the reload is in force
        if self._hub_guard is None:
            self._hub_guard = (HubGuard(self.broker, self.data, self.data / SYSTEM_SEED_FILE) if self.broker is not None
                               else ExternalHubWatch(self.nats_url, self.data / SYSTEM_SEED_FILE))
        try:
            await self._hub_guard.check(self.removed_sites())
        except Exception as exc:
            log.error("the hubs this site dials were not checked against its removed peers; retrying",
                      error=f"{type(exc).__name__}: {exc}")

    async def redial_hubs(self) -> bool:
        """Projector role, while a newly known peer is not mirrored: the embedded broker dials
        at once each hub it has no link to (``HubGuard.redial``), instead of within its
        reconnect interval (1 s) of the hub admitting this site. After the users' reload, as
        ``guard_hubs``; a failure is left to the next pass. True if a hub was dialed."""
        if self.broker is None or not self.settings.leaf_remotes:
            return False
        if self._link_cutter is not None and not await self._link_cutter.settled(REDIAL_WAIT_S):
            return False
        try:
            redialed = await HubGuard(self.broker, self.data, self.data / SYSTEM_SEED_FILE).redial()
        except Exception as exc:
            log.debug("hubs not dialed again; the next pass will", error=f"{type(exc).__name__}: {exc}")
            return False
        if redialed:
            log.debug("hubs with no link dialed again", urls=sorted(redialed))
        return bool(redialed)

    def _unlinked(self) -> bool:
        """Is a known peer's log not mirrored here yet?"""
        return any(p.site not in self.linker.linked for p in views.peer_sites(self.reader, self.id))

    async def _mirror_soon(self, until: float) -> None:
        """Just after a redial, until the next pass (``until``, loop time): look for the
        unmirrored peers' logs every LINK_SOON_S (``Linker.sync`` alone: one request a peer, no
        redial, which would cost a link just up). A link comes up within milliseconds of its
        dial; the next whole pass came LINK_RETRY_S later (a new site's first event mirrored
        0.25 s after its registration)."""
        loop = asyncio.get_running_loop()
        while loop.time() + LINK_SOON_S < until:
            await asyncio.sleep(LINK_SOON_S)
            await self.linker.sync()
            if not self._unlinked():
                return

    async def resume_jetstream(self, reconnect_s: float = 0) -> None:
        """Turn the embedded broker's JetStream on once this connection listens for its
        mirrors' consumer requests (odst.bus.embedded): within ``reconnect_s`` of a broker
        restart, once the connection is back, its subscriptions with it."""
        if self.broker is None:
            return
        deadline = asyncio.get_running_loop().time() + reconnect_s
        while not self.nc.is_connected and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        try:
            await self.nc.flush(timeout=2)
        except Exception:
            pass  # not back yet: JetStream goes on all the same
        if self.broker.enable_jetstream():
            # as long as a start gives JetStream (until_ready, 90 s) to restore a large store;
            # a JetStream nats-server will not start fails at once
            await wait_for_jetstream(self.nc, timeout=90, refused=self.broker.jetstream_refused)

    async def supervise_broker(self) -> None:
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
                await self.resume_jetstream(reconnect_s=10)
                continue
            except (BrokerError, OSError) as exc:
                failures += 1
                log.error("broker restart failed", error=str(exc)[-500:], failures=failures)
                # a broker whose JetStream did not come on (resume_jetstream) runs on without
                # it, alive to the check above: stop it, so that it is restarted (or, after
                # BROKER_RESTARTS, the site stops) instead of serving on with no log
                await loop.run_in_executor(None, self.broker.stop)
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

    async def link_peers(self) -> None:
        """Projector role: mirror every peer the read model learns of, as soon as it does.

        A pass (mirrors, the broker's users, the peers' logs) runs when an event other than a
        package's was folded (peers, sites, credentials: ``views.folded_types``), and every
        LINK_EVERY_S whatever happened (an applicant's admission running out); while a known
        peer is not mirrored yet (its leaf link coming up), every LINK_RETRY_S, then doubling
        (``link_retry``).
        Package events, the bulk of a busy log, wake it for one indexed query."""
        loop = asyncio.get_running_loop()
        cursor, passed_at = -1, -LINK_EVERY_S
        every, backoff = LINK_EVERY_S, None  # shorter while a known peer is not mirrored yet (its leaf link coming up)
        unlinked_at = None  # since when a known peer is not mirrored
        while True:
            try:
                due = cursor < 0 or loop.time() - passed_at >= every
                if not due:
                    upto, types = views.folded_types(self.reader, cursor)
                    due = upto < cursor or not types <= LINK_IGNORES
                    cursor = upto
                if due:
                    cursor, passed_at = views.last_position(self.reader), loop.time()
                    await self.linker.sync()
                    self.sync_authorization()
                    await self.guard_hubs()
                    await self.linker.watch()
                    unlinked = self._unlinked()
                    if not unlinked:
                        backoff, every, unlinked_at = None, LINK_EVERY_S, None
                    else:
                        unlinked_at = loop.time() if unlinked_at is None else unlinked_at
                        redialed = loop.time() - unlinked_at < LINK_STEADY_S and await self.redial_hubs()
                        backoff = every = link_retry(backoff, loop.time() - unlinked_at)
                        if redialed:
                            await self._mirror_soon(passed_at + every)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                cursor = -1  # the next wake makes a whole pass
                log.warning("linking peers failed; retrying", error=f"{type(exc).__name__}: {exc}")
            await self.projection.wait_changed(max(0.0, passed_at + every - loop.time()))

    async def caught_up(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            lag = await self.projection.lag()
            if not any(lag.values()):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"projector still behind after {timeout}s: {lag}")
            await self.projection.wait_changed(0.5)

    async def append(self, event: ev.Event, *, actor: str, wait: float = 30.0) -> Appended:
        """The one write path (``ConfirmedAppender``): append, then wait until the read model applied it."""
        return await self.writer.append(event, actor=actor, wait=wait)

    async def health(self) -> tuple[bool, str]:
        if self.nc is None or not self.nc.is_connected:
            return False, "broker not connected"
        if self.broker is not None and self.broker.problem():
            return False, self.broker.problem()
        if self.log_watch is not None and self.log_watch.problems:
            return False, self.log_watch.reason()
        if self.projection.error:
            return False, f"projector: {self.projection.error}"
        try:
            lag = await asyncio.wait_for(self.projection.lag(), 5)
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
        if self.events is not None and (self.events.contention or self.stats.appends):
            # how this process's appends went: handed to the chain's owner, or appended here, and how
            # often another writer of the same log got in first (odst.projections.handoff)
            log.info("event appends this run", pid=os.getpid(), roles="+".join(sorted(self.roles)),
                     **{**self.stats.appends, **self.events.contention})
        await tasks.cancel(*self.tasks)
        if self.mirror_resume:
            await self.mirror_resume.stop()
        if self.jamf:
            await self.jamf.stop()
        if self.notifier:
            await self.notifier.stop()
        if self.guard:
            await self.guard.stop()
        for healer in self.healers:
            await healer.stop()
        if self.replicator:
            await self.replicator.stop()
        for service in (self.chunk_server, self.registration):
            if service:
                await service.stop()
        if self.chain_service:
            await self.chain_service.stop()
        if self.log_watch:
            await self.log_watch.stop()
        for cutter in (self._link_cutter, self._auth_include and self._auth_include.cutter):
            if cutter is not None:
                await cutter.stop()
        if self.projection:
            await self.projection.stop()
        if self.sessions:
            self.sessions.close()
        if self.nc:
            # every component is stopped and every publish was awaited; drain() would wait up to
            # 30 s for messages that stopped subscribers (ordered consumers) will never take
            try:
                await self.nc.flush(timeout=2)
            except Exception:
                pass
            try:
                async with asyncio.timeout(5):  # with the broker gone, close must not wait on it
                    await self.nc.close()
            except TimeoutError:
                log.warning("the broker connection did not close in 5 s; left behind")
        if self.broker:
            await asyncio.get_running_loop().run_in_executor(None, self.broker.stop)
        if self.lock.fd is not None:
            (run_dir(self.data) / "site.json").unlink(missing_ok=True)
        self.lock.release()
