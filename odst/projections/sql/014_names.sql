-- Package names compare as a Mac compares them (odst/naming.py name_key: NFD + case fold).
-- A package is identified by the key of its name, not by its spelling: contents, tombstones,
-- stage changes and availability are keyed by it, and `name` keeps the spelling to show
-- (the spelling of the content's earliest sighting, as its origin and uploader are kept).
-- This is a projection rule: a rebuild applies it to any log, and this migration regroups an
-- existing read model the same way (name_key() is the Python function the migration runner
-- registers). Spellings that were two packages before and are one key now are not merged
-- silently: `spellings` records every spelling each content was published under, and
-- `name_collisions` reports every key that more than one live spelling stands for.
--
-- Numbered after 012_scrub so that it regroups what replace-in-place (009) and the scrub (012)
-- keyed by name too: `replacements` and `damaged` are keyed by the key, `generation` is kept
-- (the highest of a content's spellings), and the view `serving` and its index are made again
-- over `key`. `serving` also takes PackageWithdrawn into account: a site's latest report of
-- 'available' or 'withdrawn' per key says what its one file holds, so a withdrawal (demotion)
-- is never taken for the older content a replacement superseded there.

CREATE TABLE contents_keyed (
  key         TEXT NOT NULL,       -- name_key(name): what names are compared by
  name        TEXT NOT NULL,       -- the spelling shown: that of the earliest sighting
  blake3      TEXT NOT NULL,
  size        INTEGER NOT NULL,
  sha1        TEXT NOT NULL,
  sha512      TEXT NOT NULL,
  chunk_size  INTEGER NOT NULL,
  chunks      TEXT NOT NULL,
  origin      TEXT NOT NULL,
  uploaded_at INTEGER NOT NULL,
  uploaded_by TEXT NOT NULL,
  first_clock TEXT NOT NULL,
  first_key   TEXT NOT NULL,
  last_clock  TEXT NOT NULL,
  last_key    TEXT NOT NULL,
  last_stage  TEXT NOT NULL,
  generation  INTEGER NOT NULL DEFAULT 0,  -- 009_replace: the highest generation seen
  PRIMARY KEY (key, blake3)
);

CREATE TABLE spellings (           -- every spelling a content was published under
  key         TEXT NOT NULL,
  name        TEXT NOT NULL,
  blake3      TEXT NOT NULL,
  first_clock TEXT NOT NULL,       -- its earliest sighting under this spelling
  PRIMARY KEY (key, name, blake3)
);

INSERT INTO spellings(key, name, blake3, first_clock)
  SELECT name_key(name), name, blake3, first_clock FROM contents;

INSERT INTO contents_keyed
  SELECT k, f.name, f.blake3, f.size, f.sha1, f.sha512, f.chunk_size, f.chunks, f.origin, f.uploaded_at,
         f.uploaded_by, g.first_clock, g.first_key, g.last_clock, g.last_key,
         (SELECT l.last_stage FROM contents l WHERE name_key(l.name) = k AND l.blake3 = f.blake3
          ORDER BY l.last_key DESC LIMIT 1),
         g.generation
  FROM (SELECT name_key(name) AS k, blake3, min(first_clock) AS first_clock, min(first_key) AS first_key,
               max(last_clock) AS last_clock, max(last_key) AS last_key, max(generation) AS generation
        FROM contents GROUP BY name_key(name), blake3) g
  JOIN contents f ON name_key(f.name) = g.k AND f.blake3 = g.blake3
   AND f.rowid = (SELECT x.rowid FROM contents x WHERE name_key(x.name) = g.k AND x.blake3 = g.blake3
                  ORDER BY x.first_key, x.name LIMIT 1);

CREATE TABLE tombstones_keyed (
  key        TEXT NOT NULL,
  blake3     TEXT NOT NULL,
  clock      TEXT NOT NULL,
  origin     TEXT NOT NULL,
  deleted_at INTEGER NOT NULL,
  deleted_by TEXT NOT NULL,
  PRIMARY KEY (key, blake3)
);
INSERT INTO tombstones_keyed
  SELECT name_key(t.name), t.blake3, t.clock, t.origin, t.deleted_at, t.deleted_by FROM tombstones t
  WHERE t.rowid = (SELECT x.rowid FROM tombstones x WHERE name_key(x.name) = name_key(t.name)
                   AND x.blake3 = t.blake3 ORDER BY x.clock DESC LIMIT 1);

CREATE TABLE stage_changes_keyed (
  key   TEXT NOT NULL,
  clock TEXT NOT NULL,
  stage TEXT NOT NULL,
  PRIMARY KEY (key, clock)
);
INSERT OR IGNORE INTO stage_changes_keyed SELECT name_key(name), clock, stage FROM stage_changes
  ORDER BY clock, stage;

CREATE TABLE availability_keyed (
  key    TEXT NOT NULL,
  blake3 TEXT NOT NULL,
  site   TEXT NOT NULL,
  status TEXT NOT NULL,            -- available | failed | withdrawn
  detail TEXT NOT NULL DEFAULT '',
  clock  TEXT NOT NULL,
  PRIMARY KEY (key, blake3, site)
);
INSERT INTO availability_keyed
  SELECT name_key(a.name), a.blake3, a.site, a.status, a.detail, a.clock FROM availability a
  WHERE a.rowid = (SELECT x.rowid FROM availability x WHERE name_key(x.name) = name_key(a.name)
                   AND x.blake3 = a.blake3 AND x.site = a.site ORDER BY x.clock DESC LIMIT 1);

CREATE TABLE replacements_keyed (
  key         TEXT NOT NULL,
  old_blake3  TEXT NOT NULL,       -- the content superseded
  clock       TEXT NOT NULL,       -- the latest replacement of it
  new_blake3  TEXT NOT NULL,       -- what replaced it then
  origin      TEXT NOT NULL,
  replaced_at INTEGER NOT NULL,
  replaced_by TEXT NOT NULL,
  PRIMARY KEY (key, old_blake3)
);
INSERT INTO replacements_keyed
  SELECT name_key(r.name), r.old_blake3, r.clock, r.new_blake3, r.origin, r.replaced_at, r.replaced_by
  FROM replacements r
  WHERE r.rowid = (SELECT x.rowid FROM replacements x WHERE name_key(x.name) = name_key(r.name)
                   AND x.old_blake3 = r.old_blake3 ORDER BY x.clock DESC LIMIT 1);

CREATE TABLE damaged_keyed (       -- 012_scrub: out of service at `site` until its next PackageAvailable
  key      TEXT NOT NULL,
  blake3   TEXT NOT NULL,
  site     TEXT NOT NULL,
  reason   TEXT NOT NULL,
  found_by TEXT NOT NULL DEFAULT '',
  clock    TEXT NOT NULL,
  PRIMARY KEY (key, blake3, site)
);
INSERT INTO damaged_keyed
  SELECT name_key(d.name), d.blake3, d.site, d.reason, d.found_by, d.clock FROM damaged d
  WHERE d.rowid = (SELECT x.rowid FROM damaged x WHERE name_key(x.name) = name_key(d.name)
                   AND x.blake3 = d.blake3 AND x.site = d.site ORDER BY x.clock DESC LIMIT 1);

DROP VIEW serving;
DROP VIEW conflicts;
DROP VIEW packages;
DROP VIEW live_contents;
DROP TABLE contents;
DROP TABLE tombstones;
DROP TABLE stage_changes;
DROP TABLE availability;           -- and its index availability_serving
DROP TABLE replacements;
DROP TABLE damaged;
ALTER TABLE contents_keyed RENAME TO contents;
ALTER TABLE tombstones_keyed RENAME TO tombstones;
ALTER TABLE stage_changes_keyed RENAME TO stage_changes;
ALTER TABLE availability_keyed RENAME TO availability;
ALTER TABLE replacements_keyed RENAME TO replacements;
ALTER TABLE damaged_keyed RENAME TO damaged;

-- live: neither deleted nor replaced since its latest upload
CREATE VIEW live_contents AS
  SELECT c.* FROM contents c
  LEFT JOIN tombstones t ON t.key = c.key AND t.blake3 = c.blake3
  LEFT JOIN replacements r ON r.key = c.key AND r.old_blake3 = c.blake3
  WHERE (t.clock IS NULL OR t.clock < c.last_clock) AND (r.clock IS NULL OR r.clock < c.last_clock);

-- the package a name's key stands for: the live content of the highest generation, earliest
-- uploaded (same everywhere; exactly one per key: two first sightings at one clock break the
-- tie on the content hash)
CREATE VIEW packages AS
  SELECT lc.key, lc.name, lc.size, lc.sha1, lc.sha512, lc.blake3, lc.chunk_size, lc.chunks,
         coalesce((SELECT s.stage FROM stage_changes s WHERE s.key = lc.key AND s.clock > lc.last_clock
                   ORDER BY s.clock DESC LIMIT 1), lc.last_stage) AS stage,
         lc.origin, lc.uploaded_at, lc.uploaded_by,
         max(CAST(substr(lc.last_clock, 1, 15) AS INTEGER),
             coalesce((SELECT CAST(substr(max(s.clock), 1, 15) AS INTEGER) FROM stage_changes s
                       WHERE s.key = lc.key AND s.clock > lc.last_clock), 0)) AS updated_at,
         lc.first_clock, lc.generation
  FROM live_contents lc
  WHERE lc.blake3 = (SELECT x.blake3 FROM live_contents x WHERE x.key = lc.key
                     ORDER BY x.generation DESC, x.first_clock, x.blake3 LIMIT 1);

-- live contents that lost a name (any spelling of it) to an earlier upload (or replacement) elsewhere
CREATE VIEW conflicts AS
  SELECT lc.name, lc.blake3, lc.origin, lc.first_clock, p.blake3 AS winner, p.origin AS winner_origin,
         p.name AS winner_name
  FROM live_contents lc JOIN packages p ON p.key = lc.key
  WHERE lc.blake3 <> p.blake3;

-- every live spelling of a key that more than one live spelling stands for: packages that
-- were told apart by case or Unicode normalisation before names compared as on a Mac.
-- `kept` is the spelling (and kept_blake3 the content) the key stands for now.
CREATE VIEW name_collisions AS
  SELECT s.key, s.name, s.blake3, s.first_clock, p.name AS kept, p.blake3 AS kept_blake3
  FROM spellings s
  JOIN live_contents lc ON lc.key = s.key AND lc.blake3 = s.blake3
  JOIN packages p ON p.key = s.key
  WHERE s.key IN (SELECT s2.key FROM spellings s2
                  JOIN live_contents l2 ON l2.key = s2.key AND l2.blake3 = s2.blake3
                  GROUP BY s2.key HAVING count(DISTINCT s2.name) > 1);

-- what each site serves under each key: the content of its latest report of holding it
-- ('available') or of having removed it ('withdrawn', then nothing), while the key has a
-- package and that content was not deleted. A replicator swaps the key's one file, then
-- reports the new content; a failed pull or a damaged copy ('failed') says nothing of what
-- the file holds (a damaged copy is out of service by the table `damaged`).
CREATE VIEW serving AS
  SELECT a.key, a.site, a.blake3, a.clock FROM availability a
  WHERE a.status = 'available'
    AND a.clock = (SELECT max(b.clock) FROM availability b WHERE b.key = a.key AND b.site = a.site
                   AND b.status IN ('available', 'withdrawn'))
    AND EXISTS (SELECT 1 FROM live_contents l WHERE l.key = a.key)
    AND NOT EXISTS (SELECT 1 FROM tombstones t JOIN contents c ON c.key = t.key AND c.blake3 = t.blake3
                    WHERE t.key = a.key AND t.blake3 = a.blake3 AND t.clock >= c.last_clock);

-- each site's latest report per key, found without scanning a key's other contents
CREATE INDEX availability_serving ON availability(key, site, status, clock);
