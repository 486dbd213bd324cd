"""The read side: plain SQL over the read model, returning plain dicts."""

from __future__ import annotations

import base64
import json
import sqlite3

from odst.bus.authorization import Subscriber
from odst.events import codec
from odst.events.watch import Landmark, Recorded
from odst.naming import name_key


def _package(row: sqlite3.Row, availability: list[sqlite3.Row]) -> dict:
    d = dict(row)
    d.pop("first_clock", None)
    d.pop("key", None)
    d["chunks"] = json.loads(d["chunks"])
    d["availability"] = {a["site"]: {"status": a["status"], "detail": a["detail"],
                                     "updated_at": int(a["clock"][:15])} for a in availability}
    return d


def package(conn: sqlite3.Connection, name: str) -> dict | None:
    """The package any spelling of ``name`` stands for (naming.name_key); ``name`` in the
    answer is the spelling it is shown by."""
    key = name_key(name)
    row = conn.execute("SELECT * FROM packages WHERE key=?", (key,)).fetchone()
    if row is None:
        return None
    avail = conn.execute("SELECT * FROM availability WHERE key=? AND blake3=? ORDER BY site",
                         (key, row["blake3"])).fetchall()
    return _package(row, avail)


def packages(conn: sqlite3.Connection, *, stage: str | None = None, q: str | None = None,
             limit: int = 1000, offset: int = 0) -> list[dict]:
    sql, args = "SELECT * FROM packages WHERE 1=1", []
    if stage:
        sql += " AND stage=?"
        args.append(stage)
    if q:
        sql += " AND instr(lower(name), lower(?)) > 0"
        args.append(q)
    sql += " ORDER BY name LIMIT ? OFFSET ?"
    args += [limit, offset]
    rows = conn.execute(sql, args).fetchall()
    avail: dict[str, list] = {}
    for a in conn.execute("SELECT a.* FROM availability a JOIN packages p"
                          " ON p.key = a.key AND p.blake3 = a.blake3 ORDER BY a.site"):
        avail.setdefault(a["key"], []).append(a)
    return [_package(r, avail.get(r["key"], [])) for r in rows]


def servable(conn: sqlite3.Connection, name: str, site: str, stages: list[str] | None = None
             ) -> sqlite3.Row | None:
    """The package row (any spelling of ``name``) if this site holds a verified copy of its
    current content and, given ``stages`` (the site's accepted stages), its stage is one of
    them: a package demoted out of them is withdrawn here at once."""
    sql = ("SELECT p.key, p.name, p.size, p.blake3, p.sha1, p.uploaded_at, p.stage FROM packages p"
           " JOIN availability a ON a.key=p.key AND a.blake3=p.blake3 AND a.site=? AND a.status='available'"
           " WHERE p.key=?")
    args: list = [site, name_key(name)]
    if stages is not None:
        sql += f" AND p.stage IN ({','.join('?' * len(stages))})"
        args += stages
    return conn.execute(sql, args).fetchone()


def published_names(conn: sqlite3.Connection, site: str) -> set[str]:
    """Keys (naming.name_key) whose current content this site holds: the files packages/
    should contain (the store names files by key)."""
    return {r[0] for r in conn.execute(
        "SELECT p.key FROM packages p JOIN availability a ON a.key=p.key AND a.blake3=p.blake3"
        " AND a.site=? AND a.status='available'", (site,))}


def conflicts(conn: sqlite3.Connection) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT * FROM conflicts ORDER BY name, first_clock")]


def name_collisions(conn: sqlite3.Connection) -> list[dict]:
    """Keys that more than one live spelling stands for (sql/010_names.sql): per key, the spelling
    kept (and its content) and every other spelling with its content, earliest first."""
    out: dict[str, dict] = {}
    for r in conn.execute("SELECT * FROM name_collisions ORDER BY key, first_clock, name"):
        entry = out.setdefault(r["key"], {"kept": r["kept"], "blake3": r["kept_blake3"], "others": []})
        if r["name"] != r["kept"] or r["blake3"] != r["kept_blake3"]:
            entry["others"].append({"name": r["name"], "blake3": r["blake3"],
                                    "same_content": r["blake3"] == r["kept_blake3"]})
    return [{"key": k, **v} for k, v in out.items()]


def event_json(row: sqlite3.Row) -> dict:
    payload = bytes(row["payload"])
    envelope = codec.to_builtins(codec.decode_body(codec.unverified_body(payload)))
    return {
        "position": row["position"], "id": row["id"], "stream": row["stream"],
        "stream_seq": row["stream_seq"], "subject": row["subject"], "origin": row["origin"],
        "seq": row["seq"], "type": row["type"], "ts": row["ts"], "actor": row["actor"],
        "verified": True, "envelope": envelope,
        "signed": base64.b64encode(payload).decode("ascii"),
    }


def events(conn: sqlite3.Connection, *, after: int = 0, limit: int = 100,
           type_: str | None = None, origin: str | None = None, name: str | None = None,
           actor: str | None = None, since: int | None = None, until: int | None = None,
           before: int | None = None) -> list[dict]:
    """Events after ``after``, oldest first; with ``before``, the newest ones below it, newest first."""
    sql, args = "SELECT * FROM events WHERE position > ?", [after]
    for clause, value in (("position < ?", before), ("actor = ?", actor or None), ("ts >= ?", since),
                          ("ts < ?", until), ("type = ?", type_ or None), ("origin = ?", origin or None),
                          ("subject_name = ?", name or None)):
        if value is not None:
            sql += f" AND {clause}"
            args.append(value)
    sql += f" ORDER BY position {'DESC' if before is not None else ''} LIMIT ?"
    args.append(limit)
    return [event_json(r) for r in conn.execute(sql, args)]


def last_position(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0]


def quarantine(conn: sqlite3.Connection, limit: int = 100) -> list[dict]:
    return [{"stream": r["stream"], "stream_seq": r["stream_seq"], "subject": r["subject"],
             "origin": r["origin"], "kind": r["kind"], "reason": r["reason"],
             "payload": base64.b64encode(bytes(r["payload"])).decode("ascii")}
            for r in conn.execute("SELECT * FROM quarantine ORDER BY stream, stream_seq LIMIT ?",
                                  (limit,))]


def token_by_hash(conn: sqlite3.Connection, digest: str, site: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM tokens WHERE token_sha256=? AND site=? AND revoked_at IS NULL",
                        (digest, site)).fetchone()


def tokens(conn: sqlite3.Connection, site: str) -> list[dict]:
    return [{"token_id": r["token_id"], "name": r["name"], "role": r["role"],
             "created_at": r["created_at"], "created_by": r["created_by"],
             "revoked_at": r["revoked_at"]}
            for r in conn.execute("SELECT * FROM tokens WHERE site=? ORDER BY created_at", (site,))]


def nats_credentials(conn: sqlite3.Connection, *, include_revoked: bool = True) -> list[dict]:
    """This site's NATS credentials for downstream services (public keys only), oldest first."""
    sql = "SELECT * FROM nats_credentials" + ("" if include_revoked else " WHERE revoked_at IS NULL")
    return [{"credential_id": r["credential_id"], "name": r["name"], "role": r["role"], "nkey": r["nkey"],
             "created_at": r["created_at"], "created_by": r["created_by"],
             "revoked_at": r["revoked_at"], "revoked_by": r["revoked_by"]}
            for r in conn.execute(sql + " ORDER BY created_at, credential_id")]


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
        "SELECT c.name, c.size, c.chunk_size FROM live_contents c JOIN availability a"
        " ON a.key=c.key AND a.blake3=c.blake3 AND a.site=? AND a.status='available'"
        " WHERE c.blake3=? LIMIT 1", (site, blake3)).fetchone()


def wanted(conn: sqlite3.Connection, site: str, stages: list[str]) -> list[sqlite3.Row]:
    """Current packages in an accepted stage that this site does not hold yet."""
    marks = ",".join("?" * len(stages))
    return conn.execute(
        f"SELECT * FROM packages p WHERE p.stage IN ({marks}) AND NOT EXISTS ("
        " SELECT 1 FROM availability a WHERE a.key=p.key AND a.blake3=p.blake3 AND a.site=?"
        " AND a.status='available') ORDER BY p.uploaded_at, p.name", (*stages, site)).fetchall()


def unaccepted_held(conn: sqlite3.Connection, site: str, stages: list[str]) -> list[sqlite3.Row]:
    """Current packages this site holds (as available) whose stage it does not accept: not served
    here (servable), their files withdrawn after the grace period. ``updated_at``: when the
    package last changed (upload or stage), in ms."""
    marks = ",".join("?" * len(stages))
    return conn.execute(
        "SELECT p.key, p.name, p.blake3, p.stage, p.updated_at FROM packages p JOIN availability a"
        " ON a.key=p.key AND a.blake3=p.blake3 AND a.site=? AND a.status='available'"
        f" WHERE p.stage NOT IN ({marks}) ORDER BY p.name", (site, *stages)).fetchall()


def replaced_held(conn: sqlite3.Connection, site: str) -> list[sqlite3.Row]:
    """Live contents this site still says it holds although it holds its key's current package:
    the key's one file holds the current content, so those claims are stale (a conflict loser
    replaced here, or spellings an older log held as two packages)."""
    return conn.execute(
        "SELECT c.key, c.name, c.blake3 FROM availability a JOIN live_contents c ON c.key=a.key"
        " AND c.blake3=a.blake3 JOIN packages p ON p.key=a.key AND p.blake3<>a.blake3"
        " WHERE a.site=? AND a.status='available' AND EXISTS (SELECT 1 FROM availability h"
        " WHERE h.key=p.key AND h.blake3=p.blake3 AND h.site=a.site AND h.status='available')"
        " ORDER BY c.key, c.blake3", (site,)).fetchall()


def sources(conn: sqlite3.Connection, name: str, blake3: str, site: str) -> list[str]:
    """Other trusted sites that hold a verified copy of this content."""
    return [r[0] for r in conn.execute(
        "SELECT a.site FROM availability a WHERE a.key=? AND a.blake3=? AND a.status='available'"
        " AND a.site<>? AND a.site NOT IN (SELECT site FROM removals) ORDER BY a.site",
        (name_key(name), blake3, site))]


def peer_sites(conn: sqlite3.Connection, site: str) -> list[dict]:
    """Every site this one knows a key for (registered here or vouched for by a peer), less removed."""
    rows = conn.execute(
        "SELECT d.site, d.public_key, d.name, d.http_url, d.vouched_by, d.clock FROM directory d"
        " WHERE d.site<>? AND d.site NOT IN (SELECT site FROM removals)"
        " ORDER BY d.site, (d.vouched_by = ?) DESC, d.clock DESC", (site, site)).fetchall()
    policies = {r["site"]: json.loads(r["stages"]) for r in conn.execute("SELECT * FROM stage_policies")}
    out: dict[str, dict] = {}
    for r in rows:
        entry = out.setdefault(r["site"], {"site": r["site"], "public_key": r["public_key"],
                                           "name": r["name"], "http_url": r["http_url"],
                                           "registered_here": False, "vouched_by": [],
                                           "accepted_stages": policies.get(r["site"])})
        if r["vouched_by"] == site:
            entry["registered_here"] = True
        else:
            entry["vouched_by"].append(r["vouched_by"])
    return list(out.values())


def removed_peers(conn: sqlite3.Connection) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT site, upto_seq FROM removals ORDER BY site")]


def site_chain(conn: sqlite3.Connection, site: str) -> sqlite3.Row | None:
    return conn.execute("SELECT * FROM sites WHERE site=?", (site,)).fetchone()


def replicated_state(conn: sqlite3.Connection) -> list[list]:
    """What every converged site agrees on: per current package, its content, stage and holders."""
    holders: dict[tuple[str, str], list[str]] = {}
    for a in conn.execute("SELECT a.key, a.blake3, a.site FROM availability a JOIN packages p"
                          " ON p.key=a.key AND p.blake3=a.blake3 WHERE a.status='available'"
                          " AND a.site NOT IN (SELECT site FROM removals) ORDER BY a.site"):
        holders.setdefault((a[0], a[1]), []).append(a[2])
    return [[r["name"], r["blake3"], r["stage"], holders.get((r["key"], r["blake3"]), [])]
            for r in conn.execute("SELECT key, name, blake3, stage FROM packages ORDER BY name")]


def file_holders(conn: sqlite3.Connection, site: str) -> dict[str, str]:
    """key -> blake3 of the content this site has said it holds under that key, if still live
    (the key is also the file's name in the store). Where it said so of several contents of one
    key (spellings an older log held as two packages), the current package's: the one file
    holds that."""
    return {r[0]: r[1] for r in conn.execute(
        "SELECT a.key, a.blake3 FROM availability a JOIN live_contents c ON c.key=a.key"
        " AND c.blake3=a.blake3 WHERE a.site=? AND a.status='available'"
        " ORDER BY a.key, EXISTS (SELECT 1 FROM packages p WHERE p.key=a.key AND p.blake3=a.blake3)",
        (site,))}


def live_keys(conn: sqlite3.Connection) -> set[str]:
    """The keys of every name with live content: the only file names packages/ may hold."""
    return {r[0] for r in conn.execute("SELECT DISTINCT key FROM live_contents")}


def content_is_live(conn: sqlite3.Connection, blake3: str) -> bool:
    return conn.execute("SELECT 1 FROM live_contents WHERE blake3=? LIMIT 1", (blake3,)).fetchone() is not None


def _subscription(row: sqlite3.Row) -> dict:
    d = dict(row)
    d["event_types"] = json.loads(d["event_types"])
    return d


def webhooks(conn: sqlite3.Connection, *, include_removed: bool = False) -> list[dict]:
    sql = "SELECT * FROM webhooks" + ("" if include_removed else " WHERE removed_at IS NULL")
    return [_subscription(r) for r in conn.execute(sql + " ORDER BY created_at, webhook_id")]


def webhook(conn: sqlite3.Connection, webhook_id: str) -> dict | None:
    row = conn.execute("SELECT * FROM webhooks WHERE webhook_id=?", (webhook_id,)).fetchone()
    return _subscription(row) if row else None


def email_subscriptions(conn: sqlite3.Connection, *, include_removed: bool = False) -> list[dict]:
    sql = "SELECT * FROM email_subscriptions" + ("" if include_removed else " WHERE removed_at IS NULL")
    return [_subscription(r) for r in conn.execute(sql + " ORDER BY created_at, subscription_id")]


def active_subscriptions(conn: sqlite3.Connection, table: str) -> list[dict]:
    """Live webhooks or email subscriptions with ``since``: the position of the event that made them."""
    assert table in ("webhooks", "email_subscriptions")
    return [_subscription(r) for r in conn.execute(
        f"SELECT s.*, e.position AS since FROM {table} s JOIN events e ON e.id = s.event_id"
        " WHERE s.removed_at IS NULL")]


def _user(row: sqlite3.Row) -> dict:
    return {"username": row["username"], "display_name": row["display_name"], "role": row["role"],
            "created_at": row["created_at"], "created_by": row["created_by"],
            "updated_at": row["updated_at"], "updated_by": row["updated_by"],
            "password_changed_at": row["password_changed_at"]}


def users(conn: sqlite3.Connection) -> list[dict]:
    return [_user(r) for r in conn.execute(
        "SELECT * FROM users WHERE removed_at IS NULL ORDER BY username")]


def user_row(conn: sqlite3.Connection, username: str) -> sqlite3.Row | None:
    """A live local user (case-insensitive name), with its sealed password."""
    return conn.execute("SELECT * FROM users WHERE username=? AND removed_at IS NULL",
                        (username,)).fetchone()


def user(conn: sqlite3.Connection, username: str) -> dict | None:
    row = user_row(conn, username)
    return _user(row) if row else None


def site_setting(conn: sqlite3.Connection, key: str) -> dict | None:
    row = conn.execute("SELECT * FROM site_settings WHERE key=?", (key,)).fetchone()
    return {"value": json.loads(row["value"]), "updated_at": row["updated_at"],
            "updated_by": row["updated_by"]} if row else None


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
