"""The test suite: tests/unit (no process), tests/system (real processes); shared fixtures and helpers here."""
