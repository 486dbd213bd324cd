"""System tests: real nats-server, odst serve, slapd, chromium or HTTP servers, driven end to end."""
