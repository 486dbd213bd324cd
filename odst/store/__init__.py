"""The store: one hasher (manifests, chunk checks), streaming writes, and the public package directory."""
