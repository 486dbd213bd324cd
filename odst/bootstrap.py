"""The composition root: ``build(settings, roles)`` starts the parts of a site this process runs.

Each component is created here with only what it uses (the site id, its key, the broker,
the read model, the store, the write path, its settings); nothing below takes the whole
site. ``odst serve`` runs every role in one process over the embedded broker and holds the
data directory exclusively; ``odst projector|gateway|replicator`` run one role each against
a shared NATS (``--nats``) and data directory, where exactly one projector writes the read
model and the others read it. What ``build`` returns, a ``Site``, is what the CLI stops and
what ``gateway_context`` hands to the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from functools import partial
from pathlib import Path

import nats.errors
import structlog

from odst.accounts import passwords
from odst.accounts.sessions import SessionStore
from odst.accounts.tokens import token_digest
from odst.bus import authorization as authz
from odst.bus import connect, until_ready
from odst.bus.embedded import BrokerConfig, EmbeddedBroker
from odst.bus.guard import ConsumerGuard
from odst.bus.identity import load_or_create_client_seed, public_key_of_seed
from odst.bus.system import load_or_create_system_seed
from odst.config import ConfigError, Settings
from odst.datadir import SiteBusy, key_path, read_model_path, run_dir
from odst.events import catalogue as ev
from odst.events import codec
from odst.events.log import EVENTS_STREAM, AppendFailed, EventLog
from odst.events.signing import SiteKey
from odst.events.watch import AlertBook, watch_own_log
from odst.gateway.context import GatewayContext
from odst.gateway.egress import DownloadGate
from odst.gateway.metrics import MetricSources
from odst.notify.dispatcher import Dispatcher
from odst.notify.ledger import Ledger
from odst.notify.mailer import Mailer
from odst.notify.service import Notifier, Pruner
from odst.notify.webhooks import WebhookSender
from odst.peering.mirrors import Linker, MirrorResume
from odst.peering.registration import Registrar, RegistrationService
from odst.projections import views
from odst.projections.appender import ConfirmedAppender
from odst.peering.requests import SharedNonces
from odst.projections.batch import GroupCommit
from odst.projections.db import connect as connect_read_model
from odst.projections.handoff import ChainClient, ChainService
from odst.projections.projector import Projector
from odst.projections.watcher import ReadModelWatcher
from odst.replicator.bandwidth import Bandwidth, site_timezone
from odst.replicator.integrity import Integrity
from odst.replicator.replicator import Replicator
from odst.replicator.scrub import RejectionWatch, Scrubber
from odst.replicator.transport import ChunkServer
from odst.site import ALL_ROLES, Site
from odst.store.hashing import hash_file

log = structlog.get_logger("odst.bootstrap")
FOUND_WAIT_S = 90.0  # how long a first start asks a broker that takes no event yet (inside the 120 s duplicate window)


async def _found(events: EventLog, founded: ev.SiteFounded) -> None:
    """The site's first event, unless its log has one. A cluster just formed (its stream's
    leader not elected yet, a loaded machine) may answer nothing for a while: the head is read
    again and the event sent again, for FOUND_WAIT_S (within the stream's duplicate window).
    Every try carries the same event id: a try that went unanswered but is stored after the
    head was read makes the next one a duplicate, answered with it, never a second founding."""
    deadline = time.monotonic() + FOUND_WAIT_S
    event_id = codec.new_event_id()
    while True:
        try:
            if (await events.head())[0] != 0:
                return
            await events.append(founded, actor="system", event_id=event_id)
            return
        except (AppendFailed, nats.errors.Error) as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("the broker did not take the site's first event yet; asking again", error=str(exc))
            events.forget_head()
            await asyncio.sleep(1.0)

STALE_TEMP_S = 6 * 3600  # a temp file untouched this long, with other processes about, is abandoned


async def build(settings: Settings, roles: frozenset[str] = ALL_ROLES, *, bootstrap: bool = True) -> Site:
    """Start the parts of a site this process runs; on failure, stop what was started and raise."""
    site = Site(settings)
    try:
        await _open(site, frozenset(roles), bootstrap)
    except BaseException:
        await site.close()
        raise
    return site


async def _open(site: Site, roles: frozenset[str], bootstrap: bool) -> None:
    settings, data = site.settings, site.data
    site.roles = roles
    unknown = roles - ALL_ROLES
    if unknown or not roles:
        raise ValueError(f"unknown roles {sorted(unknown)}")
    all_in_one = roles == ALL_ROLES
    if not all_in_one and not settings.nats:
        raise SiteBusy("a single role shares its broker with the others: pass --nats URL "
                       "(or run everything in one process with `odst serve`)")
    data.mkdir(parents=True, exist_ok=True)
    if all_in_one or "projector" in roles:
        site.lock.acquire()  # one projector (one read-model writer) per data directory
    site.key = key = SiteKey.load_or_create(key_path(data))
    site_id = key.site_id
    structlog.contextvars.bind_contextvars(site=site_id)

    # the broker: embedded (odst serve), or one ODST does not run (--nats)
    if settings.nats:
        site.nats_url = settings.nats
        seed = site.external_seed()
    else:
        seed = load_or_create_client_seed(data)
        site.broker = site_broker(settings, key, authorization=site.broker_users(public_key_of_seed(seed)),
                                  disabled_remotes=site.dialed_off())
        site.nats_url = site.broker.start(defer_jetstream=True)  # on below, once we listen
        site.client_nkey = public_key_of_seed(seed)
    site.nc = nc = await connect(site.nats_url, seed=seed, site=site_id,
                                 name=f"odst-{site_id}-{'+'.join(sorted(roles))}",
                                 max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    if all_in_one or "projector" in roles:  # the role that makes the mirrors
        site.mirror_resume = await MirrorResume(site_id=site_id, nc=nc).start()
    await site.resume_jetstream()
    site.js = js = nc.jetstream(timeout=10)
    if settings.nats:
        info = await until_ready(js.account_info, timeout=90)
        domain = info.domain or ""
        if domain != site_id:
            raise SiteBusy(
                f"the NATS server at {site.nats_url} has JetStream domain {domain or '(none)'!r}; ODST needs "
                f"the site id {site_id!r} (print it with `odst site-id --data {data}`) as "
                "domain in its jetstream block, or peers' mirrors of this site never sync")

    # the log, the projection of it, the write path
    site.events = events = EventLog(js, key, replicas=settings.stream_replicas)
    restored = await until_ready(events.ensure_stream, timeout=90)
    site.store.ensure()
    if "projector" in roles:
        site.projection = Projector(js, read_model_path(data), {site_id: key.public_key}, [EVENTS_STREAM])
        site.reader = connect_read_model(read_model_path(data))
        site.projection.start()
    else:
        site.projection = ReadModelWatcher(js, read_model_path(data))
        await site.projection.wait_ready(site_id, timeout=120)
        site.reader = connect_read_model(read_model_path(data))
    reader, projection = site.reader, site.projection
    events.chain_state = partial(views.chain_state, reader, EVENTS_STREAM, site_id)  # where the head starts
    site.writer = ConfirmedAppender(events, projection, reader)
    append = site.writer.append
    # the gateway's appends (uploads side by side: one round trip): one writer per chain. The
    # projector's process owns it and appends for the gateway helpers too (odst.projections.handoff)
    site.commit = GroupCommit(site.writer.append, site.writer.append_many, counts=site.stats.appends,
                              wait_s=settings.apply_wait_s)
    if "projector" in roles:
        site.chain_service = await ChainService(nc, site_id, site.commit).start()
    elif "gateway" in roles:
        site.commit = ChainClient(nc, key, site.commit, wait_s=settings.apply_wait_s, counts=site.stats.appends)
    recorded = lambda: views.recorded(reader, EVENTS_STREAM, site_id)  # noqa: E731
    site.linker = Linker(site_id=site_id, nc=nc, js=js, reader=reader, append=append,
                         projection=projection, replicas=events.replicas)

    if "projector" in roles:
        site.log_watch = await watch_own_log(events, recorded, data=data, restored=restored)
        if projection.checkpoint(EVENTS_STREAM) == 0:
            await _found(events, ev.SiteFounded(site=site_id, public_key=key.public_key.hex(),
                                                name=settings.site_name))
        await site.caught_up(timeout=120)
        # a crashed upload or pull leaves temp files; alone on the data dir, sweep them all
        await _adopt_spellings(site.store, reader, site_id, append)  # files an older ODST named by spelling
        site.store.sweep(views.published_names(reader, site_id), older_than_s=0 if all_in_one else STALE_TEMP_S)
        if bootstrap and site.log_watch.healthy:
            await _bootstrap_admin_token(site)
            await _bootstrap_admin_user(site)
        await site.linker.sync()
        site.sync_authorization()
        site.tasks.append(asyncio.create_task(site.link_peers(), name="linker"))
        site.guard = await ConsumerGuard(nc, js, site_id,
                                         lambda: [s.name for s in views.nats_subscribers(reader)]).start()
    else:
        site.log_watch = await watch_own_log(events, recorded, data=None)
    if site.broker is not None:
        site.tasks.append(asyncio.create_task(site.supervise_broker(), name="broker-supervisor"))

    site.bandwidth = Bandwidth(site_id=site_id, reader=reader, tz=site_timezone(settings))
    site.chunk_server = ChunkServer(site_id=site_id, key=key, nc=nc, reader=reader, store=site.store,
                                    bandwidth=site.bandwidth, run_chunks=settings.peer_run_chunks,
                                    nonces=await SharedNonces(js, replicas=events.replicas).open())
    if "replicator" in roles:
        await site.chunk_server.start()  # serve chunks over NATS (queue group across replicators)
        site.replicator = Replicator(site_id=site_id, key=key, nc=nc, js=js, reader=reader, store=site.store,
                                     append=append, projection=projection,
                                     settings=settings, replicas=events.replicas, bandwidth=site.bandwidth)
        await site.replicator.start()
        site.integrity = Integrity(reader=reader, store=site.store, site_id=site_id, append=append,
                                   kick=site.replicator.kick)
        site.healers = [
            Scrubber(integrity=site.integrity, reader=reader, site_id=site_id, store_root=settings.store_dir,
                     period_s=settings.scrub_period_s, min_rate=settings.scrub_min_rate,
                     max_rate=settings.scrub_max_rate).start(),
            RejectionWatch(integrity=site.integrity, reader=reader, site_id=site_id,
                           wait_changed=projection.wait_changed, rate=settings.scrub_max_rate).start()]
    site.registrar = Registrar(site_id=site_id, key=key, settings=settings, reader=reader, append=append,
                               nc=nc, admit_applicant=site.admit_applicant)
    if "gateway" in roles:
        site.sessions = SessionStore(data / "sessions.sqlite", idle_s=settings.session_idle_s,
                                     max_s=settings.session_max_s)
        site.registration = RegistrationService(site.registrar)
        await site.registration.start()
    if roles & {"projector", "replicator"}:
        site.notifier = await _notifier(site, roles).start()  # webhooks and email digests
    site.jamf = _jamf(site)  # Jamf Pro integration (odst.jamf): None without jamf_url
    if site.jamf is not None and "projector" in roles and site.jamf.configured:
        site.jamf.start()  # the one writer of Jamf Pro's records
    if all_in_one or "projector" in roles:
        (run_dir(data) / "site.json").write_text(json.dumps(
            {"pid": os.getpid(), "site": site_id, "nats": site.nats_url, "http": settings.http}))
    log.info("site open", data=str(data), nats=site.nats_url, roles=sorted(roles))


def site_broker(settings: Settings, key: SiteKey, *, authorization: str = "", private_for: str = "",
                disabled_remotes: frozenset[str] = frozenset()) -> EmbeddedBroker:
    """The embedded nats-server of a data directory. Serving (``authorization``: the rendered
    users): on ``nats_listen`` with the leaf links (but ``disabled_remotes``: odst.bus.hubs)
    and the spoke's deny lists. ``private_for``
    a client NKey (``odst audit|rebuild|recover`` with no site running): any free port, no
    leaf links, only that client."""
    data = Path(settings.data)
    if private_for:
        return EmbeddedBroker(
            BrokerConfig(site=key.site_id, store_dir=data / "nats", sync_interval=settings.sync_interval,
                         extra=f'authorization {{ users: [ {{ nkey: "{private_for}" }} ] }}'),
            run_dir(data))
    host, port = settings.nats_listen.rsplit(":", 1)
    return EmbeddedBroker(
        BrokerConfig(site=key.site_id, store_dir=data / "nats", host=host, port=int(port),
                     sync_interval=settings.sync_interval, leaf_listen=settings.leaf_listen or None,
                     leaf_remotes=list(settings.leaf_remotes), disabled_remotes=disabled_remotes,
                     authorization=authorization,
                     leaf_seed=key.nkey_seed(),
                     leaf_deny_imports=authz.remote_deny_imports(key.site_id),
                     leaf_deny_exports=authz.remote_deny_exports(key.site_id),
                     system_nkey=public_key_of_seed(load_or_create_system_seed(data))),
        run_dir(data))


def _notifier(site: Site, roles: frozenset[str]) -> Notifier:
    """Fan-out, email digests and pruning once per site (with the projector); webhook
    delivery with every replicator (they share one durable consumer)."""
    ledger = Ledger(site.data)
    parts: list = []
    if "projector" in roles:
        parts += [Dispatcher(site_id=site.id, js=site.js, reader=site.reader, projection=site.projection,
                             replicas=site.events.replicas, ledger=ledger, alerts=AlertBook(site.data)),
                  Mailer(site_id=site.id, reader=site.reader, settings=site.settings, ledger=ledger),
                  Pruner(ledger)]
    if "replicator" in roles:
        parts.append(WebhookSender(site_id=site.id, key=site.key, js=site.js, reader=site.reader,
                                   settings=site.settings, replicas=site.events.replicas, ledger=ledger))
    return Notifier(ledger, parts)


def _jamf(site: Site):
    """The Jamf Pro service over this site's read model and log (None without jamf_url)."""
    if not site.settings.jamf_url:
        return None
    from odst.jamf.digests import Digests, digests_path
    from odst.jamf.sync import Deps, JamfService
    reader, settings = site.reader, site.settings
    return JamfService(Deps(settings=settings, site_id=site.id, reader=reader,
                            accepted_stages=lambda: views.replicated_stages(reader, settings),
                            append=lambda event: site.append(event, actor="jamf"),
                            store_path=site.store.path, wait_changed=site.projection.wait_changed,
                            digests=Digests(digests_path(site.data))))


def gateway_context(site: Site) -> GatewayContext:
    """What the gateway's handlers may use of a running site (``create_app`` takes it)."""
    gate = DownloadGate(site.bandwidth.download_caps)  # this gateway process's download caps
    return GatewayContext(
        id=site.id, roles=site.roles, settings=site.settings, key=site.key, data=site.data, nats_url=site.nats_url,
        js=site.js, reader=site.reader, store=site.store, projection=site.projection,
        append=site.commit,  # uploads side by side: one round trip, one writer per chain
        sessions=site.sessions, stats=site.stats, stopping=site.stopping, health=site.health,
        registrar=site.registrar, linker=site.linker, jamf=site.jamf,
        replicator=site.replicator, chunk_server=site.chunk_server, integrity=site.integrity,
        bandwidth=site.bandwidth, download_gate=gate,
        metrics=MetricSources(site_id=site.id, reader=site.reader, stats=site.stats, projection=site.projection,
                              log_watch=site.log_watch, linker=site.linker, replicator=site.replicator,
                              chunk_server=site.chunk_server, integrity=site.integrity,
                              store_root=site.settings.store_dir, bandwidth=site.bandwidth, download_gate=gate))


async def _adopt_spellings(store, reader, site_id: str, append) -> None:
    """Files an older ODST named by spelling take the key of their name (Store.adopt_spellings).
    Where spellings that were two packages were two files here, the current package's is kept;
    if this site's latest report was of the other content, it says again that it holds the
    current one (PackageAvailable), so that what it serves (view 'serving') is what its one file
    holds. Checked by hashing the file, and only where the two differ."""
    targets = views.adoption_targets(reader, site_id)
    store.adopt_spellings(targets)
    serving = views.file_holders(reader, site_id)
    for key, blake3 in sorted(targets.items()):
        if serving.get(key) == blake3 or not store.path(key).exists():
            continue
        if (await asyncio.to_thread(hash_file, store.path(key))).blake3 != blake3:
            continue  # the file holds another content (pulled over this one): the replicator pulls it again
        pkg = views.package(reader, key)
        if pkg is None or pkg.blake3 != blake3:
            continue
        try:
            await append(ev.PackageAvailable(
                name=pkg.name, size=pkg.size, sha1=pkg.sha1, sha512=pkg.sha512, blake3=blake3,
                chunk_size=pkg.chunk_size, chunks=list(pkg.chunks), stage=pkg.stage,
                origin=pkg.origin, uploaded_ts=pkg.uploaded_at, uploaded_by=pkg.uploaded_by),
                actor="system")
        except AppendFailed as exc:  # served as before; the next start tries again
            log.warning("could not record the package file kept", package=pkg.name, error=str(exc))
            continue
        log.warning("package file kept under the key of its name", package=pkg.name)


async def _bootstrap_admin_token(site: Site) -> None:
    if views.tokens(site.reader, site.id):
        return
    given = os.environ.get("ODST_ADMIN_TOKEN", "")
    token = given or "odst_" + secrets.token_urlsafe(32)
    await site.append(ev.TokenCreated(token_id=secrets.token_hex(8), name="bootstrap admin",
                                      role="admin", token_sha256=token_digest(token)),
                      actor="system")
    if not given:
        site.printed_token = _show_once(site, "admin-token", "Bootstrap admin token", token)


async def _bootstrap_admin_user(site: Site) -> None:
    """A site with no users gets ``admin`` (ODST_ADMIN_PASSWORD, or a generated one shown once)."""
    if site.reader.execute("SELECT 1 FROM users LIMIT 1").fetchone():
        return
    given = os.environ.get("ODST_ADMIN_PASSWORD", "")
    password = given or secrets.token_urlsafe(12)
    try:
        passwords.check_new_password(password, "admin")
    except passwords.PasswordRejected as exc:
        raise ConfigError(f"ODST_ADMIN_PASSWORD: {exc.detail}") from None
    await site.append(ev.UserCreated(username="admin", role="admin", display_name="Administrator",
                                     password_sealed=await passwords.seal_async(site.key, password)),
                      actor="system")
    if not given:
        site.printed_password = _show_once(site, "admin-password", "Web UI sign-in: user admin, password",
                                           password)


def _show_once(site: Site, filename: str, label: str, secret: str) -> str:
    """Write a generated secret to <data>/<filename> (mode 0600) and print it once."""
    path = site.data / filename
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    print(f"{label} (shown once, also in {path}):\n{secret}", file=sys.stderr, flush=True)
    return secret
