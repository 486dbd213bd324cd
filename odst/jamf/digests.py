"""Jamf Pro hashes besides SHA-512 (MD5, SHA3_512) of contents, kept beside the site.

The upload computes the configured one in its single pass (``StreamingUpload(extra_digests=…)``)
and the Jamf sync reads it here instead of reading the stored file again (14 GB is minutes).
These are local facts keyed by the content's blake3, not events: the event format stays as it
is, a rebuild of the read model does not touch them, and a missing value is computed again from
this site's copy (``hashing.file_digest``) and kept.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import structlog

log = structlog.get_logger("odst.jamf")

SCHEMA = ("CREATE TABLE IF NOT EXISTS digests (blake3 TEXT NOT NULL, hash_type TEXT NOT NULL,"
          " value TEXT NOT NULL, PRIMARY KEY (blake3, hash_type))")


def digests_path(data: Path) -> Path:
    return Path(data) / "jamf-digests.sqlite"


class Digests:
    """{(blake3, hash type): hex} in ``<data>/jamf-digests.sqlite``; one short connection per call
    (the gateway writes, the projector's Jamf sync reads, maybe in other processes)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        new = not self.path.exists()
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        if new:
            self.path.chmod(0o600)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(SCHEMA)
        return conn

    def get(self, blake3: str, hash_type: str) -> str | None:
        try:
            conn = self._connect()
            try:
                row = conn.execute("SELECT value FROM digests WHERE blake3=? AND hash_type=?",
                                   (blake3, hash_type)).fetchone()
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("jamf digests unreadable; hashing the file instead", error=str(exc))
            return None
        return row[0] if row else None

    def put(self, blake3: str, values: dict[str, str]) -> None:
        """Keep ``values`` ({hash type: hex}); a failure only costs a re-hash later, never the caller."""
        if not values:
            return
        try:
            conn = self._connect()
            try:
                conn.executemany("INSERT OR REPLACE INTO digests(blake3, hash_type, value) VALUES (?,?,?)",
                                 [(blake3, t, v) for t, v in values.items()])
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.warning("jamf digests not kept", error=str(exc), blake3=blake3)


def extra_types(jamf_url: str, hash_type: str) -> tuple[str, ...]:
    """Which hash the upload computes besides SHA-512: the Jamf record's, when Jamf Pro is configured."""
    return (hash_type,) if jamf_url and hash_type != "SHA_512" else ()
