"""GET /metrics: Prometheus text format, built from the site's state at scrape time."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from odst.events.watch import LogWatch, log_watch_metrics
from odst.peering.mirrors import Linker
from odst.projections import views
from odst.projections.status import ProjectionStatus
from odst.replicator.integrity import Integrity
from odst.replicator.replicator import Replicator
from odst.replicator.scrub import read_status
from odst.replicator.transport import ChunkServer
from odst.stats import SiteStats


@dataclass(frozen=True)
class MetricSources:
    """What /metrics reads; the parts a process does not run are None."""

    site_id: str
    reader: sqlite3.Connection
    stats: SiteStats
    projection: ProjectionStatus
    log_watch: LogWatch | None
    linker: Linker | None
    replicator: Replicator | None
    chunk_server: ChunkServer | None
    bandwidth: Any = None  # odst.replicator.bandwidth.Bandwidth
    download_gate: Any = None  # odst.gateway.egress.DownloadGate
    integrity: Integrity | None = None  # re-check counts (the replicator role)
    store_root: Path | None = None  # where the scrub keeps its state (any process may read it)


class SiteCollector:
    def __init__(self, site: MetricSources):
        self.site = site
        self.lag: dict[str, int] = {}
        self.mirrors: dict[str, dict] = {}

    async def refresh(self) -> None:
        """The parts that need the broker (projection lag, mirror state) are fetched before a scrape."""
        site = self.site
        try:
            self.lag = await site.projection.lag()
        except Exception:
            self.lag = {}
        self.mirrors = {}
        if site.linker is not None:
            for p in views.peer_sites(site.reader, site.site_id):
                self.mirrors[p.site] = await site.linker.status(p.site)

    def collect(self):
        site, stats = self.site, self.site.stats
        c = CounterMetricFamily("odst_uploads", "Uploads through this gateway, by result", labels=["result"])
        for result, n in sorted(stats.uploads.items()):
            c.add_metric([result], n)
        yield c
        c = CounterMetricFamily("odst_downloads", "Distribution-point responses, by status", labels=["status"])
        for status, n in sorted(stats.downloads.items()):
            c.add_metric([str(status)], n)
        yield c
        yield CounterMetricFamily("odst_bytes_served", "Package bytes sent to clients", value=stats.bytes_served)
        c = CounterMetricFamily("odst_event_appends", "The gateway's appends to the event log: rounds (groups "
                                "of events appended in one round trip and one fold wait; one by one if the "
                                "broker refused the group as a whole) and the events they carried", labels=["kind"])
        for kind in ("rounds", "events"):
            c.add_metric([kind], stats.appends[kind])
        yield c
        rep = site.replicator
        transfers = rep.transfers() if rep else []
        g = GaugeMetricFamily("odst_replication_queue", "Contents this site still has to pull, by status",
                              labels=["status"])
        for status in ("pending", "downloading", "failed"):
            g.add_metric([status], sum(1 for t in transfers if t["status"] == status))
        yield g
        yield GaugeMetricFamily("odst_replication_rate_bytes", "Bytes per second being pulled now",
                                value=sum(t["rate_bytes_per_s"] for t in transfers))
        c = CounterMetricFamily("odst_chunk_failures", "Chunks that failed verification, by peer",
                                labels=["peer"])
        for peer, n in sorted((rep.bad_chunks if rep else {}).items()):
            c.add_metric([peer], n)
        yield c
        c = CounterMetricFamily("odst_chunks_served", "Chunks served to peers, by peer", labels=["peer"])
        for peer, n in sorted((site.chunk_server.served if site.chunk_server else {}).items()):
            c.add_metric([peer], n)
        yield c
        g = GaugeMetricFamily("odst_mirror_lag", "Events a peer's mirror is behind its origin", labels=["peer"])
        up = GaugeMetricFamily("odst_mirror_up", "1 if the peer's mirror is in contact", labels=["peer"])
        for peer, m in sorted(self.mirrors.items()):
            g.add_metric([peer], m.get("lag") or 0)
            up.add_metric([peer], 1 if m.get("link") == "up" else 0)
        yield g
        yield up
        g = GaugeMetricFamily("odst_peer_log_diverged",
                              "1 while a peer's log no longer matches this site's mirror of it (PeerLogDiverged)",
                              labels=["peer"])
        alarms = views.peer_log_alarms(site.reader, site.site_id)
        for peer in sorted(self.mirrors):
            g.add_metric([peer], 1 if peer in alarms else 0)
        yield g
        g = GaugeMetricFamily("odst_projection_lag", "Messages not yet folded into the read model",
                              labels=["stream"])
        for stream, n in sorted(self.lag.items()):
            g.add_metric([stream], n)
        yield g
        yield GaugeMetricFamily("odst_quarantined_events", "Messages that failed verification or the chain",
                                value=site.reader.execute(
                                    "SELECT count(*) FROM quarantine WHERE kind='quarantined'").fetchone()[0])
        yield GaugeMetricFamily("odst_packages", "Current packages", value=views.count(site.reader, "packages"))
        yield from scrub_metrics(site)
        yield from log_watch_metrics(site.log_watch, site.reader)
        yield from bandwidth_metrics(site)


def bandwidth_metrics(site: MetricSources):
    """Per link and direction: the limit in force, paused or not, the measured rate; download caps."""
    bw = site.bandwidth
    if bw is not None:
        limit = GaugeMetricFamily("odst_link_limit_bytes_per_second",
                                  "Replication limit in force now (0: unlimited)", labels=["peer", "direction"])
        paused = GaugeMetricFamily("odst_link_paused", "1 while the link's timetable pauses it",
                                   labels=["peer", "direction"])
        rate = GaugeMetricFamily("odst_link_rate_bytes_per_second", "Replication bytes per second measured "
                                 "over the last seconds", labels=["peer", "direction"])
        for p in views.peer_sites(site.reader, site.site_id):
            status = bw.link_status(p.site)
            for direction in ("send", "receive"):
                d = status[direction]
                limit.add_metric([p.site, direction], d["limit_bps"])
                paused.add_metric([p.site, direction], 1 if d["state"] == "paused" else 0)
                rate.add_metric([p.site, direction], d["measured_bps"])
        yield limit
        yield paused
        yield rate
    gate = site.download_gate
    if gate is not None:
        s = gate.status()
        yield GaugeMetricFamily("odst_downloads_active", "Mac downloads in progress", value=s["active"])
        yield GaugeMetricFamily("odst_downloads_max_concurrent", "Cap on downloads at once (0: none)",
                                value=s["max_concurrent"])
        yield GaugeMetricFamily("odst_download_egress_limit_bytes_per_second",
                                "Cap on total download egress (0: none)", value=s["egress_bps"])
        yield GaugeMetricFamily("odst_download_rate_bytes_per_second", "Download bytes per second measured",
                                value=s["measured_bps"])
        yield CounterMetricFamily("odst_downloads_refused", "Downloads answered 503 + Retry-After by a cap",
                                  value=s["refused"])


def make_metrics(site: MetricSources):
    registry = CollectorRegistry(auto_describe=False)
    collector = SiteCollector(site)
    registry.register(collector)

    async def render() -> tuple[bytes, str]:
        await collector.refresh()
        return generate_latest(registry), CONTENT_TYPE_LATEST

    return render


def scrub_metrics(site: MetricSources):
    """The background scrub (its state file, shared by the site's processes) and re-checks."""
    scrub = read_status(site.store_root) if site.store_root is not None else {}
    yield CounterMetricFamily("odst_scrub_bytes", "Bytes of stored packages the background scrub re-hashed",
                              value=scrub.get("bytes_total", 0))
    yield CounterMetricFamily("odst_scrub_damaged_found", "Damaged or missing files the scrub found",
                              value=scrub.get("damaged_total", 0))
    yield GaugeMetricFamily("odst_scrub_last_full_pass_timestamp_seconds",
                            "When the scrub last finished a pass over the whole store (0: not yet)",
                            value=scrub.get("last_full_pass", 0))
    yield GaugeMetricFamily("odst_scrub_rate_bytes", "Bytes per second the scrub reads at (this pass)",
                            value=scrub.get("rate", 0))
    total = scrub.get("pass_total", 0)
    yield GaugeMetricFamily("odst_scrub_pass_progress", "Share of the pass in progress done (0..1)",
                            value=min(1.0, scrub.get("pass_bytes", 0) / total) if total and scrub.get("cursor") else 0)
    yield GaugeMetricFamily("odst_packages_damaged", "Packages out of service here: damaged, awaiting repair",
                            value=len(views.damaged(site.reader, site.site_id)))
    c = CounterMetricFamily("odst_integrity_rechecks", "Re-checks of stored packages, by trigger and result",
                            labels=["trigger", "result"])
    for (trigger, result), n in sorted((site.integrity.rechecks if site.integrity else {}).items()):
        c.add_metric([trigger, result], n)
    yield c
