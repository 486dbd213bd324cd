"""Mirrors of peers' event streams: one ``PEER_<site>`` per known site, projected after verification.

A site learns peers from PeerRegistered events (its own, and those of sites it
trusts), so every site ends up mirroring every site of the network directly
through the leaf tree with ``$JS.<site>.API`` — no relaying, no echo.
"""

from __future__ import annotations

import time

import nats.js.errors
import structlog
from nats.js import api

from odst.projections import views

log = structlog.get_logger("odst.linker")

HEAL_EVERY_S = 10.0  # a mirror gets this long after (re)creation to make contact
STALE_ACTIVE_S = 30.0  # a healthy mirror hears from its origin every few seconds


def mirror_name(site: str) -> str:
    return f"PEER_{site}"


class Linker:
    def __init__(self, site):
        self.site = site
        self.linked: set[str] = set()
        self._healed: dict[str, float] = {}

    async def sync(self) -> None:
        for peer in views.peer_sites(self.site.reader, self.site.id):
            sid = peer["site"]
            if sid in self.linked:
                continue
            await self.ensure_mirror(sid)
            self.linked.add(sid)
            self._healed[sid] = time.monotonic()
            self.site.projector.add_stream(mirror_name(sid))
            log.info("mirroring peer", peer=sid, stream=mirror_name(sid))

    async def ensure_mirror(self, sid: str) -> None:
        js = self.site.js
        name = mirror_name(sid)
        try:
            await js.stream_info(name)
            return
        except nats.js.errors.NotFoundError:
            pass
        await js.add_stream(api.StreamConfig(
            name=name, storage=api.StorageType.FILE, num_replicas=self.site.log.replicas,
            mirror=api.StreamSource(name="EVENTS", external=api.ExternalStream(api=f"$JS.{sid}.API")),
        ))

    async def heal(self) -> None:
        """Recreate a mirror that has lost contact with a peer that answers.

        A mirror whose origin was unreachable when it (or its own server)
        started retries on a long back-off — ~40 s measured after a hub restart.
        When the peer's JetStream answers through the leaf tree but the mirror
        has had no contact since HEAL_EVERY_S after it was made (or none for
        STALE_ACTIVE_S), delete and re-add it: a mirror keeps the
        origin's sequence numbers, so the projector's checkpoint stays valid and
        nothing is folded twice.
        """
        now = time.monotonic()
        for sid in sorted(self.linked):
            if now - self._healed.get(sid, -1e9) < HEAL_EVERY_S:
                continue  # created or recreated recently: give it time to make contact
            try:
                info = await self.site.js.stream_info(mirror_name(sid))
            except Exception:
                continue
            m = info.mirror
            active_s = (m.active / 1e9) if (m and m.active is not None and m.active >= 0) else None
            if active_s is not None and active_s < STALE_ACTIVE_S:
                continue
            if not await self._peer_answers(sid):
                continue  # a real outage: keep the mirror, it resumes by itself
            self._healed[sid] = now
            log.warning("mirror stalled while its peer answers; recreating it", peer=sid,
                        last_contact_s=active_s)
            await self.site.js.delete_stream(mirror_name(sid))
            await self.ensure_mirror(sid)

    async def _peer_answers(self, sid: str) -> bool:
        try:
            await self.site.nc.request(f"$JS.{sid}.API.INFO", b"", timeout=2)
            return True
        except Exception:
            return False

    async def status(self, sid: str) -> dict:
        """Link state of one peer: mirror lag, seconds since last contact, error, last event."""
        out: dict = {"stream": mirror_name(sid)}
        try:
            info = await self.site.js.stream_info(mirror_name(sid))
        except Exception as exc:
            out.update(link="unknown", error=f"{type(exc).__name__}")
            return out
        m = info.mirror
        active_s = (m.active / 1e9) if (m and m.active is not None and m.active >= 0) else None
        error = (m.error.description if m and m.error else None) if m else None
        out.update(messages=info.state.messages, lag=(m.lag if m else None),
                   last_contact_s=round(active_s, 3) if active_s is not None else None, error=error)
        out["link"] = "up" if (active_s is not None and active_s < 30 and not error) else "down"
        chain = views.site_chain(self.site.reader, sid)
        out["last_event_ts"] = chain["last_ts"] if chain else None
        out["last_seq"] = chain["last_seq"] if chain else 0
        return out
