"""The web UI: static pages served by the gateway over the Admin API."""

from __future__ import annotations


def ui_routes() -> list:
    """Route handlers serving the web UI (filled in by the UI work)."""
    return []
