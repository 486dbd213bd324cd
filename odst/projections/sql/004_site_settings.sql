-- Settings this site chose through its own events (StagesAccepted), overriding odst.toml.
-- value is JSON.

CREATE TABLE site_settings (
  key        TEXT PRIMARY KEY,
  value      TEXT NOT NULL,
  updated_at INTEGER NOT NULL,
  updated_by TEXT NOT NULL
);

-- Every site's latest StagesAccepted (its own and its peers'), so the UI can tell "not
-- replicated there by choice" from "missing". A site that never chose is absent: it takes
-- the stages its accept_stages setting names, which only it knows.
CREATE TABLE stage_policies (
  site   TEXT PRIMARY KEY,
  stages TEXT NOT NULL,  -- JSON list
  clock  TEXT NOT NULL
);
