"""What the gateway's handlers may use of the running site: one typed object on ``app.state.site``.

``odst.bootstrap.gateway_context`` fills it; a handler reads ``request.app.state.site``. The
parts a process does not run (the replicator, the chunk server's NATS side) are None.
"""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from odst.accounts.sessions import SessionStore
from odst.config import Settings
from odst.events.signing import SiteKey
from odst.gateway.metrics import MetricSources
from odst.peering.mirrors import Linker
from odst.peering.registration import Registrar
from odst.projections.appender import Append
from odst.projections import views
from odst.projections.status import ProjectionStatus
from odst.replicator.integrity import Integrity
from odst.replicator.replicator import Replicator
from odst.replicator.transport import ChunkServer
from odst.stats import SiteStats
from odst.store.files import PackageStore


@dataclass(frozen=True)
class GatewayContext:
    id: str  # this site's id
    roles: frozenset[str]  # the roles this process runs (projector, gateway, replicator)
    settings: Settings
    key: SiteKey  # derives webhook and password-box secrets; signs nothing in the gateway itself
    data: Path  # the data directory (the gateway's lock files and the notification ledger)
    nats_url: str  # told to subscribers (credentials)
    js: Any  # JetStream: recovery pages of a peer's mirror
    reader: sqlite3.Connection  # the read model
    store: PackageStore
    append: Append  # the one write path: append, then wait for the fold (grouped: odst.projections.batch)
    projection: ProjectionStatus
    sessions: SessionStore | None
    stats: SiteStats
    stopping: asyncio.Event  # set when shutdown begins: long-lived responses end
    health: Callable[[], Awaitable[tuple[bool, str]]]
    registrar: Registrar
    linker: Linker
    replicator: Replicator | None
    chunk_server: ChunkServer
    metrics: MetricSources
    jamf: Any = None  # odst.jamf.sync.JamfService when jamf_url is set
    bandwidth: Any = None  # odst.replicator.bandwidth.Bandwidth: link limits, urgency, download caps
    download_gate: Any = None  # odst.gateway.egress.DownloadGate: caps on Mac downloads
    integrity: Integrity | None = None  # replicator role: re-checks (odst verify runs them here too)

    @property
    def name(self) -> str:
        """This site's name: its last SiteRenamed, else the site_name setting."""
        return views.site_name(self.reader, self.id, self.settings)
