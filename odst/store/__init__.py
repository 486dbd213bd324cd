"""The store: manifests (chunk hashes), streaming writes, and the public package directory."""
