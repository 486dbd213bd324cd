"""Fold one stored message into the read model: verify, check the chain, apply, checkpoint.

Synchronous and deterministic, shared by the live projector and by ``odst audit``
/ ``odst rebuild``, so a rebuild equals the live read model by construction.
A message that fails any check is quarantined (recorded, never applied); the
checkpoint advances in the same transaction either way.
"""

from __future__ import annotations

import json
import re
import sqlite3
import urllib.parse
from dataclasses import dataclass

import msgspec
import structlog

from odst.events import catalogue as ev
from odst.events import chain, codec
from odst.events.log import EVENT_MAX_BYTES, StoredMessage, site_of_subject
from odst.events.signing import SignatureInvalid, site_id_for
from odst.errors import RequestInvalid
from odst.naming import MAX_INT64, name_key, unsafe_name
from odst.replicator.bandwidth import window_from_event
from odst.store.hashing import CHUNK_SIZE

log = structlog.get_logger("odst.projections")


# Quarantine bounds, per stream (see sql/006_quarantine_bounds.sql).
QUARANTINE_KEEP_BYTES = 64 << 10  # of each message's payload: enough to tell what it was
QUARANTINE_MAX_ROWS = 1000
QUARANTINE_MAX_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class Outcome:
    applied: bool
    reason: str = ""
    envelope: codec.Envelope | None = None
    violation: bool = False  # signed by the origin's key, yet breaks its chain (else: junk)


def subject_name(event: ev.Event) -> str:
    """What an event is about: the package name, the token id or the peer site."""
    field = _SUBJECT_FIELD.get(type(event))
    if field is None:
        field = _SUBJECT_FIELD[type(event)] = _subject_field(event)
    return getattr(event, field, "") if field else ""


_SITE_ID = re.compile(r"s[a-z2-7]{16}")
_KEY_HEX = re.compile(r"[0-9a-f]{64}")


def harmful(env: codec.Envelope) -> str:
    """Why a signed event may not take effect here ("" if it may). A signature says who wrote
    an event, not that it is harmless: a registered peer's event must not rewrite another
    site's founding or chain head, admit a site under a key that is not its own, put a URL
    or a timetable here that every pass then fails to read, name a Jamf Pro record by a path,
    or describe chunks no pull could hold in memory. Such an event stays in its chain
    (recorded, its successors folded) without effect, as one naming an unsafe package name."""
    e = env.event
    if isinstance(e, ev.SiteFounded):
        if e.site != env.origin or not _KEY_HEX.fullmatch(e.public_key) \
                or site_id_for(bytes.fromhex(e.public_key)) != env.origin:
            return "founds a site other than its origin, or under another key"
    elif isinstance(e, ev.PeerRegistered):
        if not _SITE_ID.fullmatch(e.site) or not _KEY_HEX.fullmatch(e.public_key) \
                or site_id_for(bytes.fromhex(e.public_key)) != e.site:
            return "registers a site id that is not its key's"
        if e.http_url and not _http_url(e.http_url):
            return "registers a URL that is no http(s) URL with a host"
    elif isinstance(e, ev.LinkBandwidthSet):
        if e.link != "*" and not _SITE_ID.fullmatch(e.link):
            return "limits a link that is no site"
        try:
            for w in e.windows:
                window_from_event(msgspec.to_builtins(w))
        except (RequestInvalid, ValueError, KeyError, TypeError) as exc:
            return f"sets a timetable that does not parse: {exc}"
    elif isinstance(e, ev.JamfPackageSynced):
        if e.record_id and not e.record_id.isdigit():
            return "names a Jamf Pro record by something other than its number"
    for content in e.items if isinstance(e, ev.PackagesAvailable) else (e,):
        if isinstance(content, ev.ContentEvent) and (not 0 < content.chunk_size <= CHUNK_SIZE or content.size < 0):
            return f"describes a content of {content.size} bytes in chunks of {content.chunk_size}"
    return ""


def _beyond_int64(value) -> bool:
    if isinstance(value, int):
        return not -MAX_INT64 - 1 <= value <= MAX_INT64
    if isinstance(value, (list, tuple)):
        return any(_beyond_int64(v) for v in value)
    if isinstance(value, dict):
        return any(_beyond_int64(v) for v in value.values())
    return False


def _http_url(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - a port that is no number raises
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _names_package(event: ev.Event) -> bool:
    """Is the event's subject a package name (its ``name``)?"""
    if _SUBJECT_FIELD.get(type(event)) is None:
        subject_name(event)
    return _SUBJECT_FIELD[type(event)] == "name"


def _subject_field(event: ev.Event) -> str:
    """The field ``subject_name`` reads for events of this type ("": none)."""
    if isinstance(event, (ev.TokenCreated, ev.TokenRevoked)):
        return "token_id"
    if isinstance(event, (ev.NatsCredentialCreated, ev.NatsCredentialRevoked)):
        return "credential_id"
    if isinstance(event, (ev.PeerRegistered, ev.PeerRemoved, ev.PeerLogDiverged, ev.PeerLogRestored,
                          ev.JamfDistributionPointRegistered)):
        return "site"
    if isinstance(event, (ev.SiteFounded, ev.SiteRenamed, ev.PackagesAvailable)):
        return ""  # (PackagesAvailable: its several names are in event_names)
    if isinstance(event, (ev.WebhookSubscribed, ev.WebhookRemoved)):
        return "webhook_id"
    if isinstance(event, (ev.EmailSubscribed, ev.EmailUnsubscribed)):
        return "subscription_id"
    if isinstance(event, USER_EVENTS):
        return "username"
    return "name"


_SUBJECT_FIELD: dict[type, str] = {}  # event type -> its subject field, filled as types are seen


class ReadModelWriter:
    """Folds messages into the read model (one SQLite connection): verify, check the chain,
    apply, checkpoint, in one transaction. ``trusted`` maps site id -> public key."""

    def __init__(self, conn: sqlite3.Connection, trusted: dict[str, bytes]):
        self.conn = conn
        # Rollback scratch (a statement's journal) stays in memory: it is never the read
        # model, so nothing durable changes (per-message savepoints, as folds once had, wrote
        # ~30 pages a message to a temp file: a third of a catch-up's system CPU).
        conn.execute("PRAGMA temp_store=MEMORY")
        self.trusted = dict(trusted)
        # peers' keys found in the directory, by site: a site id is the hash of its key, so the
        # key found for one never changes (a removed peer is refused by ``removals``, checked
        # per event); only a fold that fails and rolls back forgets them
        self._keys: dict[str, bytes] = {}
        # What this transaction has read or written of the rows every event's check reads
        # (``_begin`` empties it): each origin's chain head, each origin's removal (None: not
        # removed), whether any copy is recorded damaged. BEGIN IMMEDIATE keeps every other
        # writer out meanwhile, and the handlers that change these rows keep them current, so
        # a run of events reads each once instead of once per event.
        self._heads: dict[str, tuple[int, str]] = {}
        self._removed: dict[str, int | None] = {}
        self.damaged_any: bool | None = None
        # Each origin's chain head as this transaction moved it, written to its ``sites`` row
        # once at the commit (``_commit``), not by an UPDATE per event: nothing reads those
        # columns in between but ``_check``, through ``_heads``.
        self._moved: dict[str, tuple[int, str, int]] = {}

    def removed_upto(self, site: str) -> int | None:
        """The last seq of ``site``'s log this site still takes, if it removed that peer."""
        if site not in self._removed:
            row = self.conn.execute("SELECT upto_seq FROM removals WHERE site=?", (site,)).fetchone()
            self._removed[site] = row[0] if row is not None else None
        return self._removed[site]

    def _begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self._heads.clear()
        self._removed.clear()
        self._moved.clear()
        self.damaged_any = None

    def _write_heads(self) -> None:
        for origin, (seq, chain_hash, ts) in self._moved.items():
            self.conn.execute("UPDATE sites SET last_seq=?, last_hash=?, last_ts=? WHERE site=?",
                              (seq, chain_hash, ts, origin))
        self._moved.clear()

    def _commit(self, checkpoints: dict[str, int]) -> None:
        """Write what the transaction moved (chain heads, each stream's ``checkpoints``: the
        last message folded of it), then commit."""
        c = self.conn
        self._write_heads()
        for stream, seq in checkpoints.items():
            c.execute("INSERT INTO checkpoints(stream, seq) VALUES (?,?)"
                      " ON CONFLICT(stream) DO UPDATE SET seq=excluded.seq", (stream, seq))
        c.execute("COMMIT")

    def checkpoint(self, stream: str) -> int:
        row = self.conn.execute("SELECT seq FROM checkpoints WHERE stream=?", (stream,)).fetchone()
        return row[0] if row else 0

    def fold(self, msg: StoredMessage) -> Outcome:
        c = self.conn
        self._begin()
        try:
            if msg.seq <= self.checkpoint(msg.stream):
                c.execute("ROLLBACK")
                return Outcome(False, "already applied")
            outcome = self._fold_one(msg)
            self._commit({msg.stream: msg.seq})
            return outcome
        except BaseException:
            self._keys.clear()
            c.execute("ROLLBACK")
            raise

    def fold_many(self, msgs: list[StoredMessage], *, stop=None) -> list[Outcome]:
        """``fold`` each of ``msgs`` (of one stream, in order) in ONE transaction: the same
        checks, the same outcome per message (one that fails a check is quarantined, those
        around it applied), the checkpoints advanced past them, but one commit for the run.
        If folding one raises, the transaction is rolled back, those before it are folded
        again and committed (as one by one they would stand), and the error is raised: no
        savepoint per message (two statements each) for what almost never happens.
        ``stop(outcome)``: stop after the message whose outcome it says yes to (its outcome
        is the last returned); the caller folds the rest later, if it still wants them."""
        outcomes: list[Outcome] = []
        self._begin()
        try:
            done: dict[str, int] = {}  # stream -> its checkpoint in this transaction (read once)
            moved: dict[str, int] = {}  # stream -> the last message of it folded in this run
            for i, msg in enumerate(msgs):
                if msg.stream not in done:
                    done[msg.stream] = self.checkpoint(msg.stream)
                if msg.seq <= done[msg.stream]:
                    outcomes.append(Outcome(False, "already applied"))
                    continue
                try:
                    outcome = self._fold_one(msg)
                except BaseException:
                    self._fold_again(msgs[:i])
                    raise
                done[msg.stream] = moved[msg.stream] = msg.seq
                outcomes.append(outcome)
                if stop is not None and stop(outcome):
                    break
            self._commit(moved)
            return outcomes
        except BaseException:
            self._keys.clear()  # a key found in a directory row rolled back is not kept
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    def _fold_again(self, msgs: list[StoredMessage]) -> None:
        """After a fold that raised: roll the run back and fold ``msgs`` (those before the one
        that raised) again in a transaction of their own, committed."""
        self.conn.execute("ROLLBACK")
        self._keys.clear()
        if msgs:
            self.fold_many(msgs)

    def _fold_one(self, msg: StoredMessage) -> Outcome:
        """Check, apply or quarantine: inside the caller's transaction (which moves the
        stream's checkpoint past it when it commits)."""
        c = self.conn
        outcome = self._check(msg)
        if outcome.applied and not self._apply(msg, outcome.envelope):
            outcome = Outcome(False, f"duplicate event id {outcome.envelope.id}", violation=True)
        if not outcome.applied:
            kind = "ignored" if outcome.reason.startswith(IGNORED) else "quarantined"
            c.execute(
                "INSERT OR REPLACE INTO quarantine(stream, stream_seq, subject, origin, kind, reason,"
                " payload, violation, size) VALUES (?,?,?,?,?,?,?,?,?)",
                (msg.stream, msg.seq, msg.subject[:256], site_of_subject(msg.subject) or "", kind,
                 outcome.reason, msg.payload[:QUARANTINE_KEEP_BYTES], int(outcome.violation),
                 len(msg.payload)))
            if not outcome.violation:
                self._bound_quarantine(msg.stream)
        c.execute("INSERT INTO checkpoints(stream, seq) VALUES (?,?)"
                  " ON CONFLICT(stream) DO UPDATE SET seq=excluded.seq", (msg.stream, msg.seq))
        return outcome

    def key_for(self, origin: str) -> bytes | None:
        key = self._keys.get(origin)
        if key is None:
            key = trusted_key(self.conn, self.trusted, origin)
            if key is not None:
                self._keys[origin] = key
        return key

    def _bound_quarantine(self, stream: str) -> None:
        """Drop the stream's oldest junk while its quarantine is over a bound (violations stay)."""
        c = self.conn
        rows, kept = c.execute("SELECT count(*), coalesce(sum(length(payload)), 0) FROM quarantine"
                               " WHERE stream=? AND violation=0", (stream,)).fetchone()
        while rows > QUARANTINE_MAX_ROWS or kept > QUARANTINE_MAX_BYTES:
            old = c.execute("SELECT stream_seq, size, length(payload) FROM quarantine WHERE stream=?"
                            " AND violation=0 ORDER BY stream_seq LIMIT 1", (stream,)).fetchone()
            c.execute("DELETE FROM quarantine WHERE stream=? AND stream_seq=?", (stream, old[0]))
            c.execute("INSERT INTO quarantine_dropped(stream, messages, bytes) VALUES (?,1,?)"
                      " ON CONFLICT(stream) DO UPDATE SET messages=messages+1, bytes=bytes+excluded.bytes",
                      (stream, old[1]))
            rows, kept = rows - 1, kept - old[2]

    def _check(self, msg: StoredMessage) -> Outcome:
        if len(msg.payload) > EVENT_MAX_BYTES:  # not even verified: no event is this large
            return Outcome(False, f"message of {len(msg.payload)} bytes exceeds the event size cap "
                                  f"({EVENT_MAX_BYTES} bytes)")
        origin = site_of_subject(msg.subject)
        if origin is None:
            return Outcome(False, f"subject {msg.subject!r} is not an ODST event subject")
        key = self.key_for(origin)
        if key is None:
            return Outcome(False, f"unknown site {origin}: no registered key")
        try:
            env = codec.open_signed(msg.payload, key)
        except SignatureInvalid:
            return Outcome(False, f"signature does not verify against {origin}'s key")
        except codec.EnvelopeInvalid as exc:
            return Outcome(False, f"signed but malformed envelope: {exc}", violation=True)
        if env.origin != origin:
            return Outcome(False, f"envelope origin {env.origin} differs from subject site {origin}",
                           violation=True)
        if _beyond_int64((env.seq, env.ts, msgspec.to_builtins(env.event))):
            # SQLite cannot bind it: folding it would fail, and be tried again, for ever
            return Outcome(False, "signed but holds an integer beyond 64 bits", violation=True)
        upto = self.removed_upto(origin)
        if upto is not None and env.seq > upto:
            return Outcome(False, f"{IGNORED}: {origin} was removed as a peer after its seq {upto}",
                           envelope=env)
        head = self._heads.get(origin)
        if head is None:
            row = self.conn.execute("SELECT last_seq, last_hash FROM sites WHERE site=?",
                                    (origin,)).fetchone()
            head = self._heads[origin] = (row[0], row[1]) if row else (0, codec.GENESIS)
        last_seq, last_hash = head
        position = chain.link(env, last_seq, last_hash)
        if position is chain.Link.REPLAY:  # a copy of a valid event: anyone who can read the log can make one
            return Outcome(False, f"replayed event: seq {env.seq} already seen from {origin}")
        if position is chain.Link.GAP:
            return Outcome(False, f"gap in {origin}'s chain: expected seq {last_seq + 1}, got {env.seq}",
                           violation=True)
        if position is chain.Link.FORK:
            return Outcome(False, f"fork in {origin}'s chain at seq {env.seq}: prev hash differs",
                           violation=True)
        if position is chain.Link.NOT_FOUNDED:
            return Outcome(False, "a site's first event must be SiteFounded", violation=True)
        # an id already recorded (its UNIQUE constraint) is found by _apply's first INSERT
        return Outcome(True, envelope=env)

    def _apply(self, msg: StoredMessage, env: codec.Envelope) -> bool:
        """Record the event and apply it; False (nothing changed) if its id is recorded already."""
        c = self.conn
        e = env.event
        name = subject_name(e)
        # A package name no upload here could have (a path, "..", a control character) is a
        # file name never made, looked up or removed: a registered peer's event naming
        # "../../site.key" must not reach the store. The event stays in its chain (recorded,
        # its successors folded), without effect.
        unsafe = (unsafe_name(name) if name and _names_package(e) else "") or harmful(env)
        if unsafe:
            log.warning("event recorded without effect", origin=env.origin, seq=env.seq,
                        type=type(e).__name__, reason=unsafe)
            name = ""
        try:
            c.execute(
                "INSERT INTO events(id, stream, stream_seq, subject, origin, seq, type, ts, actor,"
                " subject_name, payload) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (env.id, msg.stream, msg.seq, msg.subject, env.origin, env.seq, type(e).__name__,
                 env.ts, env.actor, name, msg.payload))
        except sqlite3.IntegrityError:
            if c.execute("SELECT 1 FROM events WHERE id=?", (env.id,)).fetchone():
                return False  # a duplicate id: the statement changed nothing
            raise
        chain = (env.seq, codec.chain_hash(msg.payload), env.ts)
        self._heads[env.origin] = chain[:2]
        if isinstance(e, ev.SiteFounded) and not unsafe:
            self._write_heads()  # (rare) the rows as they stand before this one is made or changed
            c.execute("INSERT INTO sites(site, public_key, name, last_seq, last_hash, last_ts)"
                      " VALUES (?,?,?,?,?,?) ON CONFLICT(site) DO UPDATE SET name=excluded.name,"
                      " last_seq=excluded.last_seq, last_hash=excluded.last_hash, last_ts=excluded.last_ts",
                      (e.site, e.public_key, e.name, *chain))
        else:
            self._moved[env.origin] = chain
        handler = _HANDLERS.get(type(e))
        if handler and not unsafe:
            handler(c, env, e, self)
        return True


IGNORED = "ignored"


def trusted_key(conn: sqlite3.Connection, trusted: dict[str, bytes], origin: str) -> bytes | None:
    """The key this site holds for ``origin``: its own, or one vouched for in the directory."""
    key = trusted.get(origin)
    if key is not None:
        return key
    for (hex_key,) in conn.execute("SELECT DISTINCT public_key FROM directory WHERE site=?", (origin,)):
        try:
            candidate = bytes.fromhex(hex_key)
        except ValueError:
            continue
        if site_id_for(candidate) == origin:  # a site id is the hash of its key
            return candidate
    return None


def clock(ts: int, origin: str) -> str:
    return f"{ts:015d}:{origin}"


def _content(c: sqlite3.Connection, *, key: str, name, blake3, size, sha1, sha512, chunk_size, chunks, origin,
             uploaded_at, uploaded_by, stage, at: str, from_upload: bool, generation: int = 0) -> None:
    """Record a sighting of a content at clock ``at``, order-independently.

    Keyed by the key of the name (naming.name_key): spellings a Mac would take for one
    file name are one package. The metadata of the earliest sighting is kept, its spelling
    included (an upload event beats an availability report of the same upload); the stage of
    the latest upload is current until a later PackageStaged. Ties break on the text of the
    key (and of the spelling), so any order of folding gives the same row. Every spelling is
    also recorded in ``spellings``, so that two of them for one key are reported
    (name_collisions), never merged silently. The generation is the highest seen (a
    replacement's; 0 for uploads). ``key`` is ``name_key(name)``.
    """
    first_key = f"{at}|{0 if from_upload else 1}|{stage}"
    last_key = f"{at}|{1 if from_upload else 0}|{stage}"
    earlier = "(excluded.first_key < first_key OR (excluded.first_key = first_key AND excluded.name < name))"
    c.execute(
        "INSERT INTO contents(key, name, blake3, size, sha1, sha512, chunk_size, chunks, origin, uploaded_at,"
        " uploaded_by, first_clock, first_key, last_clock, last_key, last_stage, generation)"
        " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
        " ON CONFLICT(key, blake3) DO UPDATE SET"
        f" name=CASE WHEN {earlier} THEN excluded.name ELSE name END,"
        " origin=CASE WHEN excluded.first_key < first_key THEN excluded.origin ELSE origin END,"
        " uploaded_at=CASE WHEN excluded.first_key < first_key THEN excluded.uploaded_at ELSE uploaded_at END,"
        " uploaded_by=CASE WHEN excluded.first_key < first_key THEN excluded.uploaded_by ELSE uploaded_by END,"
        " first_clock=min(first_clock, excluded.first_clock), first_key=min(first_key, excluded.first_key),"
        " last_stage=CASE WHEN excluded.last_key > last_key THEN excluded.last_stage ELSE last_stage END,"
        " last_clock=max(last_clock, excluded.last_clock), last_key=max(last_key, excluded.last_key),"
        " generation=max(generation, excluded.generation)",
        (key, name, blake3, size, sha1, sha512, chunk_size, json.dumps(chunks), origin, uploaded_at,
         uploaded_by, at, first_key, at, last_key, stage, generation))
    c.execute("INSERT INTO spellings(key, name, blake3, first_clock) VALUES (?,?,?,?)"
              " ON CONFLICT(key, name, blake3) DO UPDATE SET first_clock=min(first_clock, excluded.first_clock)",
              (key, name, blake3, at))


def _available(c: sqlite3.Connection, key: str, blake3: str, site: str, status: str, detail: str,
               at: str) -> None:
    """``site``'s copy of the content of package ``key`` (a name_key) is in ``status`` as of ``at``."""
    c.execute("INSERT INTO availability(key, blake3, site, status, detail, clock) VALUES (?,?,?,?,?,?)"
              " ON CONFLICT(key, blake3, site) DO UPDATE SET status=excluded.status,"
              " detail=excluded.detail, clock=excluded.clock WHERE excluded.clock > clock",
              (key, blake3, site, status, detail, at))


def _package_uploaded(c, env, e: ev.PackageUploaded, writer) -> None:
    at = clock(env.ts, env.origin)
    key = name_key(e.name)
    _content(c, key=key, name=e.name, blake3=e.blake3, size=e.size, sha1=e.sha1, sha512=e.sha512,
             chunk_size=e.chunk_size, chunks=e.chunks, origin=env.origin, uploaded_at=env.ts,
             uploaded_by=env.actor, stage=e.stage, at=at, from_upload=True)
    _available(c, key, e.blake3, env.origin, "available", "", at)
    _repaired(c, writer, key, e.blake3, env.origin, at)


def _repaired(c: sqlite3.Connection, writer: ReadModelWriter, key: str, blake3: str, site: str,
              at: str) -> None:
    """A verified copy is back at ``site`` (pulled, or uploaded again): in service again.
    Nothing to do while no copy anywhere is recorded damaged (asked once per transaction)."""
    if writer.damaged_any is None:
        writer.damaged_any = c.execute("SELECT EXISTS (SELECT 1 FROM damaged)").fetchone()[0] == 1
    if writer.damaged_any:
        c.execute("DELETE FROM damaged WHERE key=? AND blake3=? AND site=? AND clock < ?",
                  (key, blake3, site, at))


def _package_replaced(c, env, e: ev.PackageReplaced, writer) -> None:
    """An upload that supersedes ``e.replaces``: that content is no longer live (unless uploaded
    again later), and the new one carries its generation."""
    at = clock(env.ts, env.origin)
    key = name_key(e.name)
    _content(c, key=key, name=e.name, blake3=e.blake3, size=e.size, sha1=e.sha1, sha512=e.sha512,
             chunk_size=e.chunk_size, chunks=e.chunks, origin=env.origin, uploaded_at=env.ts,
             uploaded_by=env.actor, stage=e.stage, at=at, from_upload=True, generation=e.generation)
    c.execute("INSERT INTO replacements(key, old_blake3, clock, new_blake3, origin, replaced_at, replaced_by)"
              " VALUES (?,?,?,?,?,?,?) ON CONFLICT(key, old_blake3) DO UPDATE SET clock=excluded.clock,"
              " new_blake3=excluded.new_blake3, origin=excluded.origin, replaced_at=excluded.replaced_at,"
              " replaced_by=excluded.replaced_by WHERE excluded.clock > clock",
              (key, e.replaces, at, e.blake3, env.origin, env.ts, env.actor))
    _available(c, key, e.blake3, env.origin, "available", "", at)


def _package_available(c, env, e: ev.PackageAvailable, writer) -> None:
    """A site holds a verified copy. It may be the first this site hears of the content (a
    hub's report of an upload whose origin's log comes later, or never), except of a content
    first uploaded at a peer this site removed: those are taken from that peer's own events up
    to its removal, and a third site that still trusts it cannot bring in its later ones."""
    key = name_key(e.name)
    if writer.removed_upto(e.origin) is not None and c.execute(
            "SELECT 1 FROM contents WHERE key=? AND blake3=?", (key, e.blake3)).fetchone() is None:
        return
    _content(c, key=key, name=e.name, blake3=e.blake3, size=e.size, sha1=e.sha1, sha512=e.sha512,
             chunk_size=e.chunk_size, chunks=e.chunks, origin=e.origin, uploaded_at=e.uploaded_ts,
             uploaded_by=e.uploaded_by, stage=e.stage, at=clock(e.uploaded_ts, e.origin),
             from_upload=False)
    at = clock(env.ts, env.origin)
    _available(c, key, e.blake3, env.origin, "available", "", at)
    _repaired(c, writer, key, e.blake3, env.origin, at)


def _packages_available(c, env, e: ev.PackagesAvailable, writer) -> None:
    """Each item as its own PackageAvailable; the items' names are recorded for the event
    (``event_names``: what changed, a package's history). An item naming an unsafe name has
    no effect (as such an event of its own, ``ReadModelWriter._apply``)."""
    items = []
    for item in e.items:
        unsafe = unsafe_name(item.name)
        if unsafe:
            log.warning("event names an unsafe package name; its item has no effect", origin=env.origin,
                        seq=env.seq, type=type(e).__name__, reason=unsafe)
        else:
            items.append(item)
    for item in items:
        _package_available(c, env, item, writer)
    c.executemany("INSERT OR IGNORE INTO event_names(event_id, name) VALUES (?,?)",
                  [(env.id, item.name) for item in items])


def _package_damaged(c, env, e: ev.PackageDamaged, writer) -> None:
    """Out of service at its origin until that site's next PackageAvailable of the content."""
    at = clock(env.ts, env.origin)
    _available(c, name_key(e.name), e.blake3, env.origin, "failed", e.reason, at)
    writer.damaged_any = True
    c.execute("INSERT INTO damaged(key, blake3, site, reason, found_by, clock) VALUES (?,?,?,?,?,?)"
              " ON CONFLICT(key, blake3, site) DO UPDATE SET reason=excluded.reason,"
              " found_by=excluded.found_by, clock=excluded.clock WHERE excluded.clock > damaged.clock",
              (name_key(e.name), e.blake3, env.origin, e.reason, e.found_by, at))


def _package_transfer_failed(c, env, e: ev.PackageTransferFailed, writer) -> None:
    _available(c, name_key(e.name), e.blake3, env.origin, "failed", e.reason, clock(env.ts, env.origin))


def _package_withdrawn(c, env, e: ev.PackageWithdrawn, writer) -> None:
    _available(c, name_key(e.name), e.blake3, env.origin, "withdrawn", e.reason, clock(env.ts, env.origin))


def _package_staged(c, env, e: ev.PackageStaged, writer) -> None:
    c.execute("INSERT OR IGNORE INTO stage_changes(key, clock, stage) VALUES (?,?,?)",
              (name_key(e.name), clock(env.ts, env.origin), e.stage))


def _package_deleted(c, env, e: ev.PackageDeleted, writer) -> None:
    c.execute("INSERT INTO tombstones(key, blake3, clock, origin, deleted_at, deleted_by)"
              " VALUES (?,?,?,?,?,?) ON CONFLICT(key, blake3) DO UPDATE SET clock=excluded.clock,"
              " origin=excluded.origin, deleted_at=excluded.deleted_at, deleted_by=excluded.deleted_by"
              " WHERE excluded.clock > clock",
              (name_key(e.name), e.blake3, clock(env.ts, env.origin), env.origin, env.ts, env.actor))


def _peer_invited(c, env, e: ev.PeerInvited, writer) -> None:
    if env.origin in writer.trusted:  # only this site's own invitations matter here
        c.execute("INSERT OR IGNORE INTO invites(invite_id, secret_sha256, expires_ts) VALUES (?,?,?)",
                  (e.invite_id, e.secret_sha256, e.expires_ts))


def _peer_registered(c, env, e: ev.PeerRegistered, writer) -> None:
    c.execute("INSERT INTO directory(site, vouched_by, public_key, name, http_url, clock)"
              " VALUES (?,?,?,?,?,?) ON CONFLICT(site, vouched_by) DO UPDATE SET"
              " public_key=excluded.public_key, name=excluded.name, http_url=excluded.http_url,"
              " clock=excluded.clock WHERE excluded.clock > clock",
              (e.site, env.origin, e.public_key, e.name, e.http_url, clock(env.ts, env.origin)))
    if e.invite_id and env.origin in writer.trusted:
        c.execute("UPDATE invites SET used_by=? WHERE invite_id=?", (e.site, e.invite_id))


def _peer_removed(c, env, e: ev.PeerRemoved, writer) -> None:
    if env.origin in writer.trusted:  # a removal binds only the site that decided it
        c.execute("INSERT OR REPLACE INTO removals(site, upto_seq, clock) VALUES (?,?,?)",
                  (e.site, e.upto_seq, clock(env.ts, env.origin)))
        writer._removed[e.site] = e.upto_seq


def _token_created(c, env, e: ev.TokenCreated, writer) -> None:
    c.execute("INSERT OR IGNORE INTO tokens(token_id, name, role, token_sha256, site, created_at,"
              " created_by) VALUES (?,?,?,?,?,?,?)",
              (e.token_id, e.name, e.role, e.token_sha256, env.origin, env.ts, env.actor))


def _token_revoked(c, env, e: ev.TokenRevoked, writer) -> None:
    c.execute("UPDATE tokens SET revoked_at=? WHERE token_id=? AND site=? AND revoked_at IS NULL",
              (env.ts, e.token_id, env.origin))


def _nats_credential_created(c, env, e: ev.NatsCredentialCreated, writer) -> None:
    if env.origin in writer.trusted:  # who may read this site's broker is its own business
        # OR IGNORE: a name already active (or a key already used) keeps its first credential
        c.execute("INSERT OR IGNORE INTO nats_credentials(credential_id, name, role, nkey, created_at,"
                  " created_by) VALUES (?,?,?,?,?,?)",
                  (e.credential_id, e.name, e.role, e.nkey, env.ts, env.actor))


def _nats_credential_revoked(c, env, e: ev.NatsCredentialRevoked, writer) -> None:
    if env.origin in writer.trusted:
        c.execute("UPDATE nats_credentials SET revoked_at=?, revoked_by=? WHERE credential_id=?"
                  " AND revoked_at IS NULL", (env.ts, env.actor, e.credential_id))


def _webhook_subscribed(c, env, e: ev.WebhookSubscribed, writer) -> None:
    if env.origin in writer.trusted:  # a subscription is this site's own business
        c.execute("INSERT OR IGNORE INTO webhooks(webhook_id, url, event_types, description, event_id,"
                  " created_at, created_by) VALUES (?,?,?,?,?,?,?)",
                  (e.webhook_id, e.url, json.dumps(sorted(e.event_types)), e.description, env.id,
                   env.ts, env.actor))


def _webhook_removed(c, env, e: ev.WebhookRemoved, writer) -> None:
    if env.origin in writer.trusted:
        c.execute("UPDATE webhooks SET removed_at=? WHERE webhook_id=? AND removed_at IS NULL",
                  (env.ts, e.webhook_id))


def _email_subscribed(c, env, e: ev.EmailSubscribed, writer) -> None:
    if env.origin in writer.trusted:
        c.execute("INSERT OR IGNORE INTO email_subscriptions(subscription_id, recipient, event_types,"
                  " event_id, created_at, created_by) VALUES (?,?,?,?,?,?)",
                  (e.subscription_id, e.recipient, json.dumps(sorted(e.event_types)), env.id, env.ts,
                   env.actor))


def _email_unsubscribed(c, env, e: ev.EmailUnsubscribed, writer) -> None:
    if env.origin in writer.trusted:
        c.execute("UPDATE email_subscriptions SET removed_at=? WHERE subscription_id=? AND removed_at IS NULL",
                  (env.ts, e.subscription_id))


USER_EVENTS = (ev.UserCreated, ev.UserRoleChanged, ev.UserPasswordChanged, ev.UserDetailsChanged,
               ev.UserRemoved)


def _user_created(c, env, e: ev.UserCreated, writer) -> None:
    if env.origin in writer.trusted:  # a site's users are its own; a peer's never sign in here
        c.execute("INSERT INTO users(username, display_name, role, password_sealed, created_at, created_by,"
                  " updated_at, updated_by) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(username) DO UPDATE SET"
                  " display_name=excluded.display_name, role=excluded.role,"
                  " password_sealed=excluded.password_sealed, created_at=excluded.created_at,"
                  " created_by=excluded.created_by, updated_at=excluded.updated_at,"
                  " updated_by=excluded.updated_by, password_changed_at=NULL, removed_at=NULL"
                  " WHERE users.removed_at IS NOT NULL",
                  (e.username, e.display_name, e.role, e.password_sealed, env.ts, env.actor, env.ts,
                   env.actor))


def _user_update(column: str, attribute: str):
    def apply(c, env, e, writer) -> None:
        if env.origin in writer.trusted:
            extra = ", password_changed_at=?" if column == "password_sealed" else ""
            args = (getattr(e, attribute), env.ts, env.actor) + ((env.ts,) if extra else ())
            c.execute(f"UPDATE users SET {column}=?, updated_at=?, updated_by=?{extra}"
                      " WHERE username=? AND removed_at IS NULL", args + (e.username,))
    return apply


def _user_removed(c, env, e: ev.UserRemoved, writer) -> None:
    if env.origin in writer.trusted:
        c.execute("UPDATE users SET removed_at=?, updated_at=?, updated_by=? WHERE username=?"
                  " AND removed_at IS NULL", (env.ts, env.ts, env.actor, e.username))


def _stages_accepted(c, env, e: ev.StagesAccepted, writer) -> None:
    c.execute("INSERT INTO stage_policies(site, stages, clock) VALUES (?,?,?) ON CONFLICT(site) DO UPDATE"
              " SET stages=excluded.stages, clock=excluded.clock WHERE excluded.clock > stage_policies.clock",
              (env.origin, json.dumps(list(e.stages)), clock(env.ts, env.origin)))
    if env.origin in writer.trusted:  # each site chooses its own; peers' choices are theirs
        c.execute("INSERT OR REPLACE INTO site_settings(key, value, updated_at, updated_by) VALUES (?,?,?,?)",
                  ("accepted_stages", json.dumps(list(e.stages)), env.ts, env.actor))


def _jamf_package_synced(c, env, e: ev.JamfPackageSynced, folder) -> None:
    if e.dry_run:  # a dry run changes nothing in Jamf Pro: its event is history only
        return
    state = {"failed": "failed"}.get(e.result, "deleted" if e.action == "deleted" else "in_sync")
    if e.result == "failed":  # a failed write leaves the record as it was: keep what we knew of it
        c.execute("INSERT INTO jamf_packages(name, state, detail, clock, origin) VALUES (?,?,?,?,?)"
                  " ON CONFLICT(name) DO UPDATE SET state=excluded.state, detail=excluded.detail,"
                  " clock=excluded.clock, origin=excluded.origin WHERE excluded.clock > jamf_packages.clock",
                  (e.name, state, e.detail, clock(env.ts, env.origin), env.origin))
        return
    c.execute("INSERT INTO jamf_packages(name, blake3, file_name, record_id, hash_type, hash_value, size, state,"
              " detail, created_by_odst, clock, origin) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
              " ON CONFLICT(name) DO UPDATE SET blake3=excluded.blake3, file_name=excluded.file_name,"
              " record_id=excluded.record_id, hash_type=excluded.hash_type, hash_value=excluded.hash_value,"
              " size=excluded.size, state=excluded.state, detail=excluded.detail,"
              " created_by_odst=CASE WHEN excluded.record_id = jamf_packages.record_id"
              "   THEN max(excluded.created_by_odst, jamf_packages.created_by_odst) ELSE excluded.created_by_odst END,"
              " clock=excluded.clock, origin=excluded.origin WHERE excluded.clock > jamf_packages.clock",
              (e.name, e.blake3, e.file_name, e.record_id, e.hash_type, e.hash_value, e.size, state, e.detail,
               int(e.created_by_odst), clock(env.ts, env.origin), env.origin))


def _jamf_drift(c, env, e, folder) -> None:
    state = e.kind if isinstance(e, ev.JamfDriftDetected) else "in_sync"
    detail = (f"expected {e.expected or '-'}, found {e.found or '-'}"
              if isinstance(e, ev.JamfDriftDetected) else "")
    c.execute("INSERT INTO jamf_packages(name, record_id, state, detail, clock, origin) VALUES (?,?,?,?,?,?)"
              " ON CONFLICT(name) DO UPDATE SET state=excluded.state, detail=excluded.detail,"
              " record_id=CASE WHEN excluded.record_id <> '' THEN excluded.record_id ELSE jamf_packages.record_id END,"
              " clock=excluded.clock, origin=excluded.origin WHERE excluded.clock > jamf_packages.clock",
              (e.name, e.record_id, state, detail, clock(env.ts, env.origin), env.origin))


def _jamf_dp_registered(c, env, e: ev.JamfDistributionPointRegistered, folder) -> None:
    c.execute("INSERT INTO jamf_distribution_points(site, record_id, dp_name, url, api, failover_site, clock,"
              " origin) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(site) DO UPDATE SET record_id=excluded.record_id,"
              " dp_name=excluded.dp_name, url=excluded.url, api=excluded.api,"
              " failover_site=excluded.failover_site, clock=excluded.clock, origin=excluded.origin"
              " WHERE excluded.clock > jamf_distribution_points.clock",
              (e.site, e.record_id, e.dp_name, e.url, e.api, e.failover_site, clock(env.ts, env.origin),
               env.origin))


def _link_bandwidth(c, env, e, writer) -> None:
    if isinstance(e, ev.LinkBandwidthCleared):
        row = (e.link, 0, 0, 0, "[]", "auto", 1)
    else:
        row = (e.link, e.send_bps, e.receive_bps, e.burst_bytes,
               json.dumps([msgspec.to_builtins(w) for w in e.windows]), e.local, 0)
    c.execute("INSERT INTO bandwidth_links(site, link, send_bps, receive_bps, burst_bytes, windows, local, cleared,"
              " clock, updated_by) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(site, link) DO UPDATE SET"
              " send_bps=excluded.send_bps, receive_bps=excluded.receive_bps, burst_bytes=excluded.burst_bytes,"
              " windows=excluded.windows, local=excluded.local, cleared=excluded.cleared, clock=excluded.clock,"
              " updated_by=excluded.updated_by WHERE excluded.clock > bandwidth_links.clock",
              (env.origin, *row, clock(env.ts, env.origin), env.actor))


def _local_networks(c, env, e: ev.LocalNetworksSet, writer) -> None:
    c.execute("INSERT INTO local_networks(site, exempt, cidrs, clock) VALUES (?,?,?,?) ON CONFLICT(site) DO UPDATE"
              " SET exempt=excluded.exempt, cidrs=excluded.cidrs, clock=excluded.clock"
              " WHERE excluded.clock > local_networks.clock",
              (env.origin, int(e.exempt), json.dumps(list(e.cidrs)), clock(env.ts, env.origin)))


def _download_caps(c, env, e: ev.DownloadCapsSet, writer) -> None:
    c.execute("INSERT INTO download_caps(site, egress_bps, max_concurrent, per_client, clock) VALUES (?,?,?,?,?)"
              " ON CONFLICT(site) DO UPDATE SET egress_bps=excluded.egress_bps,"
              " max_concurrent=excluded.max_concurrent, per_client=excluded.per_client, clock=excluded.clock"
              " WHERE excluded.clock > download_caps.clock",
              (env.origin, e.egress_bps, e.max_concurrent, e.per_client, clock(env.ts, env.origin)))


def _package_urgency(c, env, e: ev.PackageUrgencySet, writer) -> None:
    c.execute("INSERT INTO urgent_packages(name, urgent, reason, marked_by, origin, marked_at, clock)"
              " VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET urgent=excluded.urgent,"
              " reason=excluded.reason, marked_by=excluded.marked_by, origin=excluded.origin,"
              " marked_at=excluded.marked_at, clock=excluded.clock WHERE excluded.clock > urgent_packages.clock",
              (e.name, int(e.urgent), e.reason, env.actor, env.origin, env.ts, clock(env.ts, env.origin)))


_HANDLERS = {
    ev.JamfPackageSynced: _jamf_package_synced,
    ev.JamfDriftDetected: _jamf_drift,
    ev.JamfDriftCleared: _jamf_drift,
    ev.JamfDistributionPointRegistered: _jamf_dp_registered,
    ev.PackageUploaded: _package_uploaded,
    ev.PackageAvailable: _package_available,
    ev.PackagesAvailable: _packages_available,
    ev.PackageReplaced: _package_replaced,
    ev.PackageTransferFailed: _package_transfer_failed,
    ev.PackageDamaged: _package_damaged,
    ev.PackageStaged: _package_staged,
    ev.PackageWithdrawn: _package_withdrawn,
    ev.PackageDeleted: _package_deleted,
    ev.PeerInvited: _peer_invited,
    ev.PeerRegistered: _peer_registered,
    ev.PeerRemoved: _peer_removed,
    ev.TokenCreated: _token_created,
    ev.TokenRevoked: _token_revoked,
    ev.NatsCredentialCreated: _nats_credential_created,
    ev.NatsCredentialRevoked: _nats_credential_revoked,
    ev.WebhookSubscribed: _webhook_subscribed,
    ev.WebhookRemoved: _webhook_removed,
    ev.EmailSubscribed: _email_subscribed,
    ev.EmailUnsubscribed: _email_unsubscribed,
    ev.UserCreated: _user_created,
    ev.UserRoleChanged: _user_update("role", "role"),
    ev.UserPasswordChanged: _user_update("password_sealed", "password_sealed"),
    ev.UserDetailsChanged: _user_update("display_name", "display_name"),
    ev.UserRemoved: _user_removed,
    ev.StagesAccepted: _stages_accepted,
    ev.LinkBandwidthSet: _link_bandwidth,
    ev.LinkBandwidthCleared: _link_bandwidth,
    ev.LocalNetworksSet: _local_networks,
    ev.DownloadCapsSet: _download_caps,
    ev.PackageUrgencySet: _package_urgency,
}


LOCAL_COLUMNS = {("events", "position")}  # local cursors: depend on interleaving, not on the log
LOCAL_TABLES = {"projection_errors"}  # the projector process's own state, not folded from a log


def dump(conn: sqlite3.Connection) -> dict[str, list[tuple]]:
    """Every table's rows, sorted, less local cursors and state: what a rebuild is compared on."""
    tables = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        if r[0] not in LOCAL_TABLES]
    out = {}
    for t in tables:
        cols = [r[1] for r in conn.execute(f'PRAGMA table_info("{t}")') if (t, r[1]) not in LOCAL_COLUMNS]
        select = ", ".join(f'"{c}"' for c in cols)
        out[t] = sorted(tuple(r) for r in conn.execute(f'SELECT {select} FROM "{t}"'))
    return out
