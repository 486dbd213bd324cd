"""The read side: plain SQL over the read model, returning typed, frozen msgspec structs.

A struct's fields are in the order the API has always sent them: the gateway returns them as
they are (Litestar encodes msgspec structs), so the JSON keeps its keys, values and order.
Fields a row has only in some answers default to ``UNSET`` and are left out of the JSON."""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Collection, Iterator, Sequence
from typing import NamedTuple

import msgspec
from msgspec import UNSET, UnsetType

from odst.bus.authorization import Subscriber
from odst.events import codec
from odst.events.watch import Landmark, Recorded
from odst.naming import name_key
from odst.store.hashing import Manifest


class View(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every view's answer: frozen (inherited); each struct says kw_only=True itself,
    as msgspec does not inherit it."""


class Availability(View, kw_only=True):
    """One site's latest report on a package's current content. A transfer in progress here
    (gateway: the replicator's progress) adds its chunk counts and rate."""
    status: str
    detail: str
    chunks_done: int | UnsetType = UNSET
    chunks_total: int | UnsetType = UNSET
    rate_bytes_per_s: float | UnsetType = UNSET
    updated_at: int | None


class Package(View, kw_only=True):
    """A current package with its chunk hashes, availability per site and, from ``package()``,
    the content each site serves under the name (``serving``)."""
    name: str
    size: int
    sha1: str
    sha512: str
    blake3: str
    chunk_size: int
    chunks: list[str]
    stage: str
    origin: str
    uploaded_at: int
    uploaded_by: str
    updated_at: int
    generation: int
    chunk_count: int
    availability: dict[str, Availability]
    serving: dict[str, str] | UnsetType = UNSET


class PackageRow(View, kw_only=True):
    """A row of a package list: ``chunk_count`` instead of the chunk hashes."""
    name: str
    size: int
    sha1: str
    sha512: str
    blake3: str
    chunk_size: int
    chunk_count: int
    stage: str
    origin: str
    uploaded_at: int
    uploaded_by: str
    updated_at: int
    availability: dict[str, Availability]


class ServedContent(View, kw_only=True):
    """A content a site may serve under a name; ``key`` (naming.name_key) is its file's name."""
    key: str
    name: str
    size: int
    blake3: str
    sha1: str
    uploaded_at: int


class Conflict(View, kw_only=True):
    """A live content that lost its name (any spelling) to an earlier upload elsewhere."""
    name: str
    blake3: str
    origin: str
    first_clock: str
    winner: str
    winner_origin: str
    winner_name: str


class Spelling(View, kw_only=True):
    name: str
    blake3: str
    same_content: bool


class NameCollision(View, kw_only=True):
    """A key more than one live spelling stands for: the one kept and the others."""
    key: str
    kept: str
    blake3: str
    others: list[Spelling]


class Event(View, kw_only=True):
    """A folded event as the API and webhooks show it: the envelope decoded, and the signed bytes."""
    position: int
    id: str
    stream: str
    stream_seq: int
    subject: str
    origin: str
    seq: int
    type: str
    ts: int
    actor: str
    verified: bool
    envelope: dict
    signed: str


class Quarantined(View, kw_only=True):
    """A message the projector refused, with its bytes (base64)."""
    stream: str
    stream_seq: int
    subject: str
    origin: str
    kind: str
    reason: str
    payload: str


class Token(View, kw_only=True):
    token_id: str
    name: str
    role: str
    created_at: int
    created_by: str
    revoked_at: int | None


class NatsCredential(View, kw_only=True):
    credential_id: str
    name: str
    role: str
    nkey: str
    created_at: int
    created_by: str
    revoked_at: int | None
    revoked_by: str | None


class PeerSite(View, kw_only=True):
    """A site this one knows a key for: registered here, or vouched for by peers."""
    site: str
    public_key: str
    name: str
    http_url: str
    registered_here: bool
    vouched_by: list[str]
    accepted_stages: list[str] | None


class Removal(View, kw_only=True):
    site: str
    upto_seq: int


class SiteChain(View, kw_only=True):
    """Where a site's verified chain stands in the read model."""
    site: str
    public_key: str
    name: str
    last_seq: int
    last_hash: str
    last_ts: int


class Webhook(View, kw_only=True):
    webhook_id: str
    url: str
    event_types: list[str]
    description: str
    event_id: str
    created_at: int
    created_by: str
    removed_at: int | None


class EmailSubscription(View, kw_only=True):
    subscription_id: str
    recipient: str
    event_types: list[str]
    event_id: str
    created_at: int
    created_by: str
    removed_at: int | None


class Subscription(View, kw_only=True):
    """A live webhook or email subscription and ``since``: the position of the event that made it."""
    id: str
    event_types: list[str]
    since: int
    recipient: str = ""  # email subscriptions


class User(View, kw_only=True):
    """A local user as the API shows it (never the password)."""
    username: str
    display_name: str
    role: str
    created_at: int
    created_by: str
    updated_at: int | None
    updated_by: str | None
    password_changed_at: int | None


class UserAccount(View, kw_only=True):
    """A live local user with its sealed password: what sign-in and sessions check."""
    username: str
    display_name: str
    role: str
    password_sealed: str
    created_at: int


class SiteSetting(View, kw_only=True):
    value: object
    updated_at: int
    updated_by: str


class SiteName(View, kw_only=True):
    """The name a site chose last (its latest SiteRenamed)."""
    name: str
    updated_at: int
    updated_by: str


class Damaged(View, kw_only=True):
    """A current package found damaged here, awaiting repair, and who could repair it."""
    name: str
    blake3: str
    reason: str
    found_by: str
    found_at: int
    sources: list[str]


class ChunkRejection(View, kw_only=True):
    """A peer's ChunkRejected naming this site as the source."""
    position: int
    reporter: str
    ts: int
    name: str
    blake3: str
    chunk: int
    reason: str


def _availability(availability: list[sqlite3.Row]) -> dict[str, Availability]:
    return {a["site"]: Availability(status=a["status"], detail=a["detail"], updated_at=int(a["clock"][:15]))
            for a in availability}


def _package(row: sqlite3.Row, availability: list[sqlite3.Row], **more) -> Package:
    chunks = json.loads(row["chunks"])
    return Package(name=row["name"], size=row["size"], sha1=row["sha1"], sha512=row["sha512"],
                   blake3=row["blake3"], chunk_size=row["chunk_size"], chunks=chunks, stage=row["stage"],
                   origin=row["origin"], uploaded_at=row["uploaded_at"], uploaded_by=row["uploaded_by"],
                   updated_at=row["updated_at"], generation=row["generation"], chunk_count=len(chunks),
                   availability=_availability(availability), **more)


def _package_row(row: sqlite3.Row, availability: list[sqlite3.Row]) -> PackageRow:
    return PackageRow(name=row["name"], size=row["size"], sha1=row["sha1"], sha512=row["sha512"],
                      blake3=row["blake3"], chunk_size=row["chunk_size"], chunk_count=row["chunk_count"],
                      stage=row["stage"], origin=row["origin"], uploaded_at=row["uploaded_at"],
                      uploaded_by=row["uploaded_by"], updated_at=row["updated_at"],
                      availability=_availability(availability))


def package(conn: sqlite3.Connection, name: str) -> Package | None:
    """The package any spelling of ``name`` stands for (naming.name_key); ``name`` in the
    answer is the spelling it is shown by."""
    key = name_key(name)
    row = conn.execute("SELECT * FROM packages WHERE key=?", (key,)).fetchone()
    if row is None:
        return None
    avail = conn.execute("SELECT * FROM availability WHERE key=? AND blake3=? ORDER BY site",
                         (key, row["blake3"])).fetchall()
    return _package(row, avail, serving=sites_serving(conn, key))


# Columns a package list may be sorted by (the API's ``sort``), each with name as tie-break.
PACKAGE_SORTS = ("name", "stage", "size", "uploaded_at", "updated_at")
_LIST_COLUMNS = ("key, name, size, sha1, sha512, blake3, chunk_size, json_array_length(chunks) AS chunk_count,"
                 " stage, origin, uploaded_at, uploaded_by, updated_at")


def _package_filter(stage: str | None, q: str | None, names: list[str] | None) -> tuple[str, list]:
    sql, args = " WHERE 1=1", []
    if stage:
        sql += " AND stage=?"
        args.append(stage)
    if q:
        sql += " AND instr(lower(name), lower(?)) > 0"
        args.append(q)
    if names is not None:  # exact names, any spelling of each (naming.name_key)
        sql += f" AND key IN ({','.join('?' * len(names))})"
        args += [name_key(n) for n in names]
    return sql, args


def packages(conn: sqlite3.Connection, *, stage: str | None = None, q: str | None = None,
             names: list[str] | None = None, sort: str = "name", descending: bool = False,
             limit: int = 1000, offset: int = 0, chunks: bool = False) -> list[PackageRow] | list[Package]:
    """One page of current packages. Without ``chunks`` a row carries ``chunk_count`` instead of
    every chunk's SHA1 (13.5 KB for a 300 MB package): lists stay small at thousands of packages."""
    if sort not in PACKAGE_SORTS:
        raise ValueError(f"sort must be one of {', '.join(PACKAGE_SORTS)}")
    where, args = _package_filter(stage, q, names)
    order = "DESC" if descending else "ASC"
    tie = f", name {order}" if sort != "name" else ""
    rows = conn.execute(f"SELECT {'*' if chunks else _LIST_COLUMNS} FROM packages{where}"
                        f" ORDER BY {sort} {order}{tie} LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
    avail: dict[str, list] = {}
    if rows:  # only this page's availability, in one query
        marks = ",".join("?" * len(rows))
        for a in conn.execute(f"SELECT * FROM availability WHERE key IN ({marks}) ORDER BY site",
                              [r["key"] for r in rows]):
            avail.setdefault(a["key"], []).append(a)
    make = _package if chunks else _package_row
    return [make(r, [a for a in avail.get(r["key"], []) if a["blake3"] == r["blake3"]]) for r in rows]


def package_count(conn: sqlite3.Connection, *, stage: str | None = None, q: str | None = None) -> int:
    where, args = _package_filter(stage, q, None)
    # The packages view has one row per live key; without a stage filter, count the keys
    # themselves and skip the view's per-row stage lookups (3x faster at 5,000 packages).
    # (q matches the spelling shown, which only the view has.)
    source = "packages" if stage or q else "(SELECT DISTINCT key FROM live_contents)"
    return conn.execute(f"SELECT count(*) FROM {source}{where}", args).fetchone()[0]


def _served(row: sqlite3.Row | None) -> ServedContent | None:
    return ServedContent(**row) if row is not None else None


def servable(conn: sqlite3.Connection, name: str, site: str, stages: list[str] | None = None
             ) -> ServedContent | None:
    """The content this site serves under any spelling of ``name`` (naming.name_key): the one it
    holds, which is the current content or, while a replacement is on its way here, the one it
    replaces (view 'serving'). Given ``stages`` (the site's accepted stages), only while the
    package's stage is one of them: a package demoted out of them is withdrawn here at once.
    ``key`` is the file's name in the store."""
    sql = ("SELECT c.key, c.name, c.size, c.blake3, c.sha1, c.uploaded_at FROM serving s JOIN contents c"
           " ON c.key=s.key AND c.blake3=s.blake3 WHERE s.key=? AND s.site=?")
    args: list = [name_key(name), site]
    if stages is not None:
        sql += (" AND (SELECT p.stage FROM packages p WHERE p.key=s.key)"
                f" IN ({','.join('?' * len(stages))})")
        args += stages
    return _served(conn.execute(sql, args).fetchone())


def served_content(conn: sqlite3.Connection, name: str, blake3: str) -> ServedContent | None:
    """A content of ``name`` that some site may still serve (not deleted, the name not gone):
    what a download names by the identity of the file it opened (``store.files.content_tag``)."""
    return _served(conn.execute(
        "SELECT c.key, c.name, c.size, c.blake3, c.sha1, c.uploaded_at FROM contents c"
        " WHERE c.key=? AND c.blake3=? AND EXISTS (SELECT 1 FROM live_contents l WHERE l.key=c.key)"
        " AND NOT EXISTS (SELECT 1 FROM tombstones t WHERE t.key=c.key AND t.blake3=c.blake3"
        " AND t.clock >= c.last_clock)", (name_key(name), blake3)).fetchone())


def sites_serving(conn: sqlite3.Connection, name: str) -> dict[str, str]:
    """site -> blake3 of the content each (not removed) site serves under ``name`` (any
    spelling): during a replacement, the old content until that site swapped to the new one."""
    return {r[0]: r[1] for r in conn.execute(
        "SELECT site, blake3 FROM serving WHERE key=? AND site NOT IN (SELECT site FROM removals)"
        " ORDER BY site", (name_key(name),))}


def published_names(conn: sqlite3.Connection, site: str) -> set[str]:
    """Keys (naming.name_key) under which this site serves a content: the files packages/
    should contain (the store names files by key)."""
    return {r[0] for r in conn.execute("SELECT key FROM serving WHERE site=?", (site,))}


def conflicts(conn: sqlite3.Connection) -> list[Conflict]:
    return [Conflict(**r) for r in conn.execute("SELECT * FROM conflicts ORDER BY name, first_clock")]


def name_collisions(conn: sqlite3.Connection) -> list[NameCollision]:
    """Keys that more than one live spelling stands for (sql/014_names.sql): per key, the spelling
    kept (and its content) and every other spelling with its content, earliest first."""
    out: dict[str, NameCollision] = {}
    for r in conn.execute("SELECT * FROM name_collisions ORDER BY key, first_clock, name"):
        entry = out.setdefault(r["key"], NameCollision(key=r["key"], kept=r["kept"], blake3=r["kept_blake3"],
                                                        others=[]))
        if r["name"] != r["kept"] or r["blake3"] != r["kept_blake3"]:
            entry.others.append(Spelling(name=r["name"], blake3=r["blake3"],
                                         same_content=r["blake3"] == r["kept_blake3"]))
    return list(out.values())


def event(row: sqlite3.Row) -> Event:
    """A row of ``events`` as the API shows it (verified when it was folded)."""
    payload = bytes(row["payload"])
    envelope = codec.to_builtins(codec.decode_body(codec.unverified_body(payload)))
    return Event(position=row["position"], id=row["id"], stream=row["stream"], stream_seq=row["stream_seq"],
                 subject=row["subject"], origin=row["origin"], seq=row["seq"], type=row["type"], ts=row["ts"],
                 actor=row["actor"], verified=True, envelope=envelope,
                 signed=base64.b64encode(payload).decode("ascii"))


def events(conn: sqlite3.Connection, *, after: int = 0, limit: int = 100,
           type_: str | None = None, origin: str | None = None, name: str | None = None,
           actor: str | None = None, since: int | None = None, until: int | None = None,
           before: int | None = None) -> list[Event]:
    """Events after ``after``, oldest first; with ``before``, the newest ones below it, newest first."""
    sql, args = "SELECT * FROM events WHERE position > ?", [after]
    for clause, value in (("position < ?", before), ("actor = ?", actor or None), ("ts >= ?", since),
                          ("ts < ?", until), ("type = ?", type_ or None), ("origin = ?", origin or None),
                          ("(subject_name = ? OR id IN (SELECT event_id FROM event_names WHERE name = ?))",
                           name or None)):
        if value is not None:
            sql += f" AND {clause}"
            args += [value] * clause.count("?")
    sql += f" ORDER BY position {'DESC' if before is not None else ''} LIMIT ?"
    args.append(limit)
    return [event(r) for r in conn.execute(sql, args)]


def last_position(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


def folded_types(conn: sqlite3.Connection, after: int) -> tuple[int, set[str]]:
    """The position read up to and the event types folded after position ``after`` (a cheap
    look at what changed, for work that cares about a few types; a returned position below
    ``after`` means the read model was rebuilt)."""
    upto = last_position(conn)
    return upto, {r[0] for r in conn.execute(
        "SELECT DISTINCT type FROM events WHERE position > ? AND position <= ?", (after, upto))}


def quarantined(row: sqlite3.Row) -> Quarantined:
    """A row of ``quarantine`` as the API and webhooks show it."""
    return Quarantined(stream=row["stream"], stream_seq=row["stream_seq"], subject=row["subject"],
                       origin=row["origin"], kind=row["kind"], reason=row["reason"],
                       payload=base64.b64encode(bytes(row["payload"])).decode("ascii"))


def quarantine(conn: sqlite3.Connection, limit: int = 100) -> list[Quarantined]:
    return [quarantined(r) for r in conn.execute("SELECT * FROM quarantine ORDER BY stream, stream_seq LIMIT ?",
                                  (limit,))]


_TOKEN = "SELECT token_id, name, role, created_at, created_by, revoked_at FROM tokens"


def token_by_hash(conn: sqlite3.Connection, digest: str, site: str) -> Token | None:
    row = conn.execute(_TOKEN + " WHERE token_sha256=? AND site=? AND revoked_at IS NULL",
                       (digest, site)).fetchone()
    return Token(**row) if row is not None else None


def tokens(conn: sqlite3.Connection, site: str) -> list[Token]:
    return [Token(**r) for r in conn.execute(_TOKEN + " WHERE site=? ORDER BY created_at", (site,))]


def nats_credentials(conn: sqlite3.Connection, *, include_revoked: bool = True) -> list[NatsCredential]:
    """This site's NATS credentials for downstream services (public keys only), oldest first."""
    sql = ("SELECT credential_id, name, role, nkey, created_at, created_by, revoked_at, revoked_by"
           " FROM nats_credentials" + ("" if include_revoked else " WHERE revoked_at IS NULL"))
    return [NatsCredential(**r) for r in conn.execute(sql + " ORDER BY created_at, credential_id")]


def nats_subscribers(conn: sqlite3.Connection) -> list:
    """The active subscriber credentials as the broker's users need them
    (``odst.bus.authorization.Subscriber``: name and public NKey)."""
    try:
        rows = conn.execute("SELECT name, nkey FROM nats_credentials WHERE role='subscriber'"
                            " AND revoked_at IS NULL ORDER BY name").fetchall()
    except sqlite3.OperationalError:  # no such table: a read model older than credentials
        return []
    return [Subscriber(name=r["name"], nkey=r["nkey"]) for r in rows]


def count(conn: sqlite3.Connection, table: str) -> int:
    return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]


def local_content(conn: sqlite3.Connection, blake3: str, site: str) -> sqlite3.Row | None:
    """A live content held here with this blake3 (any name), for serving chunks to peers."""
    return conn.execute(
        "SELECT c.name, c.size, c.chunk_size FROM live_contents c JOIN serving s"
        " ON s.key=c.key AND s.blake3=c.blake3 AND s.site=?"
        " WHERE c.blake3=? LIMIT 1", (site, blake3)).fetchone()


def _keys_clause(column: str, keys: Collection[str] | None) -> tuple[str, list]:
    if keys is None:
        return "", []
    return f" AND {column} IN ({','.join('?' * len(keys))})", list(keys)


def wanted(conn: sqlite3.Connection, site: str, stages: list[str],
           keys: Collection[str] | None = None) -> list[sqlite3.Row]:
    """Current packages in an accepted stage that this site does not serve yet; given ``keys``
    (naming.name_key), only among those (what changed: ``changed_keys``)."""
    marks = ",".join("?" * len(stages))
    only, args = _keys_clause("p.key", keys)
    return conn.execute(
        f"SELECT * FROM packages p WHERE p.stage IN ({marks}){only} AND NOT EXISTS ("  # the view 'serving', unrolled
        " SELECT 1 FROM availability a WHERE a.key=p.key AND a.site=? AND a.status='available'"
        " AND a.blake3=p.blake3 AND a.clock = (SELECT max(b.clock) FROM availability b WHERE b.key=p.key"
        " AND b.site=a.site AND b.status IN ('available', 'withdrawn'))) ORDER BY p.uploaded_at, p.name",
        (*stages, *args, site)).fetchall()


# Events that change what the replicator wants of one package (named by subject_name, or of
# several, named in event_names), and events that may change it for every package (accepted
# stages, the peers' standing).
PACKAGE_EVENTS = ("PackageUploaded", "PackageReplaced", "PackageAvailable", "PackagesAvailable",
                  "PackageTransferFailed", "PackageDamaged", "PackageStaged", "PackageWithdrawn", "PackageDeleted",
                  "PackageUrgencySet")
CATALOGUE_EVENTS = ("StagesAccepted", "PeerRemoved", "PeerRegistered", "SiteFounded")


class Changes(NamedTuple):
    """What was folded after a cursor (``changed_keys``)."""
    upto: int  # the event position read up to: the next cursor
    keys: set[str]  # naming.name_key of every package those events touched
    everything: bool  # one of them may change every package's standing (CATALOGUE_EVENTS)
    types: set[str]  # the event types among them (PACKAGE_EVENTS and CATALOGUE_EVENTS only)


def changed_keys(conn: sqlite3.Connection, after: int) -> Changes:
    """What was folded after event ``position`` ``after``: the position read up to, the keys
    (naming.name_key) of the packages those events touched, and whether one of them may change
    every package's standing (CATALOGUE_EVENTS). Positions are given in commit order by the one
    writer, so every event up to the returned position is visible to the caller's next query.
    A position below ``after`` means the read model was rebuilt: the caller starts over."""
    upto = last_position(conn)
    keys: set[str] = set()
    types: set[str] = set()
    for type_, subject in conn.execute(
            "SELECT type, subject_name FROM events WHERE position > ? AND position <= ? UNION ALL"
            " SELECT e.type, n.name FROM events e JOIN event_names n ON n.event_id = e.id"
            " WHERE e.position > ? AND e.position <= ?", (after, upto, after, upto)):
        if type_ in PACKAGE_EVENTS:
            if subject:  # (a PackagesAvailable's own row: its names are the rows from event_names)
                keys.add(name_key(subject))
            types.add(type_)
        elif type_ in CATALOGUE_EVENTS:
            types.add(type_)
    return Changes(upto, keys, bool(types & set(CATALOGUE_EVENTS)), types)


def unaccepted_held(conn: sqlite3.Connection, site: str, stages: list[str],
                    keys: Collection[str] | None = None) -> list[sqlite3.Row]:
    """Packages this site serves a content of (view 'serving': the current one, or the one a
    replacement supersedes) whose stage it does not accept: not served here (servable), their
    files withdrawn after the grace period. ``updated_at``: when the
    package last changed (upload or stage), in ms. Given ``keys``, only among those."""
    marks = ",".join("?" * len(stages))
    only, args = _keys_clause("p.key", keys)
    return conn.execute(
        "SELECT p.key, p.name, s.blake3, p.stage, p.updated_at FROM packages p JOIN serving s"
        " ON s.key=p.key AND s.site=?"
        f" WHERE p.stage NOT IN ({marks}){only} ORDER BY p.name", (site, *stages, *args)).fetchall()


IN_PER_QUERY = 500  # values bound in one ``IN (...)`` by rows_in


def rows_in(conn: sqlite3.Connection, sql: str, values: Sequence, *after) -> Iterator:
    """The rows of ``sql``, whose ``{marks}`` is an ``IN`` list over ``values``, asked
    IN_PER_QUERY values at a time (one query for a batch, not one per value); ``after`` are
    bound after them."""
    for i in range(0, len(values), IN_PER_QUERY):
        chunk = values[i:i + IN_PER_QUERY]
        yield from conn.execute(sql.format(marks=",".join("?" * len(chunk))), (*chunk, *after))


def current_contents(conn: sqlite3.Connection, names: list[str]) -> dict[str, str]:
    """key (naming.name_key) -> the content each of the packages ``names`` (any spelling)
    stands for now; a name with no package is absent."""
    return dict(rows_in(conn, "SELECT key, blake3 FROM packages WHERE key IN ({marks})",
                        sorted({name_key(n) for n in names})))


def sources(conn: sqlite3.Connection, name: str, blake3: str, site: str) -> list[str]:
    """Other trusted sites that serve a verified copy of this content under this name."""
    return [r[0] for r in conn.execute(
        "SELECT s.site FROM serving s WHERE s.key=? AND s.blake3=?"
        " AND s.site<>? AND s.site NOT IN (SELECT site FROM removals) ORDER BY s.site",
        (name_key(name), blake3, site))]


def sources_of(conn: sqlite3.Connection, pairs: Collection[tuple[str, str]],
               site: str) -> dict[tuple[str, str], list[str]]:
    """``sources`` of each (name, blake3) in ``pairs``, in one query per IN_PER_QUERY names
    (a query per package was two statements per package pulled in a catch-up); a pair no
    other site serves is absent."""
    asked: dict[tuple[str, str], list[tuple[str, str]]] = {}  # (key, blake3) -> its pairs (spellings)
    for name, blake3 in pairs:
        asked.setdefault((name_key(name), blake3), []).append((name, blake3))
    out: dict[tuple[str, str], list[str]] = {}
    for key, blake3, holder in rows_in(
            conn, "SELECT s.key, s.blake3, s.site FROM serving s WHERE s.key IN ({marks})"
            " AND s.site<>? AND s.site NOT IN (SELECT site FROM removals) ORDER BY s.site",
            sorted({key for key, _ in asked}), site):
        for pair in asked.get((key, blake3), ()):
            out.setdefault(pair, []).append(holder)
    return out


def peer_sites(conn: sqlite3.Connection, site: str) -> list[PeerSite]:
    """Every site this one knows a key for (registered here or vouched for by a peer), less removed."""
    rows = conn.execute(
        "SELECT d.site, d.public_key, d.name, d.http_url, d.vouched_by, d.clock FROM directory d"
        " WHERE d.site<>? AND d.site NOT IN (SELECT site FROM removals)"
        " ORDER BY d.site, (d.vouched_by = ?) DESC, d.clock DESC", (site, site)).fetchall()
    policies = {r["site"]: json.loads(r["stages"]) for r in conn.execute("SELECT * FROM stage_policies")}
    renamed = site_names(conn)
    out: dict[str, dict] = {}
    for r in rows:
        chosen = renamed.get(r["site"])
        entry = out.setdefault(r["site"], {"site": r["site"], "public_key": r["public_key"],
                                           "name": chosen.name if chosen else r["name"], "http_url": r["http_url"],
                                           "registered_here": False, "vouched_by": [],
                                           "accepted_stages": policies.get(r["site"])})
        if r["vouched_by"] == site:
            entry["registered_here"] = True
        else:
            entry["vouched_by"].append(r["vouched_by"])
    return [PeerSite(**e) for e in out.values()]


def removed_peers(conn: sqlite3.Connection) -> list[Removal]:
    return [Removal(**r) for r in conn.execute("SELECT site, upto_seq FROM removals ORDER BY site")]


def site_chain(conn: sqlite3.Connection, site: str) -> SiteChain | None:
    row = conn.execute("SELECT site, public_key, name, last_seq, last_hash, last_ts FROM sites WHERE site=?",
                       (site,)).fetchone()
    return SiteChain(**row) if row is not None else None


def replicated_state(conn: sqlite3.Connection) -> list[list]:
    """What every converged site agrees on: per current package, its content, stage and holders."""
    holders: dict[tuple[str, str], list[str]] = {}
    for a in conn.execute("SELECT s.key, s.blake3, s.site FROM serving s JOIN packages p"
                          " ON p.key=s.key AND p.blake3=s.blake3"
                          " WHERE s.site NOT IN (SELECT site FROM removals) ORDER BY s.site"):
        holders.setdefault((a[0], a[1]), []).append(a[2])
    return [[r["name"], r["blake3"], r["stage"], holders.get((r["key"], r["blake3"]), [])]
            for r in conn.execute("SELECT key, name, blake3, stage FROM packages ORDER BY name")]


def file_holders(conn: sqlite3.Connection, site: str, *, after: str | None = None,
                 limit: int | None = None) -> dict[str, str]:
    """key -> blake3 of the content this site has said it holds (serves) under that key (the
    key is also the file's name in the store): the content of its latest report, which the
    key's one file holds. With ``after`` / ``limit``: one page, in key order, of the keys
    after ``after``."""
    if after is None and limit is None:
        return dict(conn.execute("SELECT key, blake3 FROM serving WHERE site=?", (site,)).fetchall())
    return dict(conn.execute("SELECT key, blake3 FROM serving WHERE site=? AND key > ? ORDER BY key LIMIT ?",
                             (site, after or "", -1 if limit is None else limit)).fetchall())


def adoption_targets(conn: sqlite3.Connection, site: str) -> dict[str, str]:
    """key -> the content this site's file of that key should hold after an upgrade from files
    named by spelling (``Store.adopt_spellings``): where this site said it holds the current
    package's content, that one (spellings that were two packages were two files, each claim
    true then); else the content it serves (file_holders)."""
    out = file_holders(conn, site)
    out.update(conn.execute(
        "SELECT p.key, p.blake3 FROM packages p JOIN availability a ON a.key=p.key AND a.blake3=p.blake3"
        " AND a.site=? AND a.status='available'", (site,)).fetchall())
    return out


def live_keys(conn: sqlite3.Connection, keys: Collection[str] | None = None) -> set[str]:
    """The keys of every name with live content: the only file names packages/ may hold.
    Given ``keys``, those of them that are live."""
    only, args = _keys_clause("key", keys)
    return {r[0] for r in conn.execute(f"SELECT DISTINCT key FROM live_contents WHERE 1=1{only}", args)}


def content_is_live(conn: sqlite3.Connection, blake3: str) -> bool:
    return conn.execute("SELECT 1 FROM live_contents WHERE blake3=? LIMIT 1", (blake3,)).fetchone() is not None


def _webhook(row: sqlite3.Row) -> Webhook:
    return Webhook(**{**row, "event_types": json.loads(row["event_types"])})


def _email_subscription(row: sqlite3.Row) -> EmailSubscription:
    return EmailSubscription(**{**row, "event_types": json.loads(row["event_types"])})


def webhooks(conn: sqlite3.Connection, *, include_removed: bool = False) -> list[Webhook]:
    sql = "SELECT * FROM webhooks" + ("" if include_removed else " WHERE removed_at IS NULL")
    return [_webhook(r) for r in conn.execute(sql + " ORDER BY created_at, webhook_id")]


def webhook(conn: sqlite3.Connection, webhook_id: str) -> Webhook | None:
    row = conn.execute("SELECT * FROM webhooks WHERE webhook_id=?", (webhook_id,)).fetchone()
    return _webhook(row) if row else None


def email_subscriptions(conn: sqlite3.Connection, *, include_removed: bool = False) -> list[EmailSubscription]:
    sql = "SELECT * FROM email_subscriptions" + ("" if include_removed else " WHERE removed_at IS NULL")
    return [_email_subscription(r) for r in conn.execute(sql + " ORDER BY created_at, subscription_id")]


def active_subscriptions(conn: sqlite3.Connection, table: str) -> list[Subscription]:
    """Live webhooks or email subscriptions with ``since``: the position of the event that made them."""
    id_, recipient = {"webhooks": ("webhook_id", "''"),
                      "email_subscriptions": ("subscription_id", "s.recipient")}[table]
    return [Subscription(id=r[0], event_types=json.loads(r[1]), since=r[2], recipient=r[3]) for r in conn.execute(
        f"SELECT s.{id_}, s.event_types, e.position, {recipient} FROM {table} s JOIN events e ON e.id = s.event_id"
        " WHERE s.removed_at IS NULL")]


_USER = ("SELECT username, display_name, role, created_at, created_by, updated_at, updated_by,"
         " password_changed_at FROM users WHERE removed_at IS NULL")


def users(conn: sqlite3.Connection) -> list[User]:
    return [User(**r) for r in conn.execute(_USER + " ORDER BY username")]


def user_account(conn: sqlite3.Connection, username: str) -> UserAccount | None:
    """A live local user (case-insensitive name), with its sealed password."""
    row = conn.execute("SELECT username, display_name, role, password_sealed, created_at FROM users"
                       " WHERE username=? AND removed_at IS NULL", (username,)).fetchone()
    return UserAccount(**row) if row is not None else None


def user(conn: sqlite3.Connection, username: str) -> User | None:
    row = conn.execute(_USER + " AND username=?", (username,)).fetchone()
    return User(**row) if row is not None else None


def site_setting(conn: sqlite3.Connection, key: str) -> SiteSetting | None:
    row = conn.execute("SELECT * FROM site_settings WHERE key=?", (key,)).fetchone()
    return SiteSetting(value=json.loads(row["value"]), updated_at=row["updated_at"],
                       updated_by=row["updated_by"]) if row else None


def replicated_stages(conn: sqlite3.Connection, settings) -> list[str]:
    """Stages replicated here now: the site's last StagesAccepted (kept to the configured
    ``stages``), else the ``accept_stages`` setting, else every stage."""
    chosen = site_setting(conn, "accepted_stages")
    if chosen is None:
        return settings.default_replicated_stages
    return [s for s in chosen.value if s in settings.stages]


def site_names(conn: sqlite3.Connection) -> dict[str, SiteName]:
    """The name each site chose last (its latest SiteRenamed, by its own sequence): site id ->
    its SiteName. A site that never renamed itself is absent."""
    out: dict[str, SiteName] = {}
    for row in conn.execute("SELECT origin, ts, actor, payload FROM events WHERE type='SiteRenamed'"
                            " ORDER BY origin, seq"):
        event = codec.decode_body(codec.unverified_body(bytes(row["payload"]))).event
        out[row["origin"]] = SiteName(name=event.name, updated_at=row["ts"], updated_by=row["actor"])
    return out


def site_name(conn: sqlite3.Connection, site_id: str, settings) -> str:
    """This site's name: its last SiteRenamed, else the site_name setting."""
    chosen = site_names(conn).get(site_id)
    return chosen.name if chosen else settings.site_name


def peer_log_alarms(conn: sqlite3.Connection, site: str) -> dict[str, str]:
    """Peers whose log diverged from this site's mirror of it and has not matched since (nor
    been removed by an admin): peer site id -> the reason recorded (its latest PeerLogDiverged)."""
    out: dict[str, str] = {}
    for row in conn.execute(
            "SELECT subject_name, type, payload FROM events WHERE origin=? AND type IN"
            " ('PeerLogDiverged', 'PeerLogRestored') AND subject_name NOT IN (SELECT site FROM removals)"
            " ORDER BY position", (site,)):
        if row["type"] == "PeerLogRestored":
            out.pop(row["subject_name"], None)
        else:
            event = codec.decode_body(codec.unverified_body(bytes(row["payload"]))).event
            out[row["subject_name"]] = event.reason
    return out


def recorded(conn: sqlite3.Connection, stream: str, origin: str):
    """What the read model holds of ``stream`` (whose events come from ``origin``): its
    checkpoint and the origin's first and last folded events, if folded from this stream."""
    row = conn.execute("SELECT seq FROM checkpoints WHERE stream=?", (stream,)).fetchone()
    chain = conn.execute("SELECT last_seq FROM sites WHERE site=?", (origin,)).fetchone()
    marks = []
    for seq in (1, chain[0] if chain else 0):
        ev = conn.execute("SELECT stream_seq, payload FROM events WHERE origin=? AND seq=? AND stream=?",
                          (origin, seq, stream)).fetchone() if seq else None
        marks.append(Landmark(ev[0], bytes(ev[1])) if ev else None)
    return Recorded(checkpoint=row[0] if row else 0, first=marks[0], last=marks[1])


def damaged(conn: sqlite3.Connection, site: str) -> list[Damaged]:
    """Current packages this site found damaged in its own store and has not repaired yet
    (out of service here), with whether any other site holds a verified copy to repair from."""
    rows = conn.execute(
        "SELECT p.name, d.blake3, d.reason, d.found_by, d.clock FROM damaged d JOIN packages p"
        " ON p.key=d.key AND p.blake3=d.blake3 WHERE d.site=? ORDER BY p.name", (site,)).fetchall()
    return [Damaged(name=r["name"], blake3=r["blake3"], reason=r["reason"], found_by=r["found_by"],
                    found_at=int(r["clock"][:15]), sources=sources(conn, r["name"], r["blake3"], site))
            for r in rows]


def is_damaged(conn: sqlite3.Connection, name: str, site: str) -> bool:
    """Is the current content of ``name`` out of service here, awaiting repair?"""
    return conn.execute(
        "SELECT 1 FROM damaged d JOIN packages p ON p.key=d.key AND p.blake3=d.blake3"
        " WHERE d.key=? AND d.site=?", (name_key(name), site)).fetchone() is not None


def chunk_rejections(conn: sqlite3.Connection, site: str, after: int,
                     limit: int = 500) -> tuple[list[ChunkRejection], int]:
    """Peers' ChunkRejected events naming ``site`` as the source, after event ``position``
    (reporter, when, and the event's fields, verified when they were folded), and the
    position to read on from."""
    out, upto = [], last_position(conn)  # read first: every event up to it is visible below
    rows = conn.execute("SELECT position, origin, ts, payload FROM events WHERE type='ChunkRejected'"
                        " AND position > ? AND position <= ? AND origin <> ? ORDER BY position LIMIT ?",
                        (after, upto, site, limit)).fetchall()
    last = rows[-1]["position"] if len(rows) == limit else upto
    for r in rows:
        e = codec.decode_body(codec.unverified_body(bytes(r["payload"]))).event
        if e.source == site:
            out.append(ChunkRejection(position=r["position"], reporter=r["origin"], ts=r["ts"], name=e.name,
                                      blake3=e.blake3, chunk=e.chunk, reason=e.reason))
    return out, last


def held_since(conn: sqlite3.Connection, name: str, blake3: str, site: str) -> int | None:
    """When this site last said it holds a verified copy of this content (ms), if it does now."""
    row = conn.execute("SELECT clock FROM availability WHERE key=? AND blake3=? AND site=?"
                       " AND status='available'", (name_key(name), blake3, site)).fetchone()
    return int(row[0][:15]) if row else None


def manifest(row: sqlite3.Row) -> Manifest:
    """The manifest of a ``contents`` row (``wanted``, ``local_content``): what the replicator pulls."""
    return Manifest(size=row["size"], sha1=row["sha1"], sha512=row["sha512"], blake3=row["blake3"],
                    chunk_size=row["chunk_size"], chunks=tuple(json.loads(row["chunks"])))


def chain_state(conn: sqlite3.Connection, stream: str, site: str) -> tuple[int, int, str]:
    """Where this site's own log stands in the read model, in one snapshot: the checkpoint of
    ``stream`` and the seq and hash of ``site``'s last verified event (0, 0, "" before any).
    ``EventLog`` starts its head from it."""
    row = conn.execute("SELECT coalesce((SELECT seq FROM checkpoints WHERE stream=?), 0),"
                       " coalesce(s.last_seq, 0), coalesce(s.last_hash, '')"
                       " FROM (SELECT 1) LEFT JOIN sites s ON s.site=?", (stream, site)).fetchone()
    return row[0], row[1], row[2]
