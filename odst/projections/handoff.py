"""One writer per event chain: gateway helper processes hand their events to the chain's owner.

Every event names its predecessor's hash, so two processes appending to one log race for its
head: the loser's publish is refused (``Nats-Expected-Last-Sequence``), it re-reads the head and
re-chains. With ``http_workers = 2`` that was, per 3,000 small uploads, ~950 re-reads of the head
and ~1,270 refused publishes, and twice the broker's CPU. So the process that owns the chain
(the projector's: it folds the log and holds the data directory's lock) also appends for the
others: a gateway helper sends its event, already decided and checked as before, in a request
on ``odst.<site>.chain.append`` (``authorization.chain_subject``); the owner's ``ChainService``
appends it through its own ``GroupCommit`` (in the same rounds as its own uploads) and answers
once the event is durable in JetStream and folded, with the signed bytes the log holds.

Who may use the subject: only the site's own identity (``<data>/nats-client.nk``), which the
helpers share with the owner and which already holds every right on the broker, the site key and
the stream itself; nothing new is granted. Peers and subscribers have allow lists without it, and
a spoke's leaf deny lists keep its hub away from it (``remote_deny_imports``). The owner decodes
the request as a catalogue event (anything else is refused) and signs, chains and appends it as
it would its own; the helper checks that the answer is signed by the site key and holds its
event, so a forged reply on its inbox is not taken for a recorded upload.

Outcomes, as ``ConfirmedAppender.append`` gives them: ``Appended``; ``NotYetApplied`` (stored,
not folded in time); ``AppendUnconfirmed`` (perhaps stored: no answer in time, from the broker
or from the owner); with either, the caller keeps what the event publishes (a file no event
names is swept); ``LogDamaged``; ``AppendFailed`` (not appended). With
no owner listening (a gateway beside an older projector, or none yet), the helper appends
directly as before (``fallback``).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import nats.errors
import structlog

from odst.bus.authorization import chain_subject
from odst.events import codec
from odst.events.catalogue import AnyEvent, Event
from odst.events.log import AppendFailed, Appended, AppendUnconfirmed, LogDamaged, NotYetApplied
from odst.events.signing import SignatureInvalid, SiteKey
from odst.projections.appender import Append

log = structlog.get_logger("odst.handoff")

QUEUE = "chain-owner"  # one owner answers each request, were two ever listening
ANSWER_MARGIN_S = 5.0  # the helper waits this much longer than the owner waits for the fold
MAX_WAIT_S = 120.0  # the longest fold wait a request may ask of the owner

# The answer's first byte; the rest is the seq (8 bytes, big-endian) and the stored bytes, or a message.
OK, NOT_YET_APPLIED, UNCONFIRMED, DAMAGED, FAILED = b"A", b"N", b"U", b"D", b"F"


class _Request(msgspec.Struct, frozen=True):
    actor: str
    wait: float
    event: AnyEvent


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Request).decode


class ChainService:
    """The chain owner's side: appends the events other processes of the site hand it."""

    def __init__(self, nc, site_id: str, append: Append):
        self.nc, self.site_id, self.append = nc, site_id, append
        self._sub = None
        self._answers: set[asyncio.Task] = set()
        self.counts: Counter = Counter()  # requests answered, by outcome

    async def start(self) -> "ChainService":
        # no client-side limit: each request is a small event, and its sender waits for the answer
        self._sub = await self.nc.subscribe(chain_subject(self.site_id), queue=QUEUE, cb=self._on_request,
                                            pending_msgs_limit=0, pending_bytes_limit=0)
        return self

    async def _on_request(self, msg) -> None:
        # answered side by side (the subscription calls back one message at a time): they
        # meet in the GroupCommit's rounds like the owner's own uploads
        task = asyncio.create_task(self._answer(msg), name="chain-handoff")
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _answer(self, msg) -> None:
        if not msg.reply:
            return  # no one to tell the outcome: nothing is appended
        try:
            request = _decode(msg.data)
        except msgspec.DecodeError as exc:
            self.counts["refused"] += 1
            await self._reply(msg.reply, FAILED + f"not an event: {exc}".encode())
            return
        wait = min(max(request.wait, 0.0), MAX_WAIT_S)
        try:
            appended = await self.append(request.event, actor=request.actor, wait=wait)
        except AppendUnconfirmed as exc:
            answer = UNCONFIRMED + str(exc).encode()
        except NotYetApplied as exc:
            answer = NOT_YET_APPLIED + str(exc).encode()
        except LogDamaged as exc:
            answer = DAMAGED + str(exc).encode()
        except AppendFailed as exc:
            answer = FAILED + str(exc).encode()
        except Exception as exc:  # an unexpected failure is the owner's to log, the helper's to report
            log.exception("handing an event on failed", event=type(request.event).__name__)
            answer = FAILED + f"{type(exc).__name__}".encode()
        else:
            answer = OK + appended.seq.to_bytes(8, "big") + appended.payload
        self.counts[answer[:1].decode()] += 1
        await self._reply(msg.reply, answer)

    async def _reply(self, subject: str, data: bytes) -> None:
        try:
            await self.nc.publish(subject, data)
        except nats.errors.Error as exc:  # the helper sees no answer: "perhaps stored"
            log.warning("could not answer a handed-on event", error=repr(exc))

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except nats.errors.Error:
                pass
            self._sub = None
        for task in list(self._answers):
            task.cancel()
        await asyncio.gather(*self._answers, return_exceptions=True)


class ChainClient:
    """A helper's ``Append``: hands each event to the chain's owner (``ChainService``)."""

    def __init__(self, nc, key: SiteKey, fallback: Append, *, wait_s: float = 30.0,
                 counts: Counter | None = None):
        self.nc, self.key, self.fallback = nc, key, fallback
        self.subject = chain_subject(key.site_id)
        self.wait_s = wait_s
        self.counts = Counter() if counts is None else counts  # handed_on | direct (no owner listening)

    async def __call__(self, event: Event, *, actor: str, wait: float | None = None) -> Appended:
        wait = self.wait_s if wait is None else wait
        try:
            msg = await self.nc.request(self.subject, _encode(_Request(actor=actor, wait=wait, event=event)),
                                        timeout=wait + ANSWER_MARGIN_S)
        except nats.errors.NoRespondersError:  # nothing was sent to the log: append it here
            self.counts["direct"] += 1
            return await self.fallback(event, actor=actor, wait=wait)
        except nats.errors.TimeoutError:
            raise AppendUnconfirmed(f"the chain's owner did not answer within {wait + ANSWER_MARGIN_S:.0f}s: "
                                "the event may have been recorded") from None
        except nats.errors.Error as exc:  # sent or not: no telling, so kept as if it were
            raise AppendUnconfirmed(f"broker connection lost handing the event on ({exc!r}): "
                                "it may have been recorded") from None
        self.counts["handed_on"] += 1
        kind, body = msg.data[:1], msg.data[1:]
        if kind == OK:
            payload = body[8:]
            try:
                envelope = codec.open_signed(payload, self.key.public_key)
            except (SignatureInvalid, codec.EnvelopeInvalid):
                raise AppendUnconfirmed("the chain's owner answered with bytes not signed by this site: "
                                    "the event may have been recorded") from None
            if envelope.event != event or envelope.actor != actor or envelope.origin != self.key.site_id:
                raise AppendUnconfirmed("the chain's owner answered with another event: "
                                    "this one may have been recorded") from None
            return Appended(int.from_bytes(body[:8], "big"), envelope, payload)
        text = body.decode(errors="replace")
        if kind == UNCONFIRMED:
            raise AppendUnconfirmed(text)
        if kind == NOT_YET_APPLIED:
            raise NotYetApplied(text)
        if kind == DAMAGED:
            raise LogDamaged(text)
        raise AppendFailed(text)
