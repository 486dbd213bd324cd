"""Mirrors of peers' event streams: one ``PEER_<site>`` per known site, projected after verification.

A site learns peers from PeerRegistered events (its own, and those of sites it
trusts), so every site ends up mirroring every site of the network directly
through the leaf tree with ``$JS.<site>.API`` — no relaying, no echo.
"""

from __future__ import annotations

import nats.js.errors
import structlog
from nats.js import api

from odst.projections import views

log = structlog.get_logger("odst.linker")


def mirror_name(site: str) -> str:
    return f"PEER_{site}"


class Linker:
    def __init__(self, site):
        self.site = site
        self.linked: set[str] = set()

    async def sync(self) -> None:
        for peer in views.peer_sites(self.site.reader, self.site.id):
            sid = peer["site"]
            if sid in self.linked:
                continue
            await self.ensure_mirror(sid)
            self.linked.add(sid)
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
