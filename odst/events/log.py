"""Appending signed events to the site's JetStream stream and reading any stream back.

The envelope's ``seq`` counts the origin's valid events (it equals the stream
sequence unless something was forged into the stream). Every append carries ``Nats-Expected-Last-Sequence`` (so two concurrent
writers can never fork the chain: the loser re-reads the head, re-chains and
retries) and ``Nats-Msg-Id`` = event id (so a retried publish is idempotent).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import AsyncIterator

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from odst.events import codec
from odst.events.catalogue import Event
from odst.events.signing import SignatureInvalid, SiteKey

EVENTS_STREAM = "EVENTS"
WRONG_LAST_SEQUENCE = 10071
ALL_EVENTS_FILTER = "odst.*.ev.>"


def subject_for(site: str, event: Event) -> str:
    return f"odst.{site}.ev.{type(event).__name__}"


def site_of_subject(subject: str) -> str | None:
    parts = subject.split(".")
    if len(parts) >= 4 and parts[0] == "odst" and parts[2] == "ev":
        return parts[1]
    return None


class AppendFailed(Exception):
    """The event could not be appended (broker unavailable or too much contention)."""


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
        self._head: tuple[int, str] | None = None

    async def ensure_stream(self) -> None:
        config = api.StreamConfig(
            name=self.stream,
            subjects=[f"odst.{self.site}.ev.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            num_replicas=self.replicas,
            duplicate_window=120.0,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            max_msg_size=1 << 20,
        )
        try:
            await self.js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.js.add_stream(config)

    async def head(self) -> tuple[int, int, str]:
        """(last stream sequence, last valid envelope seq, its chain hash).

        Starts from what the read model has verified (``chain_state``: stream
        checkpoint, envelope seq, hash) and folds the messages after it with the
        projector's own rule — signed by us, next seq, right prev — so nothing
        forged, replayed or re-signed in our stream is ever chained onto.
        """
        last = (await self.js.stream_info(self.stream)).state.last_seq
        checkpoint, seq, prev = self.chain_state() if self.chain_state else (0, 0, codec.GENESIS)
        if checkpoint > last:  # the read model is of another log: trust only the log
            checkpoint, seq, prev = 0, 0, codec.GENESIS
        if last > checkpoint:
            async for m in read_stream(self.js, self.stream, checkpoint + 1, until_seq=last, idle_timeout=10):
                try:
                    env = codec.open_signed(m.payload, self.key.public_key)
                except (SignatureInvalid, codec.EnvelopeInvalid):
                    continue
                if env.origin == self.site and env.seq == seq + 1 and env.prev == prev:
                    seq, prev = env.seq, codec.chain_hash(m.payload)
        return last, seq, prev

    def forget_head(self) -> None:
        """Re-read the head from the broker on the next append."""
        self._head = None

    async def append(self, event: Event, *, actor: str, attempts: int = 100) -> Appended:
        event_id = codec.new_event_id()
        async with self._lock:
            for attempt in range(attempts):
                if self._head is None:
                    try:
                        self._head = await self.head()
                    except nats.errors.Error as exc:
                        raise AppendFailed(f"broker unavailable: {exc!r}") from exc
                last_seq, env_seq, last_hash = self._head
                envelope = codec.Envelope(
                    id=event_id, origin=self.site, seq=env_seq + 1, prev=last_hash,
                    ts=codec.now_ms(), actor=actor, event=event,
                )
                payload = codec.seal(envelope, self.key)
                try:
                    ack = await self.js.publish(
                        subject_for(self.site, event), payload, stream=self.stream, timeout=10,
                        headers={"Nats-Msg-Id": event_id,
                                 "Nats-Expected-Last-Sequence": str(last_seq)},
                    )
                except nats.js.errors.APIError as exc:
                    self._head = None
                    if exc.err_code == WRONG_LAST_SEQUENCE:
                        # another writer appended first: back off a little, re-chain on the new head
                        await asyncio.sleep(random.uniform(0, 0.002 * min(attempt + 1, 20)))
                        continue
                    raise AppendFailed(f"broker refused the event: {exc.description}") from exc
                except nats.errors.Error as exc:  # no responders, no stream response, timeout, closed
                    self._head = None
                    raise AppendFailed(f"broker unavailable: {exc!r}") from exc
                if ack.duplicate:
                    # A retry of a publish that had landed: the stored one is the truth.
                    self._head = None
                    stored = await self.js.get_msg(self.stream, ack.seq)
                    env = codec.decode_body(codec.unverified_body(stored.data))
                    return Appended(ack.seq, env, stored.data)
                self._head = (ack.seq, envelope.seq, codec.chain_hash(payload))
                return Appended(ack.seq, envelope, payload)
        raise AppendFailed("too many concurrent writers; gave up re-chaining")


async def last_seq(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    return info.state.last_seq


async def read_stream(js: JetStreamContext, stream: str, start_seq: int = 1, *,
                      until_seq: int | None = None, idle_timeout: float | None = None,
                      ) -> AsyncIterator[StoredMessage]:
    """Yield a stream's messages in order from start_seq (an ordered consumer).

    Stops after until_seq if given; otherwise runs forever (tail). ``idle_timeout``
    only bounds a wait when until_seq is set and a message is still expected.
    """
    if until_seq is not None and until_seq < start_seq:
        return
    sub = await js.subscribe(
        ALL_EVENTS_FILTER, stream=stream, ordered_consumer=True,
        config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                                  opt_start_seq=max(1, start_seq)),
        idle_heartbeat=5.0, pending_msgs_limit=4096,
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout or 3600)
            except nats.errors.TimeoutError:
                if until_seq is not None and idle_timeout is not None:
                    raise
                continue
            seq = msg.metadata.sequence.stream
            yield StoredMessage(stream, seq, msg.subject, msg.data, msg.headers)
            if until_seq is not None and seq >= until_seq:
                return
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # connection already closed on shutdown
            pass
