"""The example consumer handles each event once, acks what it handled and retries what failed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bridge.samples import sample_event
from examples.consumer import Consumer, ConsumerConfig, Event, RecentKeys, declare, parse_args
from tests.support.harness import AMQP_URL
from tests.support.waiting import eventually


@pytest.fixture
async def config(channel: AbstractChannel, exchange_name: str) -> AsyncIterator[ConsumerConfig]:
    """A consumer of ``*.success`` on the test's exchange; its quorum queue is deleted after."""
    config = ConsumerConfig(
        amqp_url=AMQP_URL,
        exchange=exchange_name,
        queue=f"{exchange_name}.consumer",
        bindings=("*.success",),
        prefetch=4,
    )
    yield config
    await channel.queue_delete(config.queue)


async def publish(
    channel: AbstractChannel,
    exchange: str,
    event_type: str,
    message_id: str,
    body: bytes | None = None,
) -> bytes:
    """Publish an event (a fresh one unless ``body`` is given, as KonPro's retry repeats it)."""
    target = await channel.get_exchange(exchange)
    body = body or orjson.dumps(sample_event(event_type))
    await target.publish(aio_pika.Message(body, message_id=message_id), event_type)
    return body


async def prepare(channel: AbstractChannel, config: ConsumerConfig) -> None:
    """Declare the queue as the consumer will, so that events published first are kept."""
    await declare(channel, config)


async def queue_counts(channel: AbstractChannel, queue: str) -> tuple[int, int]:
    """The queue's ready messages and consumers, as the broker counts them now (a robust
    channel answers a passive declare of a queue it declared before from its own memory)."""
    underlay = await channel.get_underlay_channel()
    declared = await underlay.queue_declare(queue, passive=True)
    assert declared.message_count is not None
    assert declared.consumer_count is not None
    return declared.message_count, declared.consumer_count


async def ready_messages(channel: AbstractChannel, queue: str) -> int:
    return (await queue_counts(channel, queue))[0]


async def consumed(channel: AbstractChannel, queue: str) -> bool:
    return (await queue_counts(channel, queue))[1] > 0


async def test_each_event_is_handled_once_and_every_copy_is_acked(
    channel: AbstractChannel, config: ConsumerConfig
) -> None:
    await prepare(channel, config)
    sent: dict[str, bytes] = {}
    for event_type, message_id in [
        ("avatar_video.success", "a"),
        ("avatar_video.success", "a"),  # KonPro retried: same event id, same body
        ("avatar_video.fail", "ignored"),  # not bound: never reaches this queue
        ("video_translate.success", "b"),
        ("avatar_video.success", "a"),
        ("personalized_video.success", "c"),
    ]:
        body = sent.get(message_id)
        sent[message_id] = await publish(channel, config.exchange, event_type, message_id, body)
    handled: list[tuple[str | None, str]] = []

    async def record(event: Event, message: AbstractIncomingMessage) -> None:
        handled.append((message.message_id, event["event_type"]))

    stats = await asyncio.wait_for(
        Consumer(config, record).run(asyncio.Event(), max_messages=3), 15
    )

    assert sorted(handled) == [
        ("a", "avatar_video.success"),
        ("b", "video_translate.success"),
        ("c", "personalized_video.success"),
    ]
    assert stats.duplicates == 2
    assert await ready_messages(channel, config.queue) == 0


async def test_another_body_under_a_known_id_is_not_taken_for_a_repeat(
    channel: AbstractChannel, config: ConsumerConfig
) -> None:
    """KonPro's event id is not signed: a replayed capture may come under the id of an event
    not yet delivered. Taken for a repeat, that event would be dropped."""
    await prepare(channel, config)
    await publish(channel, config.exchange, "avatar_video.success", "evt-2")  # the replay
    genuine = await publish(channel, config.exchange, "avatar_video.success", "evt-2")
    handled: list[bytes] = []

    async def record(event: Event, message: AbstractIncomingMessage) -> None:
        handled.append(message.body)

    stats = await asyncio.wait_for(
        Consumer(config, record).run(asyncio.Event(), max_messages=2), 15
    )

    assert genuine in handled
    assert stats.duplicates == 0


async def test_a_failed_event_is_requeued_and_handled_on_redelivery(
    channel: AbstractChannel, config: ConsumerConfig
) -> None:
    await prepare(channel, config)
    await publish(channel, config.exchange, "avatar_video.success", "flaky")
    attempts: list[bool] = []

    async def fail_first(event: Event, message: AbstractIncomingMessage) -> None:
        attempts.append(message.redelivered or False)
        if len(attempts) == 1:
            raise RuntimeError("downstream unavailable")

    stats = await asyncio.wait_for(
        Consumer(config, fail_first).run(asyncio.Event(), max_messages=1), 15
    )

    assert attempts == [False, True]
    assert (stats.handled, stats.failed) == (1, 1)
    assert await ready_messages(channel, config.queue) == 0


async def test_setting_stop_ends_consumption_and_leaves_unhandled_events_queued(
    channel: AbstractChannel, config: ConsumerConfig
) -> None:
    await prepare(channel, config)
    stop = asyncio.Event()
    consumer = Consumer(config, _never_called)
    task = asyncio.create_task(consumer.run(stop))
    await eventually(lambda: consumed(channel, config.queue))  # nothing is published

    stop.set()
    stats = await asyncio.wait_for(task, 10)
    await publish(channel, config.exchange, "avatar_video.success", "later")

    assert stats.handled == 0
    assert await _eventually_ready(channel, config.queue) == 1


async def _never_called(event: Event, message: AbstractIncomingMessage) -> None:
    raise AssertionError("nothing was published while consuming")


async def _eventually_ready(channel: AbstractChannel, queue: str) -> int:
    for _ in range(50):
        if count := await ready_messages(channel, queue):
            return count
        await asyncio.sleep(0.05)
    return 0


def test_recent_ids_forget_the_oldest_first() -> None:
    seen = RecentKeys(size=2)
    for message_id in ("a", "b", "a", "c"):
        seen.add(message_id)

    assert "a" in seen
    assert "c" in seen
    assert "b" not in seen


def test_configuration_comes_from_arguments_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CONSUMER_BINDINGS", "avatar_video.*, *.fail")
    monkeypatch.setenv("CONSUMER_QUEUE", "from-env")

    from_env = parse_args([])
    from_args = parse_args(["--queue", "q", "--bind", "video_translate.#"])

    assert (from_env.queue, from_env.bindings) == ("from-env", ("avatar_video.*", "*.fail"))
    assert (from_args.queue, from_args.bindings) == ("q", ("video_translate.#",))


def test_the_duplicate_memory_and_the_delivery_limit_can_be_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """How far back KonPro's retries are caught is the consumer's main knob."""
    monkeypatch.setenv("CONSUMER_DELIVERY_LIMIT", "3")

    config = parse_args(["--dedup-size", "50000"])

    assert (config.dedup_size, config.delivery_limit) == (50_000, 3)
