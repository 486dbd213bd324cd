-- Notification subscriptions: this site's own WebhookSubscribed / EmailSubscribed events.
-- event_id names the subscribing event, so the dispatcher only notifies of events
-- folded after it. Delivery attempts are not here: they are not a function of the
-- log (see odst/notify/ledger.py).

CREATE TABLE webhooks (
  webhook_id  TEXT PRIMARY KEY,
  url         TEXT NOT NULL,
  event_types TEXT NOT NULL,       -- JSON list of event type names
  description TEXT NOT NULL DEFAULT '',
  event_id    TEXT NOT NULL,
  created_at  INTEGER NOT NULL,
  created_by  TEXT NOT NULL,
  removed_at  INTEGER
);

CREATE TABLE email_subscriptions (
  subscription_id TEXT PRIMARY KEY,
  recipient       TEXT NOT NULL,
  event_types     TEXT NOT NULL,   -- JSON list of event type names
  event_id        TEXT NOT NULL,
  created_at      INTEGER NOT NULL,
  created_by      TEXT NOT NULL,
  removed_at      INTEGER
);
