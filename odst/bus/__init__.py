"""The message bus: the embedded nats-server and connections to NATS."""

import contextlib
import secrets

from odst.bus.authorization import inbox_prefix, private_inbox
from odst.bus.identity import client_seed_path, read_seed
from odst.events.signing import SiteKey


def server_list(urls: str) -> list[str]:
    """--nats takes one URL or a comma-separated list (the nodes of a cluster)."""
    return [u.strip() for u in urls.split(",") if u.strip()]


async def connect(servers: str, *, seed: str | None = None, site: str = "", name: str = "odst", **kw):
    """Connect to NATS as one identity: ``seed`` is a NATS user seed ('SU…'), or None for a
    server without authentication (only a test's bare nats-server). A site's own processes
    pass ``site``: their replies then use its private inbox, which no peer is sent or may
    publish to; a request another site answers goes through ``peer_request``."""
    import nats

    opts = {"connect_timeout": 5, **kw}
    if seed:
        opts["nkeys_seed_str"] = seed
    if site:
        opts.setdefault("inbox_prefix", private_inbox(site))
    return await nats.connect(servers=server_list(servers), name=name, **opts)


async def peer_request(nc, site: str, subject: str, data: bytes = b"", *, timeout: float, headers=None):
    """A request another site answers, through the leaf tree: its reply subject is under
    ``_INBOX.<site>`` (peers may publish there, to answer) with a random 128-bit token, not
    nats-py's own (a NUID: the next is guessable from the last). Like ``nc.request``: the
    answer, or nats.errors.TimeoutError, or NoRespondersError when nobody listens."""
    import nats.errors

    reply = f"{inbox_prefix(site)}.{secrets.token_hex(16)}"
    sub = await nc.subscribe(reply, max_msgs=1)
    try:
        await nc.publish(subject, data, reply=reply, headers=headers)
        msg = await sub.next_msg(timeout=timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    if msg.headers and msg.headers.get("Status") == "503" and not msg.data:
        raise nats.errors.NoRespondersError
    return msg


async def connect_as_site(data, url: str | None = None, **kw):
    """Connect to a running site's broker as the site itself, with the client key in its
    data directory (every right: for the CLI's offline tools, scenarios and tests)."""
    import json
    from pathlib import Path

    data = Path(data)
    url = url or json.loads((data / "run" / "site.json").read_text())["nats"]
    path = client_seed_path(data)
    site = SiteKey.load_or_create(data / "site.key").site_id
    return await connect(url, seed=read_seed(path) if path.exists() else None, site=site, name="odst-tool", **kw)


NO_SUITABLE_PEERS = 10005  # a cluster still forming: not enough JetStream servers yet


async def until_ready(step, timeout: float):
    """Run ``step()``, retrying while JetStream is not ready (a cluster electing its
    leader, a node catching up): timeouts, 503s and 'no suitable peers'."""
    import asyncio

    import nats.errors
    import nats.js.errors
    import structlog

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await step()
        except (nats.js.errors.APIError, nats.errors.TimeoutError) as exc:
            transient = (not isinstance(exc, nats.js.errors.APIError)
                         or isinstance(exc, (nats.js.errors.ServiceUnavailableError, nats.js.errors.ServerError))
                         or exc.err_code == NO_SUITABLE_PEERS)
            if not transient or asyncio.get_running_loop().time() > deadline:
                raise
            structlog.get_logger("odst.bus").info("JetStream not ready yet; retrying",
                                                  error=type(exc).__name__)
            await asyncio.sleep(0.5)
