-- The read model. Everything here is a function of the event log: no wall-clock
-- values, and every fold commutes across origins (sets, min/max by clock), so a
-- rebuild from sequence 0 equals the live file whatever order streams interleave in.
-- A clock is 'TTTTTTTTTTTTTTT:<site>': the event's ms timestamp, zero-padded, then its
-- origin site; comparing clocks as text orders by time, then by site.

CREATE TABLE checkpoints (
  stream TEXT PRIMARY KEY,
  seq    INTEGER NOT NULL          -- last stream sequence folded
);

CREATE TABLE sites (               -- per-origin chain state
  site       TEXT PRIMARY KEY,
  public_key TEXT NOT NULL,
  name       TEXT NOT NULL DEFAULT '',
  last_seq   INTEGER NOT NULL DEFAULT 0,
  last_hash  TEXT NOT NULL DEFAULT '',
  last_ts    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE directory (           -- who vouches for which site's key (PeerRegistered)
  site       TEXT NOT NULL,
  vouched_by TEXT NOT NULL,
  public_key TEXT NOT NULL,
  name       TEXT NOT NULL DEFAULT '',
  http_url   TEXT NOT NULL DEFAULT '',
  clock      TEXT NOT NULL,
  PRIMARY KEY (site, vouched_by)
);

CREATE TABLE removals (            -- this site's own PeerRemoved decisions
  site     TEXT PRIMARY KEY,
  upto_seq INTEGER NOT NULL,
  clock    TEXT NOT NULL
);

CREATE TABLE invites (
  invite_id     TEXT PRIMARY KEY,
  secret_sha256 TEXT NOT NULL,
  expires_ts    INTEGER NOT NULL,
  used_by       TEXT NOT NULL DEFAULT ''
);

CREATE TABLE events (
  position   INTEGER PRIMARY KEY AUTOINCREMENT,  -- local cursor; not compared by audit
  id         TEXT NOT NULL UNIQUE,
  stream     TEXT NOT NULL,
  stream_seq INTEGER NOT NULL,
  subject    TEXT NOT NULL,
  origin     TEXT NOT NULL,
  seq        INTEGER NOT NULL,
  type       TEXT NOT NULL,
  ts         INTEGER NOT NULL,
  actor      TEXT NOT NULL,
  subject_name TEXT NOT NULL DEFAULT '',
  payload    BLOB NOT NULL
);
CREATE INDEX events_origin ON events(origin, seq);
CREATE INDEX events_name ON events(subject_name);

CREATE TABLE contents (            -- every (name, content) ever uploaded
  name        TEXT NOT NULL,
  blake3      TEXT NOT NULL,
  size        INTEGER NOT NULL,
  sha1        TEXT NOT NULL,
  sha512      TEXT NOT NULL,
  chunk_size  INTEGER NOT NULL,
  chunks      TEXT NOT NULL,       -- JSON list of chunk SHA1s
  origin      TEXT NOT NULL,       -- the site of the first upload
  uploaded_at INTEGER NOT NULL,
  uploaded_by TEXT NOT NULL,
  first_clock TEXT NOT NULL,       -- the earliest upload of this content under this name
  first_key   TEXT NOT NULL,       -- first_clock|rank|stage: the sighting whose metadata is kept
  last_clock  TEXT NOT NULL,       -- the latest (re-)upload
  last_key    TEXT NOT NULL,       -- last_clock|rank|stage: the sighting whose stage is current
  last_stage  TEXT NOT NULL,
  PRIMARY KEY (name, blake3)
);

CREATE TABLE tombstones (
  name       TEXT NOT NULL,
  blake3     TEXT NOT NULL,
  clock      TEXT NOT NULL,        -- the latest delete
  origin     TEXT NOT NULL,
  deleted_at INTEGER NOT NULL,
  deleted_by TEXT NOT NULL,
  PRIMARY KEY (name, blake3)
);

CREATE TABLE stage_changes (
  name  TEXT NOT NULL,
  clock TEXT NOT NULL,
  stage TEXT NOT NULL,
  PRIMARY KEY (name, clock)
);

CREATE TABLE availability (
  name   TEXT NOT NULL,
  blake3 TEXT NOT NULL,
  site   TEXT NOT NULL,
  status TEXT NOT NULL,            -- available | failed
  detail TEXT NOT NULL DEFAULT '',
  clock  TEXT NOT NULL,
  PRIMARY KEY (name, blake3, site)
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
  origin     TEXT NOT NULL,        -- as claimed by the subject
  kind       TEXT NOT NULL,        -- quarantined (failed a check) | ignored (removed peer)
  reason     TEXT NOT NULL,
  payload    BLOB NOT NULL,
  PRIMARY KEY (stream, stream_seq)
);

-- live: not deleted since its latest upload
CREATE VIEW live_contents AS
  SELECT c.* FROM contents c
  LEFT JOIN tombstones t ON t.name = c.name AND t.blake3 = c.blake3
  WHERE t.clock IS NULL OR t.clock < c.last_clock;

-- the package a name stands for: the earliest-uploaded live content (same everywhere)
CREATE VIEW packages AS
  SELECT lc.name, lc.size, lc.sha1, lc.sha512, lc.blake3, lc.chunk_size, lc.chunks,
         coalesce((SELECT s.stage FROM stage_changes s WHERE s.name = lc.name AND s.clock > lc.last_clock
                   ORDER BY s.clock DESC LIMIT 1), lc.last_stage) AS stage,
         lc.origin, lc.uploaded_at, lc.uploaded_by,
         max(CAST(substr(lc.last_clock, 1, 15) AS INTEGER),
             coalesce((SELECT CAST(substr(max(s.clock), 1, 15) AS INTEGER) FROM stage_changes s
                       WHERE s.name = lc.name AND s.clock > lc.last_clock), 0)) AS updated_at,
         lc.first_clock
  FROM live_contents lc
  WHERE lc.first_clock = (SELECT min(x.first_clock) FROM live_contents x WHERE x.name = lc.name);

-- live contents that lost a name to an earlier upload elsewhere
CREATE VIEW conflicts AS
  SELECT lc.name, lc.blake3, lc.origin, lc.first_clock, p.blake3 AS winner, p.origin AS winner_origin
  FROM live_contents lc JOIN packages p ON p.name = lc.name
  WHERE lc.blake3 <> p.blake3;
