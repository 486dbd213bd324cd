-- The read model. Everything here is a function of the event log: no wall-clock
-- values, so a rebuild from sequence 0 equals the live file row for row.

CREATE TABLE checkpoints (
  stream TEXT PRIMARY KEY,
  seq    INTEGER NOT NULL          -- last stream sequence applied or quarantined
);

CREATE TABLE sites (
  site       TEXT PRIMARY KEY,
  public_key TEXT NOT NULL,
  name       TEXT NOT NULL DEFAULT '',
  last_seq   INTEGER NOT NULL DEFAULT 0,   -- per-origin chain position
  last_hash  TEXT NOT NULL DEFAULT '',     -- blake3 of the last valid message
  last_ts    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE events (
  position   INTEGER PRIMARY KEY AUTOINCREMENT,
  id         TEXT NOT NULL UNIQUE,
  stream     TEXT NOT NULL,
  stream_seq INTEGER NOT NULL,
  subject    TEXT NOT NULL,
  origin     TEXT NOT NULL,
  seq        INTEGER NOT NULL,
  type       TEXT NOT NULL,
  ts         INTEGER NOT NULL,
  actor      TEXT NOT NULL,
  subject_name TEXT NOT NULL DEFAULT '',  -- the package (or token) the event is about
  payload    BLOB NOT NULL                -- the exact signed bytes
);
CREATE INDEX events_origin ON events(origin, seq);
CREATE INDEX events_name ON events(subject_name);

CREATE TABLE packages (
  name        TEXT PRIMARY KEY,
  size        INTEGER NOT NULL,
  sha1        TEXT NOT NULL,
  sha512      TEXT NOT NULL,
  blake3      TEXT NOT NULL,
  chunk_size  INTEGER NOT NULL,
  chunks      TEXT NOT NULL,               -- JSON list of chunk SHA1s
  stage       TEXT NOT NULL,
  origin      TEXT NOT NULL,
  uploaded_at INTEGER NOT NULL,            -- ms, from the event
  uploaded_by TEXT NOT NULL,
  updated_at  INTEGER NOT NULL
);

CREATE TABLE availability (
  name   TEXT NOT NULL,
  site   TEXT NOT NULL,
  blake3 TEXT NOT NULL,
  status TEXT NOT NULL,                    -- available | pending | downloading | failed
  detail TEXT NOT NULL DEFAULT '',
  updated_at INTEGER NOT NULL,
  PRIMARY KEY (name, site)
);

CREATE TABLE tombstones (
  name       TEXT NOT NULL,
  blake3     TEXT NOT NULL,
  origin     TEXT NOT NULL,
  deleted_at INTEGER NOT NULL,
  deleted_by TEXT NOT NULL,
  PRIMARY KEY (name, blake3)
);

CREATE TABLE tokens (
  token_id     TEXT PRIMARY KEY,
  name         TEXT NOT NULL,
  role         TEXT NOT NULL,
  token_sha256 TEXT NOT NULL UNIQUE,
  site         TEXT NOT NULL,
  created_at   INTEGER NOT NULL,
  created_by   TEXT NOT NULL,
  revoked_at   INTEGER
);

CREATE TABLE quarantine (
  stream     TEXT NOT NULL,
  stream_seq INTEGER NOT NULL,
  subject    TEXT NOT NULL,
  origin     TEXT NOT NULL,               -- as claimed by the subject
  reason     TEXT NOT NULL,
  payload    BLOB NOT NULL,
  PRIMARY KEY (stream, stream_seq)
);
