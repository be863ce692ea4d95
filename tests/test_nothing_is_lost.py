"""A 2xx is a promise: whatever happens to the broker or the bridge, the event reaches the bus.

Faults are made with a TCP proxy in front of the shared broker (cut, hold, slow), by killing the
bridge process, and with a memory alarm on a private RabbitMQ node.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import signal
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
import orjson
import structlog

from bridge.app import Bridge
from tests.conftest import BridgeFactory, QueueFactory, drain, proxied_amqp_url
from tests.support.private_broker import PrivateBroker
from tests.support.process import BridgeProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually
from tests.test_metrics_describe_the_bridge import scrape, value

JSON = {"Content-Type": "application/json"}


def event(n: int) -> tuple[str, bytes]:
    event_id = f"evt-{n}-{uuid.uuid4().hex[:8]}"
    body = orjson.dumps(
        {"event_type": "avatar_video.success", "event_data": {"video_id": event_id}}
    )
    return event_id, body


async def post(http: aiohttp.ClientSession, url: str, n: int) -> tuple[str, int]:
    event_id, body = event(n)
    async with http.post(url, data=body, headers={**JSON, "KonPro-Event-Id": event_id}) as r:
        return event_id, r.status


async def spool_depth(bridge_url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(bridge_url + "/status") as response:
        depth: int = (await response.json())["spool"]["depth"]
        return depth


async def post_steadily(
    http: aiohttp.ClientSession, url: str, *, seconds: float, senders: int = 8
) -> list[tuple[str, int]]:
    """Distinct events from ``senders`` clients, each posting the next once answered."""
    counter = itertools.count()
    answers: list[tuple[str, int]] = []
    deadline = time.monotonic() + seconds

    async def sender() -> None:
        while time.monotonic() < deadline:
            answers.append(await post(http, url, next(counter)))

    await asyncio.gather(*(sender() for _ in range(senders)))
    return answers


async def message_ids(queue: aio_pika.abc.AbstractQueue, at_least: int) -> list[str]:
    received = await drain(queue, expect=at_least, within=30)
    return [str(m.message_id) for m in received]


async def test_a_link_cut_for_seconds_under_steady_load_loses_no_accepted_event(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_proxied_bridge(amqp={"publish_timeout": 1.0}) as bridge:
        load = asyncio.create_task(post_steadily(http, bridge.webhook_url, seconds=6.0))
        await asyncio.sleep(1.5)
        await broker_proxy.cut()
        await asyncio.sleep(3.0)
        await broker_proxy.restore()
        answers = await load
        await eventually(lambda: bridge.spool.depth == 0, within=30)

    statuses = collections.Counter(status for _, status in answers)
    accepted = {event_id for event_id, status in answers if status in {200, 202}}
    assert set(statuses) <= {200, 202}, statuses
    assert statuses[202] > 0, "the cut should have sent deliveries to the spool"
    received = await message_ids(queue, at_least=len(accepted))
    assert accepted <= set(received)
    duplicates = len(received) - len(set(received))
    print(
        f"accepted={len(accepted)} spooled={statuses[202]} received={len(received)} "
        f"duplicates={duplicates}"
    )


async def test_a_connection_the_broker_closes_under_load_is_reopened_and_loses_nothing(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    http: aiohttp.ClientSession,
) -> None:
    """A broker restart or an operator's ``rabbitmqctl close_connection``: the broker says
    goodbye (320 CONNECTION_FORCED) instead of the link just going quiet."""
    sections: dict[str, dict[str, object]] = {
        "amqp": {"url": private_broker.url, "exchange": exchange_name, "reconnect_interval": 0.2},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
        "log": {"format": "json"},
    }
    async with BridgeProcess(tmp_path, sections) as bridge:
        load = asyncio.create_task(post_steadily(http, bridge.webhook_url, seconds=4.0))
        await asyncio.sleep(1.0)
        closed = await asyncio.to_thread(
            private_broker.close_connections, "konpro-bridge", "closed by the test"
        )
        answers = await load
        await eventually(lambda: "amqp.reconnected" in bridge.log(), within=15)

        async def forwarded() -> bool:
            return await spool_depth(bridge.url) == 0

        await eventually(forwarded)  # all forwarded before the stop

    assert closed == 1
    statuses = collections.Counter(status for _, status in answers)
    assert set(statuses) <= {200, 202}, statuses
    accepted = {event_id for event_id, status in answers if status in {200, 202}}
    received = await message_ids(private_queue, at_least=len(accepted))
    assert accepted <= set(received)
    lines = [orjson.loads(line) for line in bridge.log().splitlines()]
    (lost,) = (line for line in lines if line["event"] == "amqp.connection_lost")
    assert "CONNECTION_FORCED - closed by the test" in lost["error"]
    assert "amqp.reconnected" in (line["event"] for line in lines)
    assert [line for line in lines if line["level"] == "error"] == []


async def test_events_in_the_spool_survive_sigkill_and_are_delivered_after_restart(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    sections: dict[str, dict[str, object]] = {
        "amqp": {"url": proxied_amqp_url(broker_proxy), "exchange": exchange_name},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
    }
    await broker_proxy.cut()
    first = BridgeProcess(tmp_path, sections)
    await first.start(wait_ready=False)
    url = first.webhook_url
    answers = await asyncio.gather(*(post(http, url, n) for n in range(25)))
    assert {status for _, status in answers} == {202}
    first.send(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL

    await broker_proxy.restore()
    second = BridgeProcess(tmp_path, sections)
    async with second:
        received = await message_ids(queue, at_least=len(answers))
    assert sorted(received) == sorted(event_id for event_id, _ in answers)


async def test_a_full_spool_answers_503_and_drops_nothing_it_accepted(
    start_bridge_cut_off: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_bridge_cut_off(spool={"max_events": 5}) as bridge:
        url = bridge.webhook_url
        answers = [await post(http, url, n) for n in range(8)]
        with structlog.testing.capture_logs() as logs:
            async with http.post(url, data=event(99)[1], headers=JSON) as refused:
                assert refused.status == 503
                assert int(refused.headers["Retry-After"]) > 0
                assert (await refused.json())["detail"] == "retry later"
        samples = await scrape(http, bridge.url + "/metrics")
        await broker_proxy.restore()
        await eventually(lambda: bridge.spool.depth == 0)

    assert [status for _, status in answers] == [202] * 5 + [503] * 3
    # What the README's alert on outcome="refused" watches for:
    received_total = "konpro_bridge_events_received_total"
    refusals = value(samples, received_total, event_type="avatar_video.success", outcome="refused")
    assert refusals == 4
    [refusal] = [entry for entry in logs if entry["log_level"] == "warning"]
    assert refusal["event"] == "webhook.refused"
    assert "spool full: it holds its limit of 5 events" in refusal["reason"]
    received = await message_ids(queue, at_least=5)
    assert sorted(received) == sorted(event_id for event_id, status in answers if status == 202)


async def test_a_slow_broker_link_delays_answers_but_every_accepted_event_is_stored(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_proxied_bridge(amqp={"publish_timeout": 3.0}) as bridge:
        url = bridge.webhook_url
        # Slow, but the confirms come within the publish timeout: 0.1 s per chunk each way,
        # and 20 publishes make at most 20 chunks.
        broker_proxy.delay = 0.1
        slow = await asyncio.gather(*(post(http, url, n) for n in range(20)))
        broker_proxy.delay = 3.5  # slower than the publish timeout: spooled, then forwarded
        slower = await asyncio.gather(*(post(http, url, n) for n in range(20, 25)))
        broker_proxy.delay = 0.0
        await eventually(lambda: bridge.spool.depth == 0, within=20)

    assert {status for _, status in slow} == {200}
    assert {status for _, status in slower} == {202}
    received = await message_ids(queue, at_least=25)  # a late confirm may add a duplicate
    assert set(received) == {event_id for event_id, _ in slow + slower}


async def test_an_event_the_broker_nacks_is_spooled_and_forwarded_once_there_is_room(
    start_bridge: BridgeFactory,
    channel: aio_pika.abc.AbstractChannel,
    exchange_name: str,
    http: aiohttp.ClientSession,
) -> None:
    # A consumer's queue that holds one message and refuses more: the broker nacks the publish.
    await channel.declare_exchange(
        exchange_name,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": f"{exchange_name}.unrouted"},
    )
    queue = await channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    await queue.bind(exchange_name, "#")
    async with start_bridge() as bridge:
        first = await post(http, bridge.webhook_url, 1)
        second = await post(http, bridge.webhook_url, 2)
        assert (first[1], second[1], bridge.spool.depth) == (200, 202, 1)
        received = await message_ids(queue, at_least=2)  # taking the first makes room
        await eventually(lambda: bridge.spool.depth == 0)

    assert received == [first[0], second[0]]


async def test_a_broker_that_blocks_publishers_gets_bounded_answers_and_loses_nothing(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    http: aiohttp.ClientSession,
) -> None:
    from tests.conftest import make_settings  # noqa: PLC0415

    settings = make_settings(
        tmp_path, exchange_name, amqp={"url": private_broker.url, "publish_timeout": 0.5}
    )
    async with Bridge(settings) as bridge:
        await asyncio.wait_for(bridge.publisher.wait_ready(), 10)
        url = bridge.webhook_url
        private_broker.raise_memory_alarm()
        try:
            async with asyncio.timeout(15):  # bounded: each answer within the publish timeout
                answers = await asyncio.gather(*(post(http, url, n) for n in range(10)))
        finally:
            private_broker.clear_memory_alarm()
        await eventually(lambda: bridge.spool.depth == 0, within=30)

    assert {status for _, status in answers} == {202}  # the alarm held every publish
    received = await message_ids(private_queue, at_least=len(answers))
    assert {event_id for event_id, _ in answers} <= set(received)
