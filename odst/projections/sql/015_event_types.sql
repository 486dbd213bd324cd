-- Events looked up by type (views.site_names: every SiteRenamed, asked for each peer listing,
-- which the replicator and the peer linker make on every change; peer_log_alarms) were found
-- by scanning the whole events table: a cost that grew with the catalogue on every fold.
CREATE INDEX events_type ON events(type, origin, seq);
