"""A 2xx is a promise: whatever happens to the broker or the bridge, the event reaches the bus.

Faults are made with a TCP proxy in front of the shared broker (cut, hold, slow), by killing the
bridge process, and with a memory alarm on a private RabbitMQ node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import signal
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp
import orjson
import structlog
from aio_pika.abc import AbstractChannel

from bridge.app import Bridge
from bridge.config import SpoolSettings
from bridge.events import Delivery, Outcome, PublishFailed
from bridge.forwarder import Forwarder
from bridge.publisher import Publisher
from bridge.relay import Relay
from bridge.signatures import ReplayGuard
from bridge.spool import Spool
from tests.support.harness import (
    FULL_AT_ONE,
    BridgeFactory,
    QueueFactory,
    drain,
    make_settings,
    process_sections,
    proxied_amqp_url,
)
from tests.support.observing import scrape, seen, value
from tests.support.private_broker import PrivateBroker
from tests.support.process import BridgeProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

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
    sections = process_sections(
        tmp_path, exchange_name, amqp_url=private_broker.url, amqp={"reconnect_interval": 0.2}
    )
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


def proxied_process_sections(
    tmp_path: Path, exchange_name: str, proxy: TcpProxy
) -> dict[str, dict[str, object]]:
    """A bridge process's settings, its broker reached through ``proxy``."""
    return {
        "amqp": {"url": proxied_amqp_url(proxy), "exchange": exchange_name},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
    }


async def test_events_in_the_spool_survive_sigkill_and_are_delivered_after_restart(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    sections = proxied_process_sections(tmp_path, exchange_name, broker_proxy)
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


async def test_over_a_slow_broker_link_every_accepted_event_is_stored_confirmed_or_spooled(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Confirms that come slowly, but within ``amqp.publish_timeout``, are waited for (200);
    those that do not come in time have their deliveries spooled (202) and forwarded later.
    Either way KonPro gets no 5xx for a slow broker, and every event answered 2xx reaches it."""
    queue = await bind_queue("#")
    async with start_proxied_bridge(amqp={"publish_timeout": 10.0}) as bridge:
        url = bridge.webhook_url
        # Slow, but the confirms come well within the publish timeout: 0.1 s per chunk each
        # way, and 20 publishes make at most 20 chunks.
        broker_proxy.delay = 0.1
        slow = await asyncio.gather(*(post(http, url, n) for n in range(20)))
        broker_proxy.delay = 0.0
        broker_proxy.mute()  # no confirm comes within the publish timeout: spooled, forwarded
        slower = await asyncio.gather(*(post(http, url, n) for n in range(20, 25)))
        broker_proxy.release()
        await eventually(lambda: bridge.spool.depth == 0, within=20)

    assert {status for _, status in slow} == {200}
    assert {status for _, status in slower} == {202}
    received = await message_ids(queue, at_least=25)  # a late confirm may add a duplicate
    assert set(received) == {event_id for event_id, _ in slow + slower}


async def test_an_event_the_broker_nacks_is_spooled_and_forwarded_once_there_is_room(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    exchange_name: str,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#", arguments=FULL_AT_ONE)  # the broker nacks what it refuses
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
    from tests.support.harness import make_settings  # noqa: PLC0415

    settings = make_settings(
        tmp_path, exchange_name, amqp={"url": private_broker.url, "publish_timeout": 0.5}
    )
    async with Bridge(settings) as bridge:
        await asyncio.wait_for(bridge.publisher.until_ready(), 10)
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


def envelope(event_type: str, video_id: str) -> bytes:
    return orjson.dumps({"event_type": event_type, "event_data": {"video_id": video_id}})


async def post_body(
    http: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, str | None]:
    async with http.post(url, data=data, headers={**JSON, **(headers or {})}) as response:
        answer = await response.json() if response.content_type == "application/json" else {}
        return response.status, answer.get("outcome")


async def test_a_returned_message_is_not_taken_for_confirmed_when_its_message_id_is_in_flight_twice(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    channel: AbstractChannel,
    exchange_name: str,
) -> None:
    """aiormq tells a returned message's publish by its message id (the latest publish with it),
    and two deliveries may share a KonPro event id. Publishes with one message id go one at a
    time: before, when the first of two in flight was returned (its ``.unrouted`` queue deleted),
    the return failed the second, the first's ack counted as its confirm, and it was answered
    200 ``published`` and dropped."""
    success_queue = await bind_queue("avatar_video.success")
    async with start_proxied_bridge() as bridge, aiohttp.ClientSession() as http:
        await channel.queue_delete(f"{exchange_name}.unrouted")
        # Slow confirms and returns: both publishes are in flight before the first return.
        broker_proxy.delay = 0.3
        shared_id = {"KonPro-Event-Id": f"evt-{uuid.uuid4().hex[:8]}"}
        unroutable = envelope("avatar_video.fail", "v-fail")
        routable = envelope("avatar_video.success", "v-ok")
        before = broker_proxy.sent_upstream
        first = asyncio.create_task(post_body(http, bridge.webhook_url, unroutable, shared_id))
        # Published first (on its way to the broker): its return arrives first.
        await eventually(lambda: broker_proxy.sent_upstream - before >= len(unroutable))
        second = asyncio.create_task(post_body(http, bridge.webhook_url, routable, shared_id))
        answers = await asyncio.gather(first, second)
        broker_proxy.delay = 0.0
        assert all(status in (200, 202) for status, _ in answers), answers
        await eventually(lambda: bridge.spool.depth == 0, within=20)
        unrouted = await channel.get_queue(f"{exchange_name}.unrouted")
        kept = [m.body for m in await drain(unrouted, expect=1, within=10)]
        assert unroutable in kept, (
            f"the returned event was answered {answers[0]} and dropped: unrouted queue holds {kept}"
        )
        assert routable in [m.body for m in await drain(success_queue, expect=1)]
        assert answers[0][1] != "published", "a returned message was answered 'published'"


async def test_a_left_behind_spool_still_locked_at_start_is_forwarded_once_it_is_released(
    tmp_path: Path, exchange_name: str, bind_queue: QueueFactory, start_bridge: BridgeFactory
) -> None:
    """A worker's spool after ``server.workers`` was lowered may still be locked at start: its
    old worker still stopping (a rolling update), or a ``spool drain``. It is tried again until
    it is free; before, it was skipped once and its events waited for another restart."""
    queue = await bind_queue("#")
    left_behind = make_settings(tmp_path, exchange_name).spool.at(tmp_path / "spool" / "worker-1")
    old_worker = await Spool.open(left_behind)  # the old worker 1, still stopping
    try:
        await old_worker.append(
            Delivery("avatar_video.success", envelope("avatar_video.success", "stranded"), "evt-s")
        )
        with structlog.testing.capture_logs() as logs:
            async with start_bridge():
                # The bridge has started, and found worker-1's spool locked.
                await eventually(lambda: bool(seen(logs, "spool.left_behind_locked")))
                await old_worker.close()  # the old worker is gone now
                received = await drain(queue, expect=1, within=15)
    finally:
        await old_worker.close()
    assert [m.message_id for m in received] == ["evt-s"], "the left-behind event was stranded"


async def test_a_bridge_killed_while_its_spool_drains_publishes_again_only_what_was_in_flight(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
) -> None:
    """Each forwarded event is removed as soon as it is confirmed (without an fsync of its own:
    a removal lost with the machine costs a duplicate). Before, removals came once per batch of
    100, and a ``kill -9`` part-way published again the whole batch: 20 duplicates here."""
    queue = await bind_queue("#")
    sections = proxied_process_sections(tmp_path, exchange_name, broker_proxy)
    await broker_proxy.cut()
    first = BridgeProcess(tmp_path, sections)
    await first.start(wait_ready=False)
    bodies = [envelope("avatar_video.success", f"drain-{n}") for n in range(60)]
    async with aiohttp.ClientSession() as http:
        answers = [await post_body(http, first.webhook_url, data) for data in bodies]
    assert {status for status, _ in answers} == {202}
    broker_proxy.delay = 0.03  # the drain takes seconds: one event at a time, each confirmed
    await broker_proxy.restore()
    received: list[str | None] = []

    async def some_forwarded() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            received.append(message.message_id)
        return len(received) >= 20

    await eventually(some_forwarded, within=30)
    first.send(signal.SIGKILL)
    assert await first.wait() == -signal.SIGKILL
    broker_proxy.delay = 0.0

    ids = [hashlib.sha256(data).hexdigest() for data in bodies]
    async with BridgeProcess(tmp_path, sections) as second:

        async def all_forwarded() -> bool:  # and confirmed: then they are all on the queue
            await some_forwarded()
            return set(received) >= set(ids) and await spool_depth(second.url) == 0

        await eventually(all_forwarded, within=30)
        await some_forwarded()
    assert set(received) == set(ids)  # nothing lost
    again = len(received) - len(set(received))
    assert again <= 3, f"{again} events confirmed before the kill were published again"


async def test_a_spool_drains_once_the_broker_confirms_even_if_slower_than_the_publish_timeout(
    start_bridge_cut_off: BridgeFactory, broker_proxy: TcpProxy, bind_queue: QueueFactory
) -> None:
    """A forward waits longer for its confirm (``FORWARD_WITHIN``) than a live delivery, whose
    answer KonPro awaits. Before, with confirms slower than ``amqp.publish_timeout`` every
    forward timed out: the spool never drained, and the event at its head, stored each time,
    reached the bus once a retry."""
    queue = await bind_queue("#")
    async with start_bridge_cut_off(amqp={"publish_timeout": 0.5}) as bridge:
        async with aiohttp.ClientSession() as http:
            for n in range(3):
                data = envelope("avatar_video.success", f"slow-{n}")
                assert await post_body(http, bridge.webhook_url, data) == (202, "spooled")
        broker_proxy.delay = 0.3  # each confirm comes 0.6 s after its publish: the broker is up
        await broker_proxy.restore()
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: bridge.spool.depth == 0, within=15)
        depth = bridge.spool.depth
        broker_proxy.delay = 0.0
        received = [m.message_id for m in await drain(queue, expect=3, within=3)]
    copies = max(collections.Counter(received).values())
    assert (depth, copies <= 2) == (0, True), (
        f"{depth} events still spooled after 15 s; one event reached the bus {copies} times"
    )


async def test_a_spooled_event_the_broker_returns_is_not_removed_from_the_spool_as_forwarded(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    channel: AbstractChannel,
) -> None:
    """The forwarder's side of the message id shared by two publishes in flight: the spooled
    event, returned, stays in the spool (and reaches ``.unrouted`` once the bridge has declared
    it again); before, the live publish's return was taken for it, and the spooled event's ack
    for its confirm, so it was removed: on no queue, after a 202."""
    await bind_queue("avatar_video.success")
    settings = make_settings(tmp_path, exchange_name, amqp={"url": proxied_amqp_url(broker_proxy)})
    spooled = Delivery("avatar_video.fail", envelope("avatar_video.fail", "spooled"), "evt-shared")
    live = Delivery("avatar_video.success", envelope("avatar_video.success", "live"), "evt-shared")
    publisher = Publisher(settings.amqp)
    async with await Spool.open(settings.spool) as spool:
        await spool.append(spooled)  # answered 202 when it was spooled
        forwarder = Forwarder(spool, publisher.publish, is_connected=lambda: publisher.is_ready)
        await publisher.start()
        await publisher.until_ready()
        await channel.queue_delete(f"{exchange_name}.unrouted")
        broker_proxy.delay = 0.3  # slow confirms and returns: both publishes are in flight
        try:
            before = broker_proxy.sent_upstream
            forwarder.start()  # publishes the spooled event at once
            await eventually(lambda: broker_proxy.sent_upstream - before >= len(spooled.body))
            with contextlib.suppress(PublishFailed):  # the relay would spool it: not at issue
                await publisher.publish(live)
            broker_proxy.delay = 0.0
            await asyncio.sleep(2.0)  # the forwarder's verdict on the spooled event
            depth = spool.depth
            await eventually(lambda: spool.depth == 0, within=20)
            unrouted = await channel.get_queue(f"{exchange_name}.unrouted")
            kept = [m.message_id for m in await drain(unrouted, expect=1, within=10)]
        finally:
            await forwarder.stop()
            await publisher.close()
    assert kept == ["evt-shared"], (
        f"the spooled event was removed from the spool (depth {depth} after its forward) "
        "although the broker returned it: it is on no queue"
    )


class Unconfirming:
    """A stand-in for the publisher: fails (as an unconfirmed publish does) the message ids
    it is told to, takes the rest."""

    def __init__(self, *failing: str) -> None:
        self.failing = set(failing)
        self.published: list[str] = []

    async def publish(self, delivery: Delivery) -> None:
        if delivery.message_id in self.failing:
            raise PublishFailed("broker did not confirm in time")
        self.published.append(delivery.message_id)


async def test_a_delivery_spooled_by_the_relay_wakes_the_forwarder_and_a_published_one_not(
    tmp_path: Path,
) -> None:
    """The relay tells the forwarder at once when it spools: otherwise a spooled event waits
    for the forwarder's safety-net look, 30 s, or for the next publish that happens to wake it
    (on a quiet night, the next delivery)."""
    woken: list[None] = []
    publisher = Unconfirming("evt_unconfirmed")
    async with await Spool.open(SpoolSettings(path=tmp_path / "spool")) as spool:
        relay = Relay(
            publisher,  # type: ignore[arg-type]
            spool,
            lambda: woken.append(None),
            ReplayGuard(window=600, max_entries=100),
        )
        published = await relay.deliver(Delivery("a.b", b'{"n": 1}', "evt_confirmed"))
        assert (published, woken) == (Outcome.PUBLISHED, [])
        spooled = await relay.deliver(Delivery("a.b", b'{"n": 2}', "evt_unconfirmed"))
        assert (spooled, len(woken), spool.depth) == (Outcome.SPOOLED, 1, 1)
