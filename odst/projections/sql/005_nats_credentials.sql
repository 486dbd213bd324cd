-- NATS credentials of downstream services: this site's own NatsCredential* events.
-- Only the public user NKey is kept. At most one active credential per name (case-
-- insensitive: a name is also a JetStream consumer name, stored as a directory, and a
-- Mac's file system ignores case); a later duplicate in the log is not applied, so the
-- rule holds whatever wrote the log and a rebuild gives the same table.

CREATE TABLE nats_credentials (
  credential_id TEXT PRIMARY KEY,
  name          TEXT NOT NULL COLLATE NOCASE,
  role          TEXT NOT NULL,
  nkey          TEXT NOT NULL UNIQUE,
  created_at    INTEGER NOT NULL,
  created_by    TEXT NOT NULL,
  revoked_at    INTEGER,
  revoked_by    TEXT
);

CREATE UNIQUE INDEX nats_credentials_active_name ON nats_credentials(name) WHERE revoked_at IS NULL;
