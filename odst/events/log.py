"""Appending signed events to the site's JetStream stream and reading any stream back.

The envelope's ``seq`` counts the origin's valid events (it equals the stream
sequence unless something was forged into the stream). Every append carries ``Nats-Expected-Last-Sequence`` (so two concurrent
writers can never fork the chain: the loser re-reads the head, re-chains and
retries) and ``Nats-Msg-Id`` = event id (so a retried publish is idempotent).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext, api

from odst.bus.streams import ensure_stream
from odst.events import chain, codec
from odst.events.catalogue import Event
from odst.events.signing import SignatureInvalid, SiteKey

log = structlog.get_logger("odst.events")

EVENTS_STREAM = "EVENTS"
WRONG_LAST_SEQUENCE = 10071
WRONG_LAST_MSG_ID = 10070
ALL_EVENTS_FILTER = "odst.*.ev.>"

# The largest message an event stream takes (JetStream ``max_msg_size``) and the projector
# folds. Events are small JSON envelopes except the package events, whose chunk list grows by
# 43 bytes per MiB of package: the default max_upload_bytes (64 GiB) needs 2.7 MiB, so 3 MiB
# leaves room for packages up to ~70 GiB and bounds what one junk message can cost.
EVENT_MAX_BYTES = 3 << 20
LEGACY_MAX_MSG_SIZE = 1 << 20  # what EVENTS was created with before the cap: upgraded silently


def subject_for(site: str, event: Event) -> str:
    return f"odst.{site}.ev.{type(event).__name__}"


def site_of_subject(subject: str) -> str | None:
    parts = subject.split(".")
    if len(parts) >= 4 and parts[0] == "odst" and parts[2] == "ev":
        return parts[1]
    return None


class AppendFailed(Exception):
    """The event could not be appended (broker unavailable or too much contention)."""


class NotYetApplied(AppendFailed):
    """The event is stored in the log (durable, it will be folded) but the read model had not
    applied it within the wait: the write happened, so nothing it published may be undone."""


class AppendUnconfirmed(NotYetApplied):
    """The event was sent, but the broker did not answer (a timeout, the connection lost): it
    may be stored, now or once the broker catches up. Kept as if it were, as ``NotYetApplied``:
    nothing it published is undone (a file the log never names is swept by the replicator's
    janitor); undoing it could leave the log naming a file that is gone."""


SETTLE_S = 10.0  # after a publish the broker did not answer: how long to look for what became of it
SETTLE_READ_S = 2.0  # one look (a read of the place the event was chained to take)


def _unanswered(exc: BaseException) -> AppendFailed:
    """What a publish that raised ``exc`` (a NATS error, not the broker's refusal) means."""
    if isinstance(exc, nats.errors.NoRespondersError):  # no stream took it: not stored
        return AppendFailed(f"broker unavailable: {exc!r}")
    return AppendUnconfirmed(f"the broker did not answer ({exc!r}); the event may be stored")


class LogDamaged(AppendFailed):
    """The log is shorter than, or not the one, the read model was built from, or its
    stream's configuration was changed: appending would chain onto a broken history."""


def expected_settings(site: str, replicas: int) -> dict[str, object]:
    """What ODST's own event stream must look like, setting by setting (wire values).

    A change to any of these is reported by the log watch: limits erase events the moment
    they are set, subjects or a seal stop appends, dropped deny flags allow deletes."""
    return {
        "subjects": [f"odst.{site}.ev.>"],
        "retention": "limits",
        "storage": "file",
        "num_replicas": replicas,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": 0.0,
        "max_msgs_per_subject": -1,
        "max_msg_size": EVENT_MAX_BYTES,
        "discard": "old",
        "deny_delete": True,
        "deny_purge": True,
        "allow_rollup_hdrs": False,
        "sealed": False,
        "duplicate_window": 120.0,
        "allow_direct": True,
    }


def _plain(value):
    return getattr(value, "value", value)  # enums compare by their wire value


def config_drift(config: api.StreamConfig, expected: dict[str, object]) -> list[str]:
    """The settings of ``config`` that differ from ``expected``, as 'field: expected → actual'."""
    out = []
    for name, want in expected.items():
        have = _plain(getattr(config, name, None))
        if name in ("max_age", "duplicate_window"):
            have = float(have or 0.0)
        elif name in ("allow_rollup_hdrs", "sealed", "deny_delete", "deny_purge", "allow_direct"):
            have = bool(have)
        elif have is None and isinstance(want, int):
            have = -1
        if have != want:
            out.append(f"{name} {_show(want)} → {_show(have)}")
    return out


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    envelope: codec.Envelope
    payload: bytes


@dataclass(frozen=True, slots=True)
class StoredMessage:
    stream: str
    seq: int
    subject: str
    payload: bytes
    headers: dict[str, str] | None = None  # as stored (recovery restores them with the bytes)
    # messages the reader knew to follow this one: those the stream held after it when it was
    # delivered, or those already received after it, if more (a folder takes them together)
    pending: int = 0


class Appender(Protocol):
    """The event log as its writers use it (contract: tests/system/test_contracts.py).

    ``append`` chains the event onto the last valid one and returns where it landed;
    ``head`` is (last stream seq, last valid envelope seq, its chain hash); ``forget_head``
    makes the next append re-read the head; ``replicas`` is the stream's replica count,
    which the streams a site creates beside its log (mirrors, notifications) copy.
    """

    replicas: int

    async def ensure_stream(self) -> list[str]: ...

    async def head(self) -> tuple[int, int, str]: ...

    def forget_head(self) -> None: ...

    async def append(self, event: Event, *, actor: str) -> Appended: ...


class EventLog:
    """The site's own stream EVENTS (subjects ``odst.<site>.ev.>``)."""

    def __init__(self, js: JetStreamContext, key: SiteKey, *, stream: str = EVENTS_STREAM,
                 replicas: int = 1, chain_state=None):
        self.js = js
        self.key = key
        self.site = key.site_id
        self.stream = stream
        self.replicas = replicas
        self.chain_state = chain_state  # () -> (stream checkpoint, envelope seq, hash) from the read model
        self._lock = asyncio.Lock()
        self._head: tuple[int, int, str] | None = None
        # the id of the event the head ends with while that event is sent but not acked yet
        # (append_many moves the head on at once): what chains onto it must also name it
        # (Nats-Expected-Last-Msg-Id), so that if it is never stored, the broker refuses the
        # events behind it even when other writers' events have made the sequence fit
        self._unacked_id: str | None = None
        self.refusal = ""  # set by the log watch while the stream is damaged: appends refused
        # appends refused because another writer got in first (re-chained), heads re-read from the broker
        self.contention: Counter[str] = Counter()

    def expected(self) -> dict[str, object]:
        return expected_settings(self.site, self.replicas)

    def stream_config(self) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.stream,
            subjects=[f"odst.{self.site}.ev.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            num_replicas=self.replicas,
            duplicate_window=120.0,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            max_msg_size=EVENT_MAX_BYTES,
        )

    async def ensure_stream(self) -> list[str]:
        """Create the stream, or put its configuration back to ODST's; return what was restored.

        Putting limits back can only stop further loss, never lose anything; what was lost
        meanwhile is the log watch's to report (``odst.events.watch``). The one change made
        silently is raising ``max_msg_size`` from the 1 MiB older versions created.
        """
        config = self.stream_config()
        info = await ensure_stream(self.js, config)  # a stream just made has no drift
        drift = config_drift(info.config, self.expected())
        if not drift:
            return []
        try:
            await self.js.update_stream(config)
        except nats.js.errors.APIError as exc:
            log.error("event stream configuration differs from ODST's and could not be restored",
                      stream=self.stream, drift=drift, error=exc.description)
            return []
        if drift == [f"max_msg_size {EVENT_MAX_BYTES} → {LEGACY_MAX_MSG_SIZE}"]:
            log.info("event stream's message size cap raised", stream=self.stream, max_msg_size=EVENT_MAX_BYTES)
            return []
        log.error("event stream configuration had been changed; ODST's restored", stream=self.stream,
                  drift=drift)
        return drift

    async def head(self) -> tuple[int, int, str]:
        """(last stream sequence, last valid envelope seq, its chain hash).

        Starts from what the read model has verified (``chain_state``: stream
        checkpoint, envelope seq, hash) and folds the messages after it with the
        projector's own rule — signed by us, next seq, right prev — so nothing
        forged, replayed or re-signed in our stream is ever chained onto.
        """
        # the read model first, then the stream: the stream only grows, so read in this order a
        # checkpoint past its end means the log was cut. Read the other way round, another
        # process's append folded in between looked like one (a spurious 503 under load).
        checkpoint, seq, prev = self.chain_state() if self.chain_state else (0, 0, codec.GENESIS)
        last = (await self.js.stream_info(self.stream)).state.last_seq
        if checkpoint > last:
            # Never start a second history over a cut one: the read model (and every peer's
            # mirror) holds events this log lost.
            raise LogDamaged(f"the {self.stream} stream ends at seq {last} but the read model has folded "
                             f"it up to seq {checkpoint}: the log was cut or replaced; writes are refused "
                             "until it is recovered (odst recover) or rebuilt (odst rebuild --force)")
        if last > checkpoint:
            async for m in read_stream(self.js, self.stream, checkpoint + 1, until_seq=last, idle_timeout=10):
                try:
                    env = codec.open_signed(m.payload, self.key.public_key)
                except (SignatureInvalid, codec.EnvelopeInvalid):
                    continue
                # the head follows seq and prev; whether a first event founds the site is the
                # projector's to judge (it quarantines one that does not)
                if env.origin == self.site and chain.link(env, seq, prev) in (chain.Link.NEXT,
                                                                               chain.Link.NOT_FOUNDED):
                    seq, prev = env.seq, codec.chain_hash(m.payload)
        return last, seq, prev

    def forget_head(self) -> None:
        """Re-read the head from the broker on the next append."""
        self._head, self._unacked_id = None, None

    async def append(self, event: Event, *, actor: str, attempts: int = 100,
                     event_id: str | None = None) -> Appended:
        """Chain ``event`` onto the head and store it. ``event_id``: the id of an earlier try of
        this very event whose outcome is unknown (the broker's duplicate window, 120 s, then
        answers with the stored one instead of storing it twice); a new id by default."""
        if self.refusal:
            raise LogDamaged(f"writes are refused: {self.refusal}")
        event_id = event_id or codec.new_event_id()
        async with self._lock:
            for attempt in range(attempts):
                last_seq, env_seq, last_hash = await self._known_head()
                envelope = codec.Envelope(
                    id=event_id, origin=self.site, seq=env_seq + 1, prev=last_hash,
                    ts=codec.now_ms(), actor=actor, event=event,
                )
                payload = codec.seal(envelope, self.key)
                if len(payload) > EVENT_MAX_BYTES:
                    raise AppendFailed(f"the {type(event).__name__} event is {len(payload)} bytes, over the "
                                       f"event size cap of {EVENT_MAX_BYTES} bytes")
                try:
                    ack = await self.js.publish(
                        subject_for(self.site, event), payload, stream=self.stream, timeout=10,
                        headers=self._chain_headers(event_id, last_seq),
                    )
                except nats.js.errors.APIError as exc:
                    self._head, self._unacked_id = None, None
                    if exc.err_code in (WRONG_LAST_SEQUENCE, WRONG_LAST_MSG_ID):
                        self.contention["rechained"] += 1
                        # another writer appended first: back off a little, re-chain on the new head
                        await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
                        continue
                    raise AppendFailed(f"broker refused the event: {exc.description}") from exc
                except nats.errors.Error as exc:  # no responders, no stream response, timeout, closed
                    self._head, self._unacked_id = None, None
                    outcome = _unanswered(exc)
                    if isinstance(outcome, AppendUnconfirmed):
                        outcome = await self._settle(last_seq + 1, envelope, payload, outcome)
                    if isinstance(outcome, Appended):
                        self._head = (outcome.seq, envelope.seq, codec.chain_hash(payload))
                        return outcome
                    raise outcome from exc
                if ack.duplicate:
                    # A retry of a publish that had landed: the stored one is the truth.
                    self._head, self._unacked_id = None, None
                    stored = await self.js.get_msg(self.stream, ack.seq)
                    env = codec.decode_body(codec.unverified_body(stored.data))
                    return Appended(ack.seq, env, stored.data)
                self._head, self._unacked_id = (ack.seq, envelope.seq, codec.chain_hash(payload)), None
                return Appended(ack.seq, envelope, payload)
        raise AppendFailed("too many concurrent writers; gave up re-chaining")

    async def _settle(self, seq: int, envelope: codec.Envelope, payload: bytes,
                      unanswered: AppendUnconfirmed) -> Appended | AppendFailed:
        """An event chained to take stream seq ``seq`` whose publish the broker did not answer
        (a timeout, the connection lost): what became of it, read from that place in the
        stream. The event there -> Appended; another event there -> AppendFailed (it was not
        stored and never will be: its expected last sequence is gone); nothing there yet
        after SETTLE_S -> ``unanswered`` (it may still be stored: kept as if it were). A
        cluster that lost its leader mid-publish usually answers within a few seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        while True:
            try:
                stored = await asyncio.wait_for(self.js.get_msg(self.stream, seq), SETTLE_READ_S)
            except (nats.errors.Error, nats.js.errors.APIError, asyncio.TimeoutError):
                stored = None  # nothing there yet, or no answer yet
            if stored is not None:
                if (stored.headers or {}).get("Nats-Msg-Id") == envelope.id:
                    return Appended(seq, envelope, payload)
                return AppendFailed(f"event {envelope.id} was not stored: seq {seq} holds another event")
            if loop.time() >= deadline:
                return unanswered
            await asyncio.sleep(0.2)

    def _chain_headers(self, event_id: str, last_seq: int) -> dict[str, str]:
        """The headers of an event chained onto the head (at stream seq ``last_seq``): its id, the
        sequence it must follow and, while the head's event is not acked yet, that event's id."""
        headers = {"Nats-Msg-Id": event_id, "Nats-Expected-Last-Sequence": str(last_seq)}
        if self._unacked_id is not None:
            headers["Nats-Expected-Last-Msg-Id"] = self._unacked_id
        return headers


    async def _known_head(self) -> tuple[int, int, str]:
        """The head appends chain onto (under ``_lock``): the one kept since the last append, or
        read from the stream and the read model after a failure forgot it."""
        if self._head is None:
            self.contention["head_reads"] += 1
            try:
                self._head = await self.head()
            except nats.errors.Error as exc:
                raise AppendFailed(f"broker unavailable: {exc!r}") from exc
        return self._head

    async def append_many(self, events: list[Event], *, actor: str,
                          on_sent: Callable[[], None] | None = None) -> list[Appended | AppendFailed]:
        """Append several events in one round trip: chained one after another as ``append``
        would (same envelopes, same signatures), published together, then their acks awaited.

        The first carries ``Nats-Expected-Last-Sequence`` (the head); each later one also
        ``Nats-Expected-Last-Msg-Id`` = the event id before it, so if another writer gets in
        anywhere in the run, every event after that point is refused rather than chained onto
        the wrong predecessor. Those (and any refused for contention) are appended one by one
        with ``append``. Returns, per event in order, its ``Appended`` or the ``AppendFailed``.

        The head moves on as soon as the run is handed to the broker's connection, not once it
        is acked: the next append chains onto this run's last event and goes out behind it (one
        connection, in order) while the broker still stores and fsyncs this one. Should any event
        of the run not be stored, the broker refuses everything chained after it (its expected
        last sequence is not the stream's), those are re-chained, and the head is read again.
        ``on_sent`` is called then (a writer's next run may start); with it, one event goes this
        way too (the same envelope and headers as ``append``)."""
        if self.refusal:
            raise LogDamaged(f"writes are refused: {self.refusal}")
        if len(events) == 0 or (len(events) == 1 and on_sent is None):
            out: list[Appended | AppendFailed] = []
            for event in events:
                try:
                    out.append(await self.append(event, actor=actor))
                except AppendFailed as exc:
                    out.append(exc)
            return out
        results: list[Appended | AppendFailed | None] = [None] * len(events)
        async with self._lock:
            last_seq, env_seq, last_hash = await self._known_head()
            sealed, previous_id = [], None
            for i, event in enumerate(events):
                envelope = codec.Envelope(id=codec.new_event_id(), origin=self.site, seq=env_seq + 1 + i,
                                          prev=last_hash, ts=codec.now_ms(), actor=actor, event=event)
                payload = codec.seal(envelope, self.key)
                if len(payload) > EVENT_MAX_BYTES:
                    raise AppendFailed(f"the {type(event).__name__} event is {len(payload)} bytes, over the "
                                       f"event size cap of {EVENT_MAX_BYTES} bytes")
                headers = self._chain_headers(envelope.id, last_seq + i)
                if previous_id is not None:
                    headers["Nats-Expected-Last-Msg-Id"] = previous_id
                sealed.append((envelope, payload, headers))
                last_hash, previous_id = codec.chain_hash(payload), envelope.id
            sends = [asyncio.ensure_future(self.js.publish(subject_for(self.site, e), payload, stream=self.stream,
                                                           timeout=10, headers=h))
                     for e, (_, payload, h) in zip(events, sealed)]
            await asyncio.sleep(0)  # each publish runs up to its write, in order, before the lock goes
            self._head, self._unacked_id = (last_seq + len(events), env_seq + len(events), last_hash), previous_id
        if on_sent is not None:
            on_sent()
        acks = await asyncio.gather(*sends, return_exceptions=True)
        # the acks, outside the lock: runs chained behind this one may be on their way already
        for i, ((envelope, payload, _), ack) in enumerate(zip(sealed, acks)):
            if isinstance(ack, nats.js.errors.APIError):
                if ack.err_code not in (WRONG_LAST_SEQUENCE, WRONG_LAST_MSG_ID):
                    results[i] = AppendFailed(f"broker refused the event: {ack.description}")
                else:  # refused for contention: not stored; appended again below
                    self.contention["rechained"] += 1
            elif isinstance(ack, BaseException):  # no responders, timeout, closed: stored or not
                results[i] = _unanswered(ack)
            elif ack.seq == last_seq + 1 + i:  # where it was chained to be (a duplicate ack too)
                results[i] = Appended(ack.seq, envelope, payload)
            else:
                results[i] = AppendFailed(f"event {envelope.id} stored at seq {ack.seq}, not {last_seq + 1 + i}")
        # each event names the one before it: after one not stored, none is; after one still
        # unsettled, the rest are too (each could only follow it), so they are not waited for again
        not_stored = unsettled = False
        for i, (envelope, payload, _) in enumerate(sealed):
            if isinstance(results[i], AppendUnconfirmed):
                if not_stored:
                    results[i] = AppendFailed(f"event {envelope.id} was not stored: one before it in its run was not")
                elif not unsettled:
                    results[i] = await self._settle(last_seq + 1 + i, envelope, payload, results[i])
                    unsettled = isinstance(results[i], AppendUnconfirmed)
            not_stored = not_stored or (isinstance(results[i], AppendFailed)
                                        and not isinstance(results[i], AppendUnconfirmed))
        if not all(isinstance(r, Appended) for r in results):
            self._head, self._unacked_id = None, None  # what was chained behind this run is refused: read it again
        elif self._unacked_id == previous_id:  # nothing chained behind it since: its last event is acked
            self._unacked_id = None
        for i, event in enumerate(events):  # refused for contention: one by one, re-chained
            if results[i] is None:
                try:
                    results[i] = await self.append(event, actor=actor)
                except AppendFailed as exc:
                    results[i] = exc
        return results  # type: ignore[return-value]


async def last_seq(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    return info.state.last_seq


async def unfolded(js: JetStreamContext, stream: str, checkpoint: int) -> int:
    """Messages stored after ``checkpoint`` (none of a cut stream's missing ones: they never come;
    none of a deleted stream: the log watch reports it)."""
    try:
        state = (await js.stream_info(stream)).state
    except nats.js.errors.NotFoundError:
        return 0
    if not state.messages or state.last_seq <= checkpoint:
        return 0
    return state.last_seq - max(checkpoint, state.first_seq - 1)


# How read_stream pulls. It asks for at most PULL_BATCH messages (fewer when they are large:
# about PULL_BYTES at a time) and asks again only once it has handed them all on, so however
# slow its caller folds, the client never holds more than one batch and never drops one.
PULL_BATCH = 256
PULL_BYTES = 16 << 20
PULL_EXPIRES_S = 30.0  # a pull request waits this long for new messages (a live one comes at once)
PULL_HEARTBEAT_S = 5.0  # while it waits the server says it is alive this often
READER_IDLE_S = 60.0  # the server removes a reader's consumer this long after its last request


class _ReaderLost(Exception):
    """The reader's consumer can no longer be trusted to deliver every message: re-create it."""


class _PullReader:
    """One ephemeral pull consumer on ``stream`` from ``start`` on (no acks, in memory).

    Ordered by us: every delivery must carry the consumer sequence after the last one
    (JetStream numbers deliveries 1, 2, 3, … whatever the stream's own numbering), so a
    message lost on the way (a reconnect, a pull answered while nobody listened) shows up
    as a skipped number, and ``_ReaderLost`` tells the caller to start again after the last
    message it has."""

    def __init__(self, js: JetStreamContext, stream: str, start: int):
        self.js, self.nc, self.stream, self.start = js, js._nc, stream, start
        self.name = ""
        self.sub = None
        self.delivered = 0  # consumer sequence of the last message handed on
        self.credit = 0  # messages the open pull request may still deliver (0: none open)
        self.batch = PULL_BATCH
        self._largest = 0  # of the current batch: sizes the next one
        # what the subscription delivered, in order: taken without a wait when it holds some
        # (``next_msg`` made a task, a uuid and a ``wait_for`` per message: a tenth of the
        # projector's time in a catch-up)
        self._queue: asyncio.Queue = asyncio.Queue()
        self.queued = 0  # stream messages (not status notices) delivered and not yet handed on

    async def _deliver(self, msg) -> None:
        if not (msg.headers and "Status" in msg.headers):
            self.queued += 1
        self._queue.put_nowait(msg)

    async def _next_msg(self, timeout: float):
        if not self._queue.empty():
            return self._queue.get_nowait()
        if self.nc.is_closed:
            raise nats.errors.ConnectionClosedError
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            if self.nc.is_closed:
                raise nats.errors.ConnectionClosedError from None
            raise nats.errors.TimeoutError from None

    async def open(self) -> None:
        # No client-side limit: this reader holds at most one batch it asked for.
        self.sub = await self.nc.subscribe(self.nc.new_inbox(), cb=self._deliver,
                                           pending_msgs_limit=0, pending_bytes_limit=0)
        info = await self.js.add_consumer(self.stream, api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.start,
            ack_policy=api.AckPolicy.NONE, filter_subject=ALL_EVENTS_FILTER,
            inactive_threshold=READER_IDLE_S, mem_storage=True, num_replicas=1,
        ))
        self.name = info.name

    async def close(self) -> None:
        try:
            if self.name:  # without waiting for the answer: also on the way out of a shutdown
                await self.nc.publish(f"{self.js._prefix}.CONSUMER.DELETE.{self.stream}.{self.name}", b"")
            if self.sub is not None:
                await self.sub.unsubscribe()
        except Exception:  # connection already closed: the server drops the consumer when idle
            pass

    async def _pull(self) -> None:
        if self._largest:
            self.batch = max(1, min(PULL_BATCH, PULL_BYTES // self._largest))
        self._largest = 0
        request = {"batch": self.batch, "expires": int(PULL_EXPIRES_S * 1e9),
                   "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9)}
        await self.nc.publish(f"{self.js._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.name}",
                              json.dumps(request).encode(), reply=self.sub.subject)
        self.credit = self.batch

    async def next(self, timeout: float | None):
        """The next message, or nats.errors.TimeoutError after ``timeout`` seconds without one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not self.credit:
                await self._pull()
            wait = PULL_HEARTBEAT_S * 3  # two heartbeats missed: the request or consumer is gone
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise nats.errors.TimeoutError
            try:
                msg = await self._next_msg(wait)
            except nats.errors.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                raise _ReaderLost(f"no message nor heartbeat for {wait:.0f} s") from None
            status = (msg.headers or {}).get("Status")
            if status is None:
                break
            left = (msg.headers or {}).get("Nats-Pending-Messages")
            if status == "100":  # idle heartbeat
                continue
            if status in ("404", "408") or (status == "409" and left is not None):
                # the pull request ended (expired, or a completion notice) with ``left`` undelivered
                self.credit = max(0, self.credit - int(left)) if left is not None else 0
                continue
            why = (msg.headers or {}).get("Description", "").splitlines()[:1]
            raise _ReaderLost(" ".join([status, *why]).strip())
        self.queued -= 1
        dseq = msg.metadata.sequence.consumer
        if dseq != self.delivered + 1:
            raise _ReaderLost(f"delivery {dseq} came after {self.delivered}: messages were lost on the way")
        self.delivered = dseq
        self.credit -= 1
        self._largest = max(self._largest, len(msg.data))
        return msg


async def read_stream(js: JetStreamContext, stream: str, start_seq: int = 1, *,
                      until_seq: int | None = None, idle_timeout: float | None = None,
                      on_open: Callable[[], None] | None = None) -> AsyncIterator[StoredMessage]:
    """Yield a stream's messages in order from start_seq, each exactly once, never skipping one.

    Stops after until_seq if given; otherwise runs forever (tail: a new message comes as soon
    as it is stored). ``idle_timeout`` only bounds a wait when until_seq is set and a message
    is still expected (then nats.errors.TimeoutError). A slow caller only slows the reading
    (see ``_PullReader``); a lost consumer is re-created after the last message yielded.
    Broker errors (no stream, connection closed) are raised. ``on_open`` is called each time
    the stream is open for reading (its consumer made), before any message comes.
    """
    if until_seq is not None and until_seq < start_seq:
        return
    next_seq = max(1, start_seq)
    timeout = idle_timeout if until_seq is not None else None
    losses = 0  # in a row, without a message between: back off a little
    while True:
        reader = _PullReader(js, stream, next_seq)
        try:
            await reader.open()
            if on_open is not None:
                on_open()
            while True:
                msg = await reader.next(timeout)
                seq = msg.metadata.sequence.stream
                if seq < next_seq:  # cannot happen with a fresh consumer; never yield one twice
                    raise _ReaderLost(f"stream seq {seq} came after {next_seq - 1}")
                next_seq, losses = seq + 1, 0
                yield StoredMessage(stream, seq, msg.subject, msg.data, msg.headers,
                                    max(msg.metadata.num_pending, reader.queued))
                if until_seq is not None and seq >= until_seq:
                    return
        except _ReaderLost as exc:
            log.warning("stream reader lost its place; reading again from where it was",
                        stream=stream, seq=next_seq, reason=str(exc))
            losses += 1
        finally:
            await reader.close()
        if losses > 1:
            await asyncio.sleep(min(1.0, 0.05 * losses))
