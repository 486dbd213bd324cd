"""Mirrors of peers' event streams: one ``PEER_<site>`` per known site, projected after verification.

A site learns peers from PeerRegistered events (its own, and those of sites it
trusts), so every site ends up mirroring every site of the network directly
through the leaf tree with ``$JS.<site>.API`` — no relaying, no echo.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time

import structlog
from nats.errors import NoRespondersError
from nats.js import api

from odst.bus import peer_request
from odst.bus.authorization import mirror_deliver_prefix
from odst.bus.streams import ensure_stream, find_stream
from odst.bus.users import path_to
from odst.events import catalogue as ev
from odst.projections import views
from odst.projections.appender import Append
from odst.projections.status import ProjectionStatus

log = structlog.get_logger("odst.linker")

WATCH_EVERY_S = 5.0  # how often peers' logs are compared with their mirrors here
STREAM_NOT_FOUND = 10059  # JetStream's error code
# A mirror's request for its consumer on the origin (nats-server's setupMirrorConsumer),
# and the reply subject its server waits on.
CONSUMER_CREATE = ("$JS.*.API.CONSUMER.CREATE.EVENTS", "$JS.*.API.CONSUMER.CREATE.EVENTS.>")
MIRROR_REPLY_PREFIX = "$JSC.R."
RESEND_WITHIN_S = 20.0  # nats-server waits 30 s for the answer; ours must come before that
REACH_EVERY_S = 0.25
MAX_WATCHED = 256  # requests watched at once (one per origin: a mirror has one pending)
ANSWER_WAIT_S = 3.0  # an origin that is reachable answers a request it heard within this
MAX_ANSWERED = 1024  # answers remembered (newest); a peer may publish on $JSC.R.> at any rate
CLUSTER_NOT_AVAILABLE = 10008  # JetStream's "temporarily unavailable"; not one that changes the request
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


def mirror_request(site_id: str, subject: str, reply: str | None, data: bytes) -> str | None:
    """The origin site whose log this site's own mirror asks a consumer of, or None when the
    request is not one of this site's mirrors (a peer's, seen through the leaf tree)."""
    if not reply or not reply.startswith(MIRROR_REPLY_PREFIX):
        return None
    origin = subject.split(".")[1]
    try:
        meta = json.loads(data)["config"]["metadata"]
    except (ValueError, KeyError, TypeError):
        return None
    if meta.get("_nats.mirror.domain") != site_id or meta.get("_nats.mirror.stream") != mirror_name(origin):
        return None
    return origin


def unreachable_answer(origin: str, site_id: str) -> bytes:
    """The answer to a mirror's consumer request that no server heard: an error, so nats-server
    stops waiting for it and the next leaf link to come up retries the mirror at once."""
    return json.dumps({"type": "io.nats.jetstream.api.v1.consumer_create_response",
                       "error": {"code": 503, "err_code": CLUSTER_NOT_AVAILABLE,
                                 "description": f"site {origin} is not reachable through the leaf links "
                                                f"(answered by ODST at site {site_id})"}}).encode()


class MirrorResume:
    """Gets this site's mirrors their consumer on the origin as soon as the origin is reachable.

    nats-server asks for a mirror's consumer when it restores the mirror (0.1-0.2 s after
    start, before any leaf link is up) and after a stall; a request no server heard is
    waited on for 30 s, during which the leaf link coming up does not retry the mirror,
    then retried after a back-off of 10 s per failure: ~40 s after a restart. So this
    site's connection listens to its own mirrors' requests and to the answers they get
    (``$JSC.R.>``): a request no answer came to, because no server listened for the origin
    or the link came up just after it, is sent again, unchanged, once the origin is
    reachable (within RESEND_WITHIN_S), and the origin's answer relayed to the mirror; an
    origin that stays unreachable gets the mirror an error instead of 30 s of silence, so
    that the next leaf link to come up retries it. Nothing is deleted or recreated: the
    consumer is the one the mirror asked for, with its config.
    """

    def __init__(self, *, site_id: str, nc):
        self.site_id, self.nc = site_id, nc
        self._subs: list = []
        self._tasks: dict[str, asyncio.Task] = {}  # origin -> watch of its mirror's latest request
        self._answered: dict[str, float] = {}  # reply subject -> when an answer went to it

    async def start(self) -> "MirrorResume":
        for subject in CONSUMER_CREATE:
            self._subs.append(await self.nc.subscribe(subject, cb=self._on_request))
        self._subs.append(await self.nc.subscribe(f"{MIRROR_REPLY_PREFIX}>", cb=self._on_answer))
        await self.nc.flush()
        return self

    async def stop(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _on_answer(self, msg) -> None:
        # O(1) a message, at most MAX_ANSWERED kept: a peer may publish on "$JSC.R.>" at any
        # rate. Insertion order is time order (a repeat moves to the end), so the oldest go first.
        now = time.monotonic()
        answered = self._answered
        answered.pop(msg.subject, None)
        answered[msg.subject] = now
        while answered and (len(answered) > MAX_ANSWERED
                            or now - next(iter(answered.values())) >= 2 * RESEND_WITHIN_S):
            del answered[next(iter(answered))]

    async def _on_request(self, msg) -> None:
        origin = mirror_request(self.site_id, msg.subject, msg.reply, msg.data)
        if origin is None:
            return
        earlier = self._tasks.pop(origin, None)
        if earlier is not None:
            earlier.cancel()  # the mirror asks again: its earlier request is moot
        elif len(self._tasks) >= MAX_WATCHED:
            return  # more origins than any site has peers: a peer sending look-alike requests
        task = asyncio.create_task(self._see_answered(origin, msg), name=f"mirror-resume-{origin}")
        self._tasks[origin] = task
        task.add_done_callback(lambda t: self._tasks.pop(origin, None) if self._tasks.get(origin) is t else None)

    async def _reachable(self, origin: str) -> bool | None:
        """True: the origin's JetStream answers; False: no server listens for it; None: unsure."""
        try:
            await peer_request(self.nc, self.site_id, f"$JS.{origin}.API.STREAM.INFO.EVENTS", timeout=2)
            return True
        except NoRespondersError:
            return False
        except Exception:
            return None

    async def _mirrored_here(self, origin: str) -> bool:
        """Whether this site has a mirror of ``origin``'s log: only such a mirror asks for a
        consumer, and a request's metadata is its sender's to write (a peer may publish on
        these subjects). Unsure (JetStream busy): True, the watch goes ahead."""
        try:
            return await find_stream(self.nc.jetstream(timeout=2), mirror_name(origin)) is not None
        except Exception:
            return True

    async def _see_answered(self, origin: str, msg) -> None:
        if not await self._mirrored_here(origin):
            return  # a look-alike: nothing here asked it
        loop = asyncio.get_running_loop()
        started, missed = loop.time(), False
        while True:
            reachable = await self._reachable(origin)
            waited = loop.time() - started
            if msg.reply in self._answered:
                return  # the origin heard it (or the mirror was answered already)
            if reachable is False:
                missed = True  # nobody heard the request
            elif reachable and (missed or waited >= ANSWER_WAIT_S):
                await self._resend(origin, msg)  # missed, or lost just before the link came up
                return
            if waited > RESEND_WITHIN_S:
                await self.nc.publish(msg.reply, unreachable_answer(origin, self.site_id))
                log.info("mirror's origin unreachable; its mirror retries when a leaf link comes up", peer=origin)
                return
            await asyncio.sleep(max(REACH_EVERY_S, ANSWER_WAIT_S - waited) if reachable and not missed
                                else REACH_EVERY_S)

    async def _resend(self, origin: str, msg) -> None:
        """The mirror's request again, unchanged, and the origin's answer to the mirror."""
        try:
            answer = await peer_request(self.nc, self.site_id, msg.subject, msg.data, timeout=5,
                                        headers=msg.headers)
        except Exception as exc:
            log.warning("mirror consumer request resent, unanswered", peer=origin, error=type(exc).__name__)
            return
        if msg.reply not in self._answered:
            await self.nc.publish(msg.reply, answer.data)
            log.info("mirror consumer request resent once the origin was reachable", peer=origin,
                     stream=mirror_name(origin))


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
        a mirror made before its origin is reachable waits on a request nobody heard (see
        MirrorResume), and ODST never deletes a mirror to hurry it. False: not made yet."""
        js = self.js
        name = mirror_name(sid)
        if await find_stream(js, name) is not None:
            return True
        if await self._origin_info(sid) is None:
            return False
        await ensure_stream(js, api.StreamConfig(
            name=name, storage=api.StorageType.FILE, num_replicas=self.replicas,
            mirror=api.StreamSource(name="EVENTS", external=api.ExternalStream(
                api=f"$JS.{sid}.API",
                deliver=mirror_deliver_prefix(path_to(views.peer_sites(self.reader, self.site_id), sid)))),
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
            msg = await peer_request(self.nc, self.site_id, f"$JS.{sid}.API.STREAM.INFO.EVENTS", timeout=2)
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
