-- Bandwidth (issue 14): every site's latest choices, keyed by the site that made them
-- (site = the event's origin). A site applies its own rows; the link '*' row with the
-- newest clock from any site is the network-wide default.

CREATE TABLE bandwidth_links (
  site        TEXT NOT NULL,  -- who decided
  link        TEXT NOT NULL,  -- peer site id, or '*' (the default)
  send_bps    INTEGER NOT NULL,
  receive_bps INTEGER NOT NULL,
  burst_bytes INTEGER NOT NULL,
  windows     TEXT NOT NULL,  -- JSON list of TimeWindow
  local       TEXT NOT NULL,  -- auto | yes | no
  cleared     INTEGER NOT NULL DEFAULT 0,
  clock       TEXT NOT NULL,
  updated_by  TEXT NOT NULL,
  PRIMARY KEY (site, link)
);

CREATE TABLE local_networks (
  site   TEXT PRIMARY KEY,
  exempt INTEGER NOT NULL,
  cidrs  TEXT NOT NULL,  -- JSON list
  clock  TEXT NOT NULL
);

CREATE TABLE download_caps (
  site           TEXT PRIMARY KEY,
  egress_bps     INTEGER NOT NULL,
  max_concurrent INTEGER NOT NULL,
  per_client     INTEGER NOT NULL,
  clock          TEXT NOT NULL
);

-- urgency is network-wide: the latest mark from any site wins
CREATE TABLE urgent_packages (
  name      TEXT PRIMARY KEY,
  urgent    INTEGER NOT NULL,
  reason    TEXT NOT NULL,
  marked_by TEXT NOT NULL,
  origin    TEXT NOT NULL,
  marked_at INTEGER NOT NULL,
  clock     TEXT NOT NULL
);
