"""Starts the notification parts a site process runs, by role.

Fan-out and email digests run once per site (with the projector, the one
read-model writer); webhook delivery workers run with every replicator (they
share one durable consumer, so each delivery is done by one of them).
"""

from __future__ import annotations

from odst.notify.dispatcher import Dispatcher
from odst.notify.ledger import Ledger
from odst.notify.mailer import Mailer
from odst.notify.webhooks import WebhookSender


class Notifier:
    def __init__(self, site):
        self.site = site
        self.ledger = Ledger(site.data)
        self.parts: list = []

    async def start(self) -> "Notifier":
        if "projector" in self.site.roles:
            self.parts += [Dispatcher(self.site, self.ledger), Mailer(self.site, self.ledger)]
        if "replicator" in self.site.roles:
            self.parts.append(WebhookSender(self.site, self.ledger))
        for part in self.parts:
            await part.start()
        return self

    async def stop(self) -> None:
        for part in reversed(self.parts):
            await part.stop()
        self.ledger.close()
