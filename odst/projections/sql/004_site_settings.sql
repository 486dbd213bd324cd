-- Settings this site chose through its own events (StagesAccepted), overriding odst.toml.
-- value is JSON.

CREATE TABLE site_settings (
  key        TEXT PRIMARY KEY,
  value      TEXT NOT NULL,
  updated_at INTEGER NOT NULL,
  updated_by TEXT NOT NULL
);
