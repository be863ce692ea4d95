"""A KonPro event consumer for the bus konpro-bridge publishes to: a model to copy.

- A durable **quorum** queue of its own, bound to the event types it wants, declared before it
  relies on it (events published before the binding exists go to ``<exchange>.unrouted``).
- Manual acks: a message is acked only after it was handled; a handler error returns it to the
  queue, and the quorum queue's delivery limit stops a poison message from looping for ever.
- De-duplication by ``message_id`` and body: KonPro retries deliveries, so the same event can
  arrive more than once, with the same id and body. The id (KonPro's event id) is not signed: a
  replayed capture given another event's id must not make that event look like a repeat, so the
  key is both. The last ``--dedup-size`` keys are remembered (an LRU; bounded memory).
- ``prefetch`` messages in flight; SIGTERM or SIGINT stops consuming, lets the messages being
  handled finish, and closes the connection (unacked prefetched messages go back to the queue).

Run: ``python examples/consumer.py --queue video-service.konpro --bind 'avatar_video.*'``
(or set ``AMQP_URL``, ``KONPRO_EXCHANGE``, ``CONSUMER_QUEUE``, ``CONSUMER_BINDINGS``,
``CONSUMER_PREFETCH``, ``CONSUMER_DEDUP_SIZE``, ``CONSUMER_DELIVERY_LIMIT``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

log = logging.getLogger("konpro.consumer")

Event = dict[str, Any]
Handler = Callable[[Event, AbstractIncomingMessage], Awaitable[None]]


@dataclass(frozen=True)
class ConsumerConfig:
    amqp_url: str = "amqp://guest:guest@localhost:5672/"
    exchange: str = "konpro.events"
    queue: str = "example.konpro"
    bindings: tuple[str, ...] = ("#",)
    prefetch: int = 32
    dedup_size: int = 10_000
    delivery_limit: int = 5


def repeat_key(message: AbstractIncomingMessage) -> str:
    """What a repeat of ``message`` shares with it: its id and its body."""
    return f"{message.message_id or ''}:{hashlib.sha256(message.body).hexdigest()}"


class RecentKeys:
    """The last ``size`` repeat keys seen, oldest forgotten first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)


@dataclass
class Stats:
    handled: int = 0
    duplicates: int = 0
    failed: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Consumer:
    """Consumes KonPro events from one queue and hands each new one to ``handler`` once."""

    def __init__(self, config: ConsumerConfig, handler: Handler) -> None:
        self.config = config
        self.stats = Stats()
        self._handler = handler
        self._seen = RecentKeys(config.dedup_size)
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()  # set while no message is being handled
        self._idle.set()
        self._max: int | None = None

    async def run(self, stop: asyncio.Event, max_messages: int | None = None) -> Stats:
        """Consume until ``stop`` is set (or ``max_messages`` new events were handled)."""
        self._max = max_messages
        connection = await aio_pika.connect_robust(self.config.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.config.prefetch)
            queue = await declare(channel, self.config)
            tag = await queue.consume(self._on_message)
            log.info("consuming", extra={"queue": self.config.queue})
            await _first_of(stop.wait(), self.stats.done.wait())
            await queue.cancel(tag)  # no new deliveries; those being handled finish first
            await self._idle.wait()
        return self.stats

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        key = repeat_key(message)
        if key in self._seen or key in self._in_flight:
            # A copy is done or under way; if that one fails, it is requeued, not lost.
            self.stats.duplicates += 1
            await message.ack()
            return
        self._in_flight.add(key)
        self._idle.clear()
        try:
            await self._handler(json.loads(message.body), message)
        except Exception:
            self.stats.failed += 1
            log.exception("handler failed; requeueing", extra={"message_id": message.message_id})
            await message.nack(requeue=True)
        else:
            await message.ack()
            self._seen.add(key)
            self._count_handled()
        finally:
            self._in_flight.discard(key)
            if not self._in_flight:
                self._idle.set()

    def _count_handled(self) -> None:
        self.stats.handled += 1
        if self._max is not None and self.stats.handled >= self._max:
            self.stats.done.set()


async def declare(channel: AbstractChannel, config: ConsumerConfig) -> AbstractQueue:
    """The exchange (as the bridge declares it), our quorum queue and its bindings."""
    exchange = await channel.declare_exchange(
        config.exchange,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": f"{config.exchange}.unrouted"},
    )
    queue = await channel.declare_queue(
        config.queue,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-delivery-limit": config.delivery_limit},
    )
    for pattern in config.bindings:
        await queue.bind(exchange, routing_key=pattern)
    return queue


async def print_event(event: Event, message: AbstractIncomingMessage) -> None:
    """The default handler: one line per event. Replace it with your service's logic."""
    print(message.message_id, event.get("event_type"), json.dumps(event.get("event_data")))


async def _first_of(*waits: Awaitable[Any]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def parse_args(argv: Sequence[str] | None = None) -> ConsumerConfig:
    env = os.environ.get
    parser = argparse.ArgumentParser(description="Consume KonPro events from RabbitMQ.")
    parser.add_argument("--amqp-url", default=env("AMQP_URL", ConsumerConfig.amqp_url))
    parser.add_argument("--exchange", default=env("KONPRO_EXCHANGE", ConsumerConfig.exchange))
    parser.add_argument("--queue", default=env("CONSUMER_QUEUE", ConsumerConfig.queue))
    parser.add_argument(
        "--bind",
        action="append",
        metavar="PATTERN",
        help="routing key pattern, e.g. 'avatar_video.*' (repeatable; default: $CONSUMER_BINDINGS"
        " as a comma-separated list, else '#')",
    )
    parser.add_argument("--prefetch", type=int, default=int(env("CONSUMER_PREFETCH", "32")))
    parser.add_argument(
        "--dedup-size",
        type=int,
        default=int(env("CONSUMER_DEDUP_SIZE", str(ConsumerConfig.dedup_size))),
        help="events remembered to drop repeats (default: $CONSUMER_DEDUP_SIZE, else "
        f"{ConsumerConfig.dedup_size})",
    )
    parser.add_argument(
        "--delivery-limit",
        type=int,
        default=int(env("CONSUMER_DELIVERY_LIMIT", str(ConsumerConfig.delivery_limit))),
        help="deliveries of one message before the quorum queue drops it (default: "
        f"$CONSUMER_DELIVERY_LIMIT, else {ConsumerConfig.delivery_limit})",
    )
    args = parser.parse_args(argv)
    bindings = args.bind or [p for p in env("CONSUMER_BINDINGS", "#").split(",") if p.strip()]
    return ConsumerConfig(
        amqp_url=args.amqp_url,
        exchange=args.exchange,
        queue=args.queue,
        bindings=tuple(p.strip() for p in bindings),
        prefetch=args.prefetch,
        dedup_size=args.dedup_size,
        delivery_limit=args.delivery_limit,
    )


async def _main(config: ConsumerConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    stats = await Consumer(config, print_event).run(stop)
    log.info("stopped: %s handled, %s duplicates dropped", stats.handled, stats.duplicates)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_main(parse_args()))
