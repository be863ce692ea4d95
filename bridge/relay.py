"""Where a validated delivery goes: the one place that decides what a 2xx promises.

A delivery is answered 2xx only once it is the broker's (confirmed) or the disk's (spooled and
fsynced); a forwarder later moves spooled events to the broker. While the broker is known to be
down, deliveries go to the spool at once instead of each waiting out the publish timeout.

A delivery is taken once, known by its body (what the signature covers): a copy that was taken
within the replay window, or is being taken right now, is a duplicate and is not published again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from bridge.events import Delivery, DeliveryRefused, Outcome, PublishFailed, body_digest
from bridge.publisher import Publisher
from bridge.signatures import ReplayGuard
from bridge.spool import Spool

log = structlog.get_logger(__name__)


class Relay:
    """Publishes each delivery, or spools it; refuses (``DeliveryRefused``) only when it can do
    neither, so that KonPro retries."""

    def __init__(
        self,
        publisher: Publisher,
        spool: Spool,
        on_spooled: Callable[[], None],
        replay_guard: ReplayGuard,
    ) -> None:
        self._publisher = publisher
        self._spool = spool
        self._on_spooled = on_spooled  # wakes the forwarder
        self._replay_guard = replay_guard
        # Digests of the bodies being taken right now, each with the copies waiting for its outcome.
        self._taking: dict[str, list[asyncio.Future[bool]]] = {}

    async def deliver(self, delivery: Delivery) -> Outcome:
        if not self._replay_guard.enabled:
            return await self._publish_or_spool(delivery)
        # By the body, which the signature covers: KonPro-Event-Id and KonPro-Timestamp are not
        # signed, so a replayed capture may carry fresh ones. KonPro's retries repeat the body.
        key = body_digest(delivery.body)
        if self._replay_guard.seen(key):
            return Outcome.DUPLICATE
        if (waiting := self._taking.get(key)) is not None:
            return await self._after_the_first_copy(waiting)
        return await self._take_first_copy(key, delivery)

    async def _take_first_copy(self, key: str, delivery: Delivery) -> Outcome:
        self._taking[key] = []
        taken = False
        try:
            outcome = await self._publish_or_spool(delivery)
            self._replay_guard.remember(key)
            taken = True
            return outcome
        finally:
            for waiter in self._taking.pop(key):
                if not waiter.done():
                    waiter.set_result(taken)

    @staticmethod
    async def _after_the_first_copy(waiting: list[asyncio.Future[bool]]) -> Outcome:
        """A copy that came while the first was being taken (a replay, or a retry of a slow
        answer) shares the first one's fate instead of being published a second time."""
        taken = asyncio.get_running_loop().create_future()
        waiting.append(taken)
        if await taken:
            return Outcome.DUPLICATE
        raise DeliveryRefused("the same event could not be taken just now")

    async def _publish_or_spool(self, delivery: Delivery) -> Outcome:
        try:
            await self._publisher.publish(delivery)
        except PublishFailed as failure:
            await self._spool.append(delivery)  # SpoolFull / SpoolError propagate: 503
            self._on_spooled()
            log.debug("webhook.spooled", message_id=delivery.message_id, reason=failure.reason)
            return Outcome.SPOOLED
        return Outcome.PUBLISHED
