"""Where a validated delivery goes: the one place that decides what a 2xx promises.

A delivery is answered 2xx only once it is the broker's (confirmed) or the disk's (spooled and
fsynced); a forwarder later moves spooled events to the broker. While the broker is known to be
down, deliveries go to the spool at once instead of each waiting out the publish timeout.
"""

from __future__ import annotations

import structlog

from bridge.events import Delivery, Outcome
from bridge.publisher import Publisher, PublishFailed
from bridge.signatures import ReplayGuard
from bridge.spool import Forwarder, Spool

log = structlog.get_logger(__name__)


class Relay:
    """Publishes each delivery, or spools it; refuses (``DeliveryRefused``) only when it can do
    neither, so that KonPro retries."""

    def __init__(
        self,
        publisher: Publisher,
        spool: Spool,
        forwarder: Forwarder,
        replays: ReplayGuard,
    ) -> None:
        self._publisher = publisher
        self._spool = spool
        self._forwarder = forwarder
        self._replays = replays

    async def deliver(self, delivery: Delivery) -> Outcome:
        event_id = delivery.event_id
        if event_id is not None and self._replays.seen(event_id):
            return Outcome.DUPLICATE
        outcome = await self._publish_or_spool(delivery)
        if event_id is not None:
            self._replays.remember(event_id)
        return outcome

    async def _publish_or_spool(self, delivery: Delivery) -> Outcome:
        try:
            await self._publisher.publish(delivery)
        except PublishFailed as failure:
            await self._spool.append(delivery)  # SpoolFull / SpoolError propagate: 503
            self._forwarder.notify()
            log.debug("webhook.spooled", message_id=delivery.message_id, reason=failure.reason)
            return Outcome.SPOOLED
        return Outcome.PUBLISHED
