"""Mirrors of peers' event streams: one ``PEER_<site>`` per known site, projected after verification.

A site learns peers from PeerRegistered events (its own, and those of sites it
trusts), so every site ends up mirroring every site of the network directly
through the leaf tree with ``$JS.<site>.API`` — no relaying, no echo.
"""

from __future__ import annotations

import json
import sqlite3
import time

import structlog
from nats.js import api

from odst.bus.streams import ensure_stream, find_stream
from odst.events import catalogue as ev
from odst.projections import views
from odst.projections.appender import Append
from odst.projections.status import ProjectionStatus

log = structlog.get_logger("odst.linker")

WATCH_EVERY_S = 5.0  # how often peers' logs are compared with their mirrors here
STREAM_NOT_FOUND = 10059  # JetStream's error code
APPEND_ONLY = {"max_msgs": -1, "max_bytes": -1, "max_age": 0, "deny_delete": True, "deny_purge": True}


def mirror_name(site: str) -> str:
    return f"PEER_{site}"


def divergence(sid: str, mirror, origin: dict) -> tuple[str, dict]:
    """Why a peer's log (its stream info as JSON) no longer matches our mirror of it, or ''."""
    ours = mirror.state
    if origin.get("missing"):
        return (f"site {sid} has no event log (stream EVENTS is gone); this site's mirror keeps "
                f"{ours.messages} of its events", {"mirror_last_seq": ours.last_seq})
    state, config = origin.get("state", {}), origin.get("config", {})
    detail = {"mirror_last_seq": ours.last_seq, "origin_first_seq": state.get("first_seq", 0),
              "origin_last_seq": state.get("last_seq", 0)}
    if detail["origin_last_seq"] < ours.last_seq:
        return (f"site {sid}'s event log ends at {detail['origin_last_seq']}, before this site's "
                f"copy ({ours.last_seq}): it restarted empty or was cut", detail)
    if detail["origin_first_seq"] > max(ours.first_seq, 1) and ours.messages:
        return (f"site {sid}'s event log lost its first events (it starts at "
                f"{detail['origin_first_seq']}; this site's copy starts at {ours.first_seq})", detail)
    # JetStream leaves false booleans out of its JSON
    changed = sorted(k for k, v in APPEND_ONLY.items() if config.get(k, False if v is True else v) != v)
    if changed:
        return (f"site {sid}'s event log is no longer append-only ({', '.join(changed)} changed)", detail)
    return "", detail


class Linker:
    def __init__(self, *, site_id: str, nc, js, reader: sqlite3.Connection, append: Append,
                 projection: ProjectionStatus, replicas: int):
        self.site_id, self.nc, self.js, self.reader = site_id, nc, js, reader
        self.append, self.projection, self.replicas = append, projection, replicas
        self.linked: set[str] = set()
        self._watched_at = -WATCH_EVERY_S

    async def sync(self) -> None:
        for peer in views.peer_sites(self.reader, self.site_id):
            sid = peer.site
            if sid in self.linked:
                continue
            if not await self.ensure_mirror(sid):
                continue  # not reachable yet: try again on the next pass
            self.linked.add(sid)
            self.projection.add_stream(mirror_name(sid))
            log.info("mirroring peer", peer=sid, stream=mirror_name(sid))

    async def ensure_mirror(self, sid: str) -> bool:
        """Make the mirror of ``sid``'s log, once its JetStream answers through the leaf tree:
        a mirror made before its origin is reachable retries on a back-off of ~40 s, and
        ODST never deletes a mirror to hurry it. False: not made yet."""
        js = self.js
        name = mirror_name(sid)
        if await find_stream(js, name) is not None:
            return True
        if await self._origin_info(sid) is None:
            return False
        await ensure_stream(js, api.StreamConfig(
            name=name, storage=api.StorageType.FILE, num_replicas=self.replicas,
            mirror=api.StreamSource(name="EVENTS", external=api.ExternalStream(api=f"$JS.{sid}.API")),
        ))
        return True

    async def watch(self) -> None:
        """Compare every peer's log with this site's mirror of it, and record what changed.

        A mirror is evidence: ODST never deletes or recreates one on its own. When a
        peer's EVENTS stream is gone, shorter than our copy, cut at its head, or no longer
        configured as an append-only log, the mirror is kept as it is and a signed
        PeerLogDiverged goes into this site's own log (``/healthz`` answers 503 with the
        reason, ``/metrics`` and notifications show it) until the peer's log matches again
        (PeerLogRestored) or an admin removes the peer. A peer that does not answer is an
        outage, not a divergence: its mirror resumes by itself.
        """
        now = time.monotonic()
        if now - self._watched_at < WATCH_EVERY_S:
            return  # the linker wakes on every fold: a busy log must not mean a request per peer each time
        self._watched_at = now
        recorded = views.peer_log_alarms(self.reader, self.site_id)
        for sid in sorted(self.linked):
            try:
                mirror = await self.js.stream_info(mirror_name(sid))
            except Exception:
                continue
            origin = await self._origin_info(sid)
            if origin is None:
                continue  # unreachable: an outage
            reason, detail = divergence(sid, mirror, origin)
            if reason and recorded.get(sid) != reason:
                log.error("peer's log diverged from our mirror of it; mirror kept", peer=sid, reason=reason)
                await self.append(ev.PeerLogDiverged(site=sid, reason=reason, **detail), actor="system")
            elif not reason and sid in recorded:
                log.warning("peer's log matches our mirror again", peer=sid)
                await self.append(ev.PeerLogRestored(site=sid), actor="system")

    async def _origin_info(self, sid: str) -> dict | None:
        """The peer's own view of its EVENTS stream (JetStream's stream info, through the leaf
        tree), ``{"missing": True}`` when it has none, None when it does not answer."""
        try:
            msg = await self.nc.request(f"$JS.{sid}.API.STREAM.INFO.EVENTS", b"", timeout=2)
            info = json.loads(msg.data)
        except Exception:
            return None
        error = info.get("error")
        if error:
            return {"missing": True} if error.get("err_code") == STREAM_NOT_FOUND else None
        return info

    async def status(self, sid: str) -> dict:
        """Link state of one peer: mirror lag, seconds since last contact, error, last event."""
        out: dict = {"stream": mirror_name(sid)}
        try:
            info = await self.js.stream_info(mirror_name(sid))
        except Exception as exc:
            out.update(link="unknown", error=f"{type(exc).__name__}")
            return out
        m = info.mirror
        active_s = (m.active / 1e9) if (m and m.active is not None and m.active >= 0) else None
        error = (m.error.description if m and m.error else None) if m else None
        out.update(messages=info.state.messages, lag=(m.lag if m else None),
                   last_contact_s=round(active_s, 3) if active_s is not None else None, error=error)
        out["link"] = "up" if (active_s is not None and active_s < 30 and not error) else "down"
        chain = views.site_chain(self.reader, sid)
        out["last_event_ts"] = chain.last_ts if chain else None
        out["last_seq"] = chain.last_seq if chain else 0
        return out
