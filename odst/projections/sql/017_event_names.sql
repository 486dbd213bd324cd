-- The packages an event about several of them names (PackagesAvailable: a batch of small
-- packages pulled together). An event about one has its name in events.subject_name; these
-- are found the same way: what changed since a position (views.changed_keys), a package's
-- history (views.events by name).
CREATE TABLE event_names (
  event_id TEXT NOT NULL,  -- events.id
  name     TEXT NOT NULL,
  PRIMARY KEY (event_id, name)
) WITHOUT ROWID;
CREATE INDEX event_names_name ON event_names(name);
