-- Contents a site found damaged in its own store (PackageDamaged), until that site's next
-- PackageAvailable of the same content: out of service there (downloads answer 503).
CREATE TABLE damaged (
  name     TEXT NOT NULL,
  blake3   TEXT NOT NULL,
  site     TEXT NOT NULL,
  reason   TEXT NOT NULL,
  found_by TEXT NOT NULL DEFAULT '',
  clock    TEXT NOT NULL,
  PRIMARY KEY (name, blake3, site)
);
