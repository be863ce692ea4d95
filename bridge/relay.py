"""Where a validated delivery goes: the one place that decides what a 2xx promises."""

from __future__ import annotations

from bridge.events import Delivery, Outcome
from bridge.publisher import Publisher


class Relay:
    """Publishes each delivery and reports the outcome; a refusal propagates to the caller."""

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher

    async def deliver(self, delivery: Delivery) -> Outcome:
        await self._publisher.publish(delivery)
        return Outcome.PUBLISHED
