"""Replication: pulling verified chunks of packages from peer sites, and serving ours to them."""
