"""The replicator: pulls verified chunks of packages from peer sites."""
