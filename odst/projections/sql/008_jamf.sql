-- Jamf Pro records as the sync and the drift check last saw them (odst.jamf), from any
-- site's Jamf events: the package page of every site can show the state. The latest
-- clock wins, so any folding order gives the same rows.

CREATE TABLE jamf_packages (
  name            TEXT PRIMARY KEY,
  blake3          TEXT NOT NULL DEFAULT '',   -- the content the record's hash is of
  file_name       TEXT NOT NULL DEFAULT '',
  record_id       TEXT NOT NULL DEFAULT '',
  hash_type       TEXT NOT NULL DEFAULT '',
  hash_value      TEXT NOT NULL DEFAULT '',
  size            INTEGER NOT NULL DEFAULT 0,
  state           TEXT NOT NULL,              -- in_sync | missing | hash_differs | no_file | failed | deleted
  detail          TEXT NOT NULL DEFAULT '',
  created_by_odst INTEGER NOT NULL DEFAULT 0, -- the record was created by ODST (only those may be deleted)
  clock           TEXT NOT NULL,
  origin          TEXT NOT NULL
);

CREATE TABLE jamf_distribution_points (
  site          TEXT PRIMARY KEY,
  record_id     TEXT NOT NULL,
  dp_name       TEXT NOT NULL,
  url           TEXT NOT NULL,
  api           TEXT NOT NULL,
  failover_site TEXT NOT NULL DEFAULT '',
  clock         TEXT NOT NULL,
  origin        TEXT NOT NULL
);
