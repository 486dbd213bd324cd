"""Projections: fold verified events into the SQLite read model, checkpoint in the same transaction."""
