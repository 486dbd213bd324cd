-- Why folding a stream last failed, one row per failing stream, written by the projector
-- process (odst/projections/projector.py) so that a gateway- or replicator-only process of the
-- site reports it too (ReadModelWatcher.error, /healthz). A row goes when that stream next
-- folds a message, or when the projector starts again. Local state, not folded from any log:
-- a rebuild's comparison leaves it out (apply.LOCAL_TABLES).

CREATE TABLE projection_errors (
  stream TEXT PRIMARY KEY,
  error  TEXT NOT NULL
);
