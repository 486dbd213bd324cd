"""The read side: plain SQL over the read model, returning plain dicts."""

from __future__ import annotations

import base64
import json
import sqlite3

from odst.events import codec


def _package(row: sqlite3.Row, availability: list[sqlite3.Row]) -> dict:
    d = dict(row)
    d.pop("first_clock", None)
    d["chunks"] = json.loads(d["chunks"])
    d["availability"] = {a["site"]: {"status": a["status"], "detail": a["detail"],
                                     "updated_at": int(a["clock"][:15])} for a in availability}
    return d


def package(conn: sqlite3.Connection, name: str) -> dict | None:
    row = conn.execute("SELECT * FROM packages WHERE name=?", (name,)).fetchone()
    if row is None:
        return None
    avail = conn.execute("SELECT * FROM availability WHERE name=? AND blake3=? ORDER BY site",
                         (name, row["blake3"])).fetchall()
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
                          " ON p.name = a.name AND p.blake3 = a.blake3 ORDER BY a.site"):
        avail.setdefault(a["name"], []).append(a)
    return [_package(r, avail.get(r["name"], [])) for r in rows]


def servable(conn: sqlite3.Connection, name: str, site: str) -> sqlite3.Row | None:
    """The package row if this site holds a verified copy of its current content."""
    return conn.execute(
        "SELECT p.name, p.size, p.blake3, p.sha1, p.uploaded_at FROM packages p JOIN availability a"
        " ON a.name=p.name AND a.blake3=p.blake3 AND a.site=? AND a.status='available'"
        " WHERE p.name=?", (site, name)).fetchone()


def published_names(conn: sqlite3.Connection, site: str) -> set[str]:
    """Names whose current content this site holds: the files packages/ should contain."""
    return {r[0] for r in conn.execute(
        "SELECT p.name FROM packages p JOIN availability a ON a.name=p.name AND a.blake3=p.blake3"
        " AND a.site=? AND a.status='available'", (site,))}


def conflicts(conn: sqlite3.Connection) -> list[dict]:
    return [dict(r) for r in conn.execute("SELECT * FROM conflicts ORDER BY name, first_clock")]


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
           type_: str | None = None, origin: str | None = None, name: str | None = None) -> list[dict]:
    sql, args = "SELECT * FROM events WHERE position > ?", [after]
    if type_:
        sql += " AND type=?"
        args.append(type_)
    if origin:
        sql += " AND origin=?"
        args.append(origin)
    if name:
        sql += " AND subject_name=?"
        args.append(name)
    sql += " ORDER BY position LIMIT ?"
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


def count(conn: sqlite3.Connection, table: str) -> int:
    return conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
