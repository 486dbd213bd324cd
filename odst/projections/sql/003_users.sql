-- Local users: this site's own User* events. The password column holds the sealed
-- argon2id hash exactly as the event carried it (odst/accounts/passwords.py opens it).
-- User names compare case-insensitively, as sign-in does.

CREATE TABLE users (
  username            TEXT PRIMARY KEY COLLATE NOCASE,
  display_name        TEXT NOT NULL DEFAULT '',
  role                TEXT NOT NULL,
  password_sealed     TEXT NOT NULL,
  created_at          INTEGER NOT NULL,
  created_by          TEXT NOT NULL,
  updated_at          INTEGER NOT NULL,
  updated_by          TEXT NOT NULL,
  password_changed_at INTEGER,
  removed_at          INTEGER
);
