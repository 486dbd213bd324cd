"""The event log: the catalogue of events, their signed envelope, and appending to JetStream."""
