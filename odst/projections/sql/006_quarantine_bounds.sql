-- Quarantine is bounded, per stream, so that whoever can publish into a stream cannot grow the
-- read model without limit (odst/projections/apply.py: QUARANTINE_*): a message's payload is
-- kept up to a prefix, and past a count or byte total the oldest rows that are not violations
-- go first, counted in quarantine_dropped. Per stream, because each stream is folded in order:
-- what is dropped is the same live and in a rebuild.
--
-- violation: 1 = a message signed with its origin's key that breaks the chain (gap, fork,
-- malformed): only the key's holder could write it, so it counts against the audit; 0 = junk
-- anyone could have published (unsigned, forged, replayed, oversized, unknown site) or a
-- removed peer's event: reported, never a violation, and dropped first.

ALTER TABLE quarantine ADD COLUMN violation INTEGER NOT NULL DEFAULT 1;
ALTER TABLE quarantine ADD COLUMN size INTEGER NOT NULL DEFAULT 0;  -- the message's bytes in the stream
UPDATE quarantine SET size = length(payload);
UPDATE quarantine SET violation = 0
  WHERE kind = 'ignored' OR reason LIKE 'subject %' OR reason LIKE 'unknown site %'
     OR reason LIKE 'signature does not verify%' OR reason LIKE 'replayed event%';

CREATE TABLE quarantine_dropped (
  stream   TEXT PRIMARY KEY,
  messages INTEGER NOT NULL,
  bytes    INTEGER NOT NULL        -- their sizes in the stream
);
