"""Unit tests: pure functions, parsing and property tests; none starts a process or a server."""
