"""The message bus: the embedded nats-server and connections to NATS."""


def server_list(urls: str) -> list[str]:
    """--nats takes one URL or a comma-separated list (the nodes of a cluster)."""
    return [u.strip() for u in urls.split(",") if u.strip()]
