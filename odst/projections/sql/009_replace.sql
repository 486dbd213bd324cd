-- Replacing a package under the same name (PackageReplaced, odst/events/uploads.py).
--
-- A replacement names the content it supersedes and its generation (one more than the
-- superseded one's, carried in the event so the fold needs no other event). The package a
-- name stands for is the live content of the highest generation, then the earliest upload:
-- concurrent replacements of the same content resolve as concurrent uploads do.
-- A superseded content is not live (as if deleted) unless uploaded again after the replacement,
-- but a site keeps serving it until it holds the new one: what each site serves is its latest
-- availability report under the name (the view 'serving'), not the catalogue's current content.

ALTER TABLE contents ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;

CREATE TABLE replacements (
  name        TEXT NOT NULL,
  old_blake3  TEXT NOT NULL,       -- the content superseded
  clock       TEXT NOT NULL,       -- the latest replacement of it
  new_blake3  TEXT NOT NULL,       -- what replaced it then
  origin      TEXT NOT NULL,
  replaced_at INTEGER NOT NULL,
  replaced_by TEXT NOT NULL,
  PRIMARY KEY (name, old_blake3)
);

DROP VIEW conflicts;
DROP VIEW packages;
DROP VIEW live_contents;

-- live: neither deleted nor replaced since its latest upload
CREATE VIEW live_contents AS
  SELECT c.* FROM contents c
  LEFT JOIN tombstones t ON t.name = c.name AND t.blake3 = c.blake3
  LEFT JOIN replacements r ON r.name = c.name AND r.old_blake3 = c.blake3
  WHERE (t.clock IS NULL OR t.clock < c.last_clock) AND (r.clock IS NULL OR r.clock < c.last_clock);

-- the package a name stands for: the live content of the highest generation, earliest uploaded
CREATE VIEW packages AS
  SELECT lc.name, lc.size, lc.sha1, lc.sha512, lc.blake3, lc.chunk_size, lc.chunks,
         coalesce((SELECT s.stage FROM stage_changes s WHERE s.name = lc.name AND s.clock > lc.last_clock
                   ORDER BY s.clock DESC LIMIT 1), lc.last_stage) AS stage,
         lc.origin, lc.uploaded_at, lc.uploaded_by,
         max(CAST(substr(lc.last_clock, 1, 15) AS INTEGER),
             coalesce((SELECT CAST(substr(max(s.clock), 1, 15) AS INTEGER) FROM stage_changes s
                       WHERE s.name = lc.name AND s.clock > lc.last_clock), 0)) AS updated_at,
         lc.first_clock, lc.generation
  FROM live_contents lc
  WHERE lc.blake3 = (SELECT x.blake3 FROM live_contents x WHERE x.name = lc.name
                     ORDER BY x.generation DESC, x.first_clock, x.blake3 LIMIT 1);

-- live contents that lost a name to an earlier upload (or replacement) elsewhere
CREATE VIEW conflicts AS
  SELECT lc.name, lc.blake3, lc.origin, lc.first_clock, p.blake3 AS winner, p.origin AS winner_origin
  FROM live_contents lc JOIN packages p ON p.name = lc.name
  WHERE lc.blake3 <> p.blake3;

-- what each site serves under each name: the content of its latest availability report
-- (a replicator swaps the file, then reports the new content), while the name has a package
-- and that content was not deleted
CREATE VIEW serving AS
  SELECT a.name, a.site, a.blake3, a.clock FROM availability a
  WHERE a.status = 'available'
    AND a.clock = (SELECT max(b.clock) FROM availability b WHERE b.name = a.name AND b.site = a.site
                   AND b.status = 'available')
    AND EXISTS (SELECT 1 FROM live_contents l WHERE l.name = a.name)
    AND NOT EXISTS (SELECT 1 FROM tombstones t JOIN contents c ON c.name = t.name AND c.blake3 = t.blake3
                    WHERE t.name = a.name AND t.blake3 = a.blake3 AND t.clock >= c.last_clock);

-- each site's latest report per name, found without scanning a name's other contents
CREATE INDEX availability_serving ON availability(name, site, status, clock);
