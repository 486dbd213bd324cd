"""The gateway: Admin API, event feed and distribution-point downloads over HTTP (Litestar)."""
