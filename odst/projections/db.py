"""Opening the read model and applying its numbered schema files."""

from __future__ import annotations

import sqlite3
from importlib import resources
from pathlib import Path

from odst.naming import name_key


def connect(path: Path | str, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False,
                               isolation_level=None)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.row_factory = sqlite3.Row
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply sql/NNN_*.sql files newer than PRAGMA user_version; return the version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    # 014_names regroups packages by the key of their names: the one rule, from Python
    conn.create_function("name_key", 1, name_key, deterministic=True)
    files = sorted(p for p in resources.files("odst.projections").joinpath("sql").iterdir()
                   if p.name.endswith(".sql"))
    for f in files:
        n = int(f.name.split("_", 1)[0])
        if n <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(f.read_text()):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={n}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        version = n
    return version


def _statements(sql: str) -> list[str]:
    out, buf = [], []
    for line in sql.splitlines():
        stripped = line.split("--", 1)[0]
        buf.append(stripped)
        if stripped.rstrip().endswith(";"):
            stmt = "\n".join(buf).strip()
            if stmt.strip(";").strip():
                out.append(stmt)
            buf = []
    tail = "\n".join(buf).strip()
    if tail:
        out.append(tail)
    return out


def open_read_model(path: Path | str) -> sqlite3.Connection:
    conn = connect(path)
    migrate(conn)
    return conn
