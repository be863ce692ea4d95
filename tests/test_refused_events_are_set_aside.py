"""An event the broker refuses for good is set aside (parked) in the spool, not lost, and does not
hold up the events behind it; once the broker takes it again, it goes through.

RabbitMQ refuses a message over its ``max_message_size`` by closing the channel with
PRECONDITION_FAILED. The end-to-end tests lower that limit on the private node; the others give
the forwarder a stand-in for the publisher.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import math
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aio_pika
import aiohttp
import orjson
import pytest
import structlog

from bridge import forwarder
from bridge.config import SpoolSettings
from bridge.events import Delivery, MessageRefused, PublishFailed
from bridge.forwarder import Forwarder, drain_for_good, drain_parked
from bridge.publisher import Publisher
from bridge.spool import (
    FILE_NAME,
    PARK_AFTER,
    Spool,
    SpooledEvent,
    _Database,
)
from tests.support.deliveries import delivery
from tests.support.harness import (
    AMQP_URL,
    BridgeFactory,
    QueueFactory,
    drain,
    make_settings,
    proxied_amqp_url,
)
from tests.support.observing import scrape, seen, value
from tests.support.private_broker import PrivateBroker
from tests.support.process import run_command, write_toml
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

JSON = {"Content-Type": "application/json"}
BROKER_LIMIT = 4096
TOO_LARGE = 8000
REFUSAL = "broker refused the message: PRECONDITION_FAILED - message size 8000 is larger"


def tried(broker: Refusing, times: int) -> bool:
    return len(broker.attempts) == times


async def spool_before_start(path: Path, deliveries: list[Delivery]) -> None:
    """What a bridge whose broker was away left in its spool."""
    async with await Spool.open(SpoolSettings(path=path)) as spool:
        for spooled in deliveries:
            await spool.append(spooled)


async def bridge_status(http: aiohttp.ClientSession, url: str) -> dict[str, int]:
    async with http.get(url + "/status") as response:
        spool: dict[str, int] = (await response.json())["spool"]
        return spool


def on_disk(path: Path) -> tuple[int, int]:
    """(depth, parked) as the spool file has them, read by another connection."""
    with contextlib.closing(sqlite3.connect(path / FILE_NAME)) as db:
        depth, parked = db.execute("SELECT count(*), count(parked) FROM events").fetchone()
        return int(depth), int(parked)


async def spool_with_parked(spool: Spool, *, count: int, parked: int) -> list[SpooledEvent]:
    """``count`` events in ``spool``, the first ``parked`` of them parked (as by an earlier run,
    or in this one); returns the events."""
    for n in range(count):
        await spool.append(delivery(n))
    events = await spool.peek(count)
    for event in events[:parked]:
        await spool.note_refusal(event.id, REFUSAL, certain=True)
    return events


async def park_all(path: Path, deliveries: list[Delivery]) -> None:
    """A spool holding ``deliveries``, every one of them parked (by an earlier run)."""
    await spool_before_start(path, deliveries)
    async with await Spool.open(SpoolSettings(path=path)) as spool:
        for event in await spool.peek(len(deliveries)):
            await spool.note_refusal(event.id, REFUSAL, certain=True)


class Refusing:
    """A stand-in for the publisher: refuses the message ids it is told to (as the broker
    refuses a message over its size limit), fails on request, takes the rest."""

    def __init__(self, *refused: str) -> None:
        self.refusals_to_come: dict[str, float] = dict.fromkeys(refused, math.inf)
        self.names_size = True  # as RabbitMQ's text does
        self.blames_another = False  # refused for another message in flight on the channel
        self.failures_to_come = 0
        self.attempts: list[str] = []
        self.published: list[str] = []

    async def publish(self, spooled: Delivery) -> None:
        self.attempts.append(spooled.message_id)
        if self.failures_to_come:
            self.failures_to_come -= 1
            raise PublishFailed("broker did not confirm in time")
        if self.refusals_to_come.get(spooled.message_id, 0) > 0:
            self.refusals_to_come[spooled.message_id] -= 1
            named = len(spooled.body) + self.blames_another if self.names_size else None
            raise MessageRefused(REFUSAL, size=named)
        self.published.append(spooled.message_id)


@contextlib.asynccontextmanager
async def forwarding(
    spool: Spool, broker: Refusing, parked_retry_interval: float = 600
) -> AsyncIterator[None]:
    forwarder = Forwarder(
        spool,
        broker.publish,
        is_connected=lambda: True,
        retry_delay=0.01,
        parked_retry_interval=parked_retry_interval,
    )
    forwarder.start()
    try:
        yield
    finally:
        await forwarder.stop(grace=0)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    async with await Spool.open(SpoolSettings(path=tmp_path / "spool")) as opened:
        yield opened


# --- against RabbitMQ ---------------------------------------------------------------------------


async def test_an_event_the_broker_refuses_is_parked_and_the_events_behind_it_go_on(
    tmp_path: Path,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    start_bridge: BridgeFactory,
    http: aiohttp.ClientSession,
) -> None:
    too_large = delivery(99, size=TOO_LARGE)
    await spool_before_start(
        tmp_path / "spool", [delivery(0), delivery(1), too_large, delivery(2), delivery(3)]
    )
    with private_broker.max_message_size(BROKER_LIMIT), structlog.testing.capture_logs() as logs:
        async with start_bridge(amqp={"url": private_broker.url}) as bridge:
            received = await drain(private_queue, expect=4, within=30)
            await eventually(lambda: bridge.spool.parked == 1)
            status = await bridge_status(http, bridge.url)
            metrics = await scrape(http, bridge.url + "/metrics")

    assert [message.message_id for message in received] == ["evt_0", "evt_1", "evt_2", "evt_3"]
    assert (status["depth"], status["parked"]) == (1, 1)
    assert value(metrics, "konpro_bridge_spool_parked") == 1
    assert value(metrics, "konpro_bridge_spool_depth") == 1
    (parked,) = (line for line in logs if line["event"] == "spool.event_parked")
    assert parked["log_level"] == "error"
    assert (parked["message_id"], parked["bytes"]) == ("evt_99", TOO_LARGE)
    assert "PRECONDITION_FAILED - message size 8000 is larger" in parked["reason"]
    async with await Spool.open(SpoolSettings(path=tmp_path / "spool")) as kept:
        assert (kept.depth, kept.parked) == (1, 1)
        assert [event.delivery.message_id for event in await kept.peek_parked(10)] == ["evt_99"]


async def test_a_parked_event_goes_through_once_the_broker_takes_it(
    tmp_path: Path,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    start_bridge: BridgeFactory,
) -> None:
    await spool_before_start(tmp_path / "spool", [delivery(99, size=TOO_LARGE), delivery(0)])
    with contextlib.ExitStack() as limit, structlog.testing.capture_logs() as logs:
        limit.enter_context(private_broker.max_message_size(BROKER_LIMIT))
        spool = {"parked_retry_interval": 0.5}
        async with start_bridge(amqp={"url": private_broker.url}, spool=spool) as bridge:
            await eventually(lambda: bridge.spool.parked == 1)
            limit.close()  # the operator raises the broker's max_message_size
            await eventually(lambda: bridge.spool.depth == 0, within=15)
        received = await drain(private_queue, expect=2)

    assert [message.message_id for message in received] == ["evt_0", "evt_99"]
    assert len(received[1].body) == TOO_LARGE
    events = [line["event"] for line in logs]
    assert "spool.parked_still_refused" in events  # tried while the limit stood
    assert events.count("spool.parked_released") == 1


async def post_for(
    http: aiohttp.ClientSession, url: str, *, seconds: float, senders: int = 4
) -> list[tuple[str, bool, int]]:
    """Distinct events, one in fifty too large for the broker: (id, too large?, status)."""
    counter = itertools.count()
    answers: list[tuple[str, bool, int]] = []
    deadline = time.monotonic() + seconds

    async def sender() -> None:
        while time.monotonic() < deadline:
            n = next(counter)
            event_id, too_large = f"evt-{n}-{uuid.uuid4().hex[:6]}", n % 50 == 7
            data = {"video_id": event_id, "padding": "x" * (TOO_LARGE if too_large else 0)}
            body = orjson.dumps({"event_type": "avatar_video.success", "event_data": data})
            headers = {"Content-Type": "application/json", "KonPro-Event-Id": event_id}
            async with http.post(url, data=body, headers=headers) as response:
                answers.append((event_id, too_large, response.status))

    await asyncio.gather(*(sender() for _ in range(senders)))
    return answers


async def test_under_load_and_a_link_cut_every_accepted_event_reaches_the_queue_or_is_parked(
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    start_bridge: BridgeFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Each too-large delivery the broker refuses closes the channel under every publish in
    flight; those are spooled, and only the refused ones are parked. Once the limit is raised,
    the parked ones reach the queue too."""
    with contextlib.ExitStack() as limit, structlog.testing.capture_logs() as logs:
        limit.enter_context(private_broker.max_message_size(BROKER_LIMIT))
        async with TcpProxy("127.0.0.1", private_broker.port) as proxy:
            amqp = {"url": proxied_amqp_url(proxy), "publish_timeout": 1.0}
            spool = {"parked_retry_interval": 1.0}
            async with start_bridge(amqp=amqp, spool=spool) as bridge:
                load = asyncio.create_task(post_for(http, bridge.webhook_url, seconds=4))
                await asyncio.sleep(1.5)
                await proxy.cut()
                await asyncio.sleep(1.5)
                await proxy.restore()
                answers = await load
                too_large = {event_id for event_id, large, status in answers if large}

                def only_the_refused_left() -> bool:
                    spooled = bridge.spool
                    return spooled.depth == spooled.parked == len(too_large)

                await eventually(only_the_refused_left, within=60)
                limit.close()  # the operator raises the broker's max_message_size
                await eventually(lambda: bridge.spool.depth == 0, within=30)

    statuses = collections.Counter(status for _, _, status in answers)
    assert set(statuses) <= {200, 202}, statuses
    assert statuses[202] > 0
    received = {str(m.message_id) for m in await drain(private_queue, expect=len(answers))}
    assert {event_id for event_id, _, _ in answers} <= received
    errors = {line["event"] for line in logs if line["log_level"] == "error"}
    assert errors == {"spool.event_parked"}
    print(f"accepted={len(answers)} too_large={len(too_large)} spooled={statuses[202]}")


async def test_a_channel_refused_again_and_again_is_not_taken_for_one_that_stays_closed(
    private_broker: PrivateBroker,
    start_bridge: BridgeFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each refusal closes the channel, and the forwarder's next refused event closes it again
    as soon as it is back: the channel is down most of the time, yet restored every time, and
    no reason to start over with a new connection (``amqp.channel_not_restored``)."""
    # Three times what a restore takes here, so that a loaded machine does not make one late.
    monkeypatch.setattr("bridge.publisher._CHANNEL_RESTORE_GRACE", 2.0)
    data = [{"padding": "x" * (TOO_LARGE + n)} for n in range(8)]
    bodies = [orjson.dumps({"event_type": "avatar_video.fail", "event_data": d}) for d in data]
    with private_broker.max_message_size(BROKER_LIMIT), structlog.testing.capture_logs() as logs:
        async with (
            TcpProxy("127.0.0.1", private_broker.port) as proxy,
            start_bridge(amqp={"url": proxied_amqp_url(proxy)}) as bridge,
        ):
            proxy.delay = 0.05  # restoring a channel (six round trips) then takes 0.6 s
            for body in bodies:
                async with http.post(bridge.webhook_url, data=body, headers=JSON) as answer:
                    assert answer.status == 202
            await eventually(lambda: bridge.spool.parked == len(bodies), within=30)

    events = [line["event"] for line in logs]
    assert events.count("amqp.channel_closed") >= len(bodies)
    assert "amqp.channel_not_restored" not in events
    assert events.count("amqp.connected") == 1


async def test_refusals_of_live_deliveries_beside_a_spooled_event_do_not_park_it(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
) -> None:
    """The live path and the forwarder publish on one channel. A live delivery over the
    broker's limit closes it, and the forwarder's publish in flight fails with the same
    PRECONDITION_FAILED, naming the other message's size: no refusal of the spooled event."""
    settings = make_settings(tmp_path, exchange_name, amqp={"url": private_broker.url})
    publisher = Publisher(settings.amqp)
    live_refused: list[str] = []
    live_oversized = iter(delivery(900 + n, size=TOO_LARGE) for n in range(PARK_AFTER))

    async def forwarder_publish(spooled: Delivery) -> None:
        """The forwarder's publish, while a live oversized delivery arrives (the first few)."""
        live = next(live_oversized, None)
        if live is None:
            await publisher.publish(spooled)
            return
        arriving = asyncio.create_task(publisher.publish(live))
        try:
            await publisher.publish(spooled)
        finally:
            try:
                await arriving
            except PublishFailed as exc:  # the relay spools it (202)
                live_refused.append(exc.reason)

    with private_broker.max_message_size(BROKER_LIMIT):
        await publisher.start()
        try:
            await asyncio.wait_for(publisher.until_ready(), 10)
            async with await Spool.open(settings.spool) as spool:
                for n in range(2):
                    await spool.append(delivery(n))
                forwarder = Forwarder(
                    spool, forwarder_publish, is_connected=lambda: publisher.is_ready
                )
                publisher.on_ready(forwarder.retry_now)
                forwarder.start()
                try:
                    await eventually(lambda: spool.depth <= 1, within=20)
                    await asyncio.sleep(0.5)
                    parked = spool.parked
                finally:
                    await forwarder.stop(grace=0)
        finally:
            await publisher.close()

    assert len(live_refused) == PARK_AFTER  # only the live deliveries were too large
    received = [m.message_id for m in await drain(private_queue, expect=2, within=5)]
    assert parked == 0, received


async def test_a_left_behind_spool_holding_a_parked_event_holds_up_no_other(
    tmp_path: Path,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    start_bridge: BridgeFactory,
) -> None:
    """server.workers lowered from 3 to 1: worker-1's spool keeps an event the broker refuses,
    and worker-2's events are forwarded all the same."""
    root = tmp_path / "spool"
    await spool_before_start(root / "worker-1", [delivery(99, size=TOO_LARGE), delivery(1)])
    await spool_before_start(root / "worker-2", [delivery(2)])
    with private_broker.max_message_size(BROKER_LIMIT):
        async with start_bridge(amqp={"url": private_broker.url}):
            received = await drain(private_queue, expect=2, within=30)

    # A duplicate may come: a publish in flight when the refusal closed the channel may have
    # been stored with its confirm lost (README, Guarantees).
    assert {m.message_id for m in received} == {"evt_1", "evt_2"}


async def test_a_limit_raised_at_run_time_lets_a_parked_event_through_at_the_second_retry(
    tmp_path: Path,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    start_bridge: BridgeFactory,
) -> None:
    """RabbitMQ reads the limit when a channel opens, and the channel the bridge reopened after
    the refusal keeps the old one: raised at run time, the first retry after the raise may
    still be refused, but that refusal reopens the channel under the new limit, and the next
    retry puts the event through (README: within two intervals). An operator who raised the
    limit is not left waiting on a parked event for ever."""
    interval = 3.0
    await spool_before_start(tmp_path / "spool", [delivery(99, size=TOO_LARGE)])
    with contextlib.ExitStack() as limit, structlog.testing.capture_logs() as logs:
        limit.enter_context(private_broker.max_message_size(BROKER_LIMIT))
        spool = {"parked_retry_interval": interval}
        async with start_bridge(amqp={"url": private_broker.url}, spool=spool) as bridge:
            await eventually(
                lambda: (
                    bridge.spool.parked == 1
                    and bool(seen(logs, "amqp.channel_closed"))
                    and bridge.publisher.is_ready
                )  # the channel is back, opened under the old limit
            )
            limit.close()  # the operator raises the broker's max_message_size
            raised = len(logs)
            await eventually(lambda: bridge.spool.depth == 0, within=5 * interval)
        received = await drain(private_queue, expect=1)

    assert [m.message_id for m in received] == ["evt_99"]
    retries = ("spool.parked_still_refused", "spool.parked_released")
    after_the_raise = [line["event"] for line in logs[raised:] if line["event"] in retries]
    assert after_the_raise in (
        ["spool.parked_released"],  # one refused just before the raise reopened the channel
        ["spool.parked_still_refused", "spool.parked_released"],
    ), after_the_raise


async def test_parked_events_of_a_left_behind_spool_are_counted_where_operators_look(
    tmp_path: Path,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    start_bridge: BridgeFactory,
    http: aiohttp.ClientSession,
) -> None:
    """server.workers lowered from 2 to 1: worker-1's spool holds an event the broker refuses,
    kept and retried while it does, and counted in the metrics and /status with worker 0's."""
    root = tmp_path / "spool"
    await spool_before_start(root / "worker-1", [delivery(99, size=TOO_LARGE), delivery(1)])
    with private_broker.max_message_size(BROKER_LIMIT):
        async with start_bridge(amqp={"url": private_broker.url}) as bridge:
            received = await drain(private_queue, expect=1, within=30)
            await asyncio.sleep(0.5)
            metrics = await scrape(http, bridge.url + "/metrics")
            status = await bridge_status(http, bridge.url)

    assert [m.message_id for m in received] == ["evt_1"]
    assert (root / "worker-1").exists()  # kept: evt_99 is still in it, parked
    assert value(metrics, "konpro_bridge_spool_parked") == 1
    assert (status["depth"], status["parked"]) == (1, 1)


# --- the forwarder's rules ----------------------------------------------------------------------


async def test_an_event_the_broker_names_by_its_size_is_parked_at_the_first_refusal(
    spool: Spool,
) -> None:
    for n in range(3):
        await spool.append(delivery(n))
    broker = Refusing("evt_1")
    with structlog.testing.capture_logs() as logs:
        async with forwarding(spool, broker):
            await eventually(lambda: broker.published == ["evt_0", "evt_2"])

    assert broker.attempts.count("evt_1") == 1
    assert (spool.depth, spool.parked) == (1, 1)
    assert await spool.peek(10) == []
    assert [line["event"] for line in logs].count("spool.event_parked") == 1


@pytest.mark.parametrize(
    ("names", "refusals"),
    [("another size", 3 * PARK_AFTER), ("no size", PARK_AFTER - 1)],
)
async def test_refusals_that_do_not_show_an_event_at_fault_keep_its_place(
    spool: Spool, names: str, refusals: int
) -> None:
    """Every publish in flight on a channel the broker closed fails with the same refusal: the
    size it names tells the message at fault from the others; without one, only repeated
    refusals do."""
    for n in range(2):
        await spool.append(delivery(n))
    broker = Refusing()
    broker.blames_another, broker.names_size = names == "another size", names != "no size"
    broker.refusals_to_come["evt_0"] = refusals
    async with forwarding(spool, broker):
        await eventually(lambda: broker.published == ["evt_0", "evt_1"])

    assert broker.attempts == ["evt_0"] * (refusals + 1) + ["evt_1"]
    assert spool.parked == 0


async def test_a_refusal_that_names_no_size_parks_an_event_only_when_repeated(
    spool: Spool,
) -> None:
    for n in range(3):
        await spool.append(delivery(n))
    broker = Refusing("evt_1")
    broker.names_size = False
    async with forwarding(spool, broker):
        await eventually(lambda: broker.published == ["evt_0", "evt_2"])

    assert broker.attempts.count("evt_1") == PARK_AFTER
    assert spool.parked == 1


async def test_failures_other_than_a_refusal_never_park_an_event(spool: Spool) -> None:
    await spool.append(delivery(0))
    broker = Refusing()
    broker.failures_to_come = 3 * PARK_AFTER  # timeouts, say, during a memory alarm
    async with forwarding(spool, broker):
        await eventually(lambda: broker.published == ["evt_0"])

    assert len(broker.attempts) == 3 * PARK_AFTER + 1
    assert spool.parked == 0


async def test_parked_events_stay_parked_across_a_restart_and_are_tried_at_the_first_look(
    tmp_path: Path,
) -> None:
    settings = SpoolSettings(path=tmp_path / "spool")
    async with await Spool.open(settings) as spool:
        await spool_with_parked(spool, count=3, parked=2)

    async with await Spool.open(settings) as spool:
        assert (spool.depth, spool.parked) == (3, 2)
        assert [entry.delivery.message_id for entry in await spool.peek(10)] == ["evt_2"]
        broker = Refusing()  # the broker takes them now
        with structlog.testing.capture_logs() as logs:
            async with forwarding(spool, broker):
                await eventually(lambda: spool.depth == 0)

    assert broker.published == ["evt_2", "evt_0", "evt_1"]  # the others, then parked ones
    (released,) = (line for line in logs if line["event"] == "spool.parked_released")
    assert released["back_in_line"] == 1


async def test_a_parked_event_still_refused_is_tried_again_once_per_interval(
    spool: Spool,
) -> None:
    await spool.append(delivery(0))
    broker = Refusing("evt_0")
    async with forwarding(spool, broker, parked_retry_interval=0.5):
        await eventually(lambda: spool.parked == 1)
        tries_before = len(broker.attempts)
        await asyncio.sleep(1.2)
        tries = len(broker.attempts) - tries_before

    assert 1 <= tries <= 3, tries  # at 0.5 s and 1.0 s; not once per look


async def test_parking_an_event_starts_the_back_off_afresh(spool: Spool) -> None:
    """A refusal closes the channel: once the event at fault is parked, the channel's return
    ends the wait, even in a run of failures that had used up its early retry."""
    for n in range(2):
        await spool.append(delivery(n))
    broker = Refusing("evt_0")
    broker.failures_to_come = 1  # a timeout first: the run's early retry goes to it
    forwarder = Forwarder(spool, broker.publish, is_connected=lambda: True, retry_delay=60)
    forwarder.start()
    try:
        await eventually(functools.partial(tried, broker, 1))
        await asyncio.sleep(0.05)
        forwarder.retry_now()  # the link is back
        await eventually(functools.partial(tried, broker, 2))  # refused, and parked
        await asyncio.sleep(0.05)
        forwarder.retry_now()  # the robust channel reopened
        await eventually(lambda: broker.published == ["evt_1"], within=5)
    finally:
        await forwarder.stop(grace=0)


async def test_a_parked_event_published_but_not_removed_is_not_published_again(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk fills up just as the broker takes a parked event again: its removal fails, and
    no later retry of parked events may take it for one still parked."""
    first, _, _ = await spool_with_parked(spool, count=3, parked=2)
    disk_full, filled = False, False
    delete = _Database.delete

    def delete_unless_the_disk_is_full(self: _Database, ids: Sequence[int]) -> tuple[int, ...]:
        nonlocal disk_full, filled
        if first.id in ids and not filled:  # it fills up as the first parked one goes
            disk_full = filled = True
        if disk_full:
            raise sqlite3.OperationalError("database or disk is full")
        return delete(self, ids)

    monkeypatch.setattr(_Database, "delete", delete_unless_the_disk_is_full)
    broker = Refusing()
    async with forwarding(spool, broker, parked_retry_interval=0.1):
        await eventually(lambda: broker.published == ["evt_2", "evt_0"])
        await asyncio.sleep(0.5)  # several looks, with removals still failing
        disk_full = False
        await eventually(lambda: spool.depth == 0)

    assert broker.published == ["evt_2", "evt_0", "evt_1"]


async def test_parked_events_make_no_busy_loop_while_the_broker_is_away(spool: Spool) -> None:
    await spool_with_parked(spool, count=1, parked=1)  # by the last run: due at the first look
    looks = 0

    def is_connected() -> bool:
        nonlocal looks
        looks += 1
        return False

    forwarder = Forwarder(spool, Refusing().publish, is_connected=is_connected)
    forwarder.start()
    await asyncio.sleep(0.5)
    await forwarder.stop(grace=0)

    assert looks == 1


@pytest.mark.parametrize(("names_size", "sizes"), [(True, (100, 16)), (False, (16, 100))])
async def test_a_parked_event_the_broker_takes_now_is_not_held_behind_one_it_still_refuses(
    spool: Spool, names_size: bool, sizes: tuple[int, int]
) -> None:
    """The broker takes evt_1 now but still refuses evt_0 (its limit raised, but not enough).
    A refusal by size: the smallest is tried first. One that names no size proves nothing about
    the others: they are tried in turn."""
    for n, size in enumerate(sizes):
        await spool.append(delivery(n, size=size))
    broker = Refusing("evt_0")  # refused for good
    broker.names_size = names_size
    broker.refusals_to_come["evt_1"] = 1 if names_size else PARK_AFTER  # until parked
    async with forwarding(spool, broker, parked_retry_interval=0.2):
        await eventually(lambda: spool.parked == 2)
        await eventually(lambda: "evt_1" in broker.published, within=3)

    assert broker.published == ["evt_1"], broker.attempts


async def test_while_the_broker_refuses_the_smallest_parked_event_no_larger_one_is_tried(
    spool: Spool,
) -> None:
    """A refusal by size: every larger parked event would be refused too. The smallest is the
    one to try, every interval, so that it goes through at the first retry after the raise."""
    for n, size in enumerate((16, 100, 200)):
        await spool.append(delivery(n, size=size))
    for event in await spool.peek(3):
        await spool.note_refusal(event.id, REFUSAL, certain=True)
    broker = Refusing("evt_1", "evt_2")  # still too large
    broker.refusals_to_come["evt_0"] = 2  # refused at start and at the next retry, then taken
    async with forwarding(spool, broker, parked_retry_interval=0.1):
        await eventually(lambda: "evt_0" in broker.published)

    assert broker.attempts[:3] == ["evt_0"] * 3


async def test_a_stop_while_parked_events_are_put_back_in_line_keeps_the_count_as_on_disk(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shutdown grace runs out while the spool writes: the write goes on in its thread all
    the same, and the count in memory must follow it."""
    await spool_with_parked(spool, count=3, parked=2)
    unparking = threading.Event()
    unpark = _Database.unpark_all

    def slow_unpark(self: _Database) -> int:
        unparking.set()
        time.sleep(0.5)  # a slow disk
        return unpark(self)

    monkeypatch.setattr(_Database, "unpark_all", slow_unpark)
    broker = Refusing()  # the broker takes them now
    forwarder = Forwarder(spool, broker.publish, is_connected=lambda: True)
    forwarder.start()
    await eventually(unparking.is_set)  # evt_0 taken, at start; evt_1 being put back in line
    await forwarder.stop(grace=0)  # the bridge's shutdown grace has run out
    await spool.status()  # runs after the UPDATE in flight, on the same thread

    assert (spool.depth, spool.parked) == on_disk(spool.path.parent)


@pytest.mark.parametrize("failing", ["delete", "unpark_all"])
async def test_a_write_that_fails_once_as_parked_events_are_released_does_not_hold_them_an_interval(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """The broker takes a parked event again, but the disk refuses one write just then: the
    removal of that event, or putting the others back in line. The others are released after
    the usual back-off, not a whole spool.parked_retry_interval (600 s) later."""
    await spool_with_parked(spool, count=3, parked=2)
    original = getattr(_Database, failing)
    failures = [sqlite3.OperationalError("database or disk is full")]

    def fails_once(self: _Database, *args: object) -> object:
        if failures:
            raise failures.pop()
        return original(self, *args)

    monkeypatch.setattr(_Database, failing, fails_once)
    broker = Refusing()  # the broker takes every event now
    async with forwarding(spool, broker):  # parked_retry_interval: 600 s, the default
        await eventually(lambda: "evt_2" in broker.published)
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: spool.depth == 0, within=5)

    assert (spool.depth, spool.parked) == (0, 0), broker.published


async def test_parked_events_are_tried_every_interval_even_while_new_ones_are_parked(
    spool: Spool,
) -> None:
    """The broker's limit was raised, but not past every size KonPro sends: evt_0, parked
    before, refused once more at start, goes through at the next retry, an interval on, while
    new deliveries still refused are parked more often than that."""
    await spool_with_parked(spool, count=1, parked=1)
    refused = [f"evt_{100 + n}" for n in range(40)]
    broker = Refusing(*refused)
    broker.refusals_to_come["evt_0"] = 1
    await spool.append(delivery(100))
    forwarder = Forwarder(
        spool,
        broker.publish,
        is_connected=lambda: True,
        retry_delay=0.01,
        parked_retry_interval=0.5,
    )

    async def live_deliveries_still_too_large() -> None:
        for n in range(1, len(refused)):
            await asyncio.sleep(0.2)
            await spool.append(delivery(100 + n))  # as the relay spools a refused delivery
            forwarder.notify()

    forwarder.start()
    arriving = asyncio.create_task(live_deliveries_still_too_large())
    try:
        with contextlib.suppress(TimeoutError):
            await eventually(lambda: "evt_0" in broker.published, within=3)  # six intervals
    finally:
        arriving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await arriving
        await forwarder.stop(grace=0)

    assert "evt_0" in broker.published, broker.attempts
    first, second = (n for n, event_id in enumerate(broker.attempts) if event_id == "evt_0")
    assert len({e for e in broker.attempts[first:second] if e in refused}) > 1  # parked between


async def test_events_drained_before_a_refused_retry_of_a_parked_one_are_logged(
    spool: Spool,
) -> None:
    """The events forwarded before a retry of a parked one that the broker refuses again are
    logged all the same."""
    await spool_with_parked(spool, count=3, parked=1)  # evt_0 parked; evt_1, evt_2 waiting
    broker = Refusing("evt_0")  # still refused
    with structlog.testing.capture_logs() as logs:
        async with forwarding(spool, broker):
            await eventually(lambda: broker.published == ["evt_1", "evt_2"])
            await eventually(
                lambda: any(line["event"] == "spool.parked_still_refused" for line in logs)
            )

    drained = [line for line in logs if line["event"] == "spool.drained"]
    assert [line["count"] for line in drained] == [2], [line["event"] for line in logs]


async def test_spool_drain_goes_past_a_refusal_whose_text_names_no_size(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A broker whose refusal names no size the bridge can read (another version's wording,
    say): ``spool drain`` is the only publisher on its channel, so a refusal is the event's own,
    which is parked at once, and the drain goes on."""
    monkeypatch.setattr("bridge.publisher._TOO_LARGE", re.compile(r"(?!)(\d+)"))  # no size read
    settings = make_settings(tmp_path, exchange_name, amqp={"url": private_broker.url})
    await spool_before_start(settings.spool.path, [delivery(0, size=TOO_LARGE), delivery(1)])
    publisher = Publisher(settings.amqp)
    with private_broker.max_message_size(BROKER_LIMIT):
        await publisher.start()
        try:
            await asyncio.wait_for(publisher.until_ready(), 10)
            async with await Spool.open(settings.spool) as spool:
                outcome = await drain_for_good(
                    [spool],
                    forwarder.forwarding(publisher.publish),
                    usable=publisher.until_ready,
                )
                kept = (spool.depth, spool.parked)
        finally:
            await publisher.close()

    received = await drain(private_queue, expect=1)
    assert [m.message_id for m in received] == ["evt_1"]
    assert outcome == (1, 1)  # drained 1; 1 parked event stays: the broker still refuses it
    assert kept == (1, 1)


async def test_the_log_at_stop_counts_the_parked_events_as_the_spool_has_them(
    tmp_path: Path,
    bind_queue: QueueFactory,
    start_bridge: BridgeFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shutdown grace runs out while parked events are put back in line (a slow disk): the
    write goes on in the spool's thread, and ``bridge.spool_not_empty`` counts as the spool
    has them once it is through."""
    await bind_queue("#")
    await park_all(tmp_path / "spool", [delivery(0), delivery(1)])  # by the last run
    unparking = threading.Event()
    unpark = _Database.unpark_all

    def slow_unpark(self: _Database) -> int:
        unparking.set()
        time.sleep(1.0)  # a slow disk
        return unpark(self)

    monkeypatch.setattr(_Database, "unpark_all", slow_unpark)
    with structlog.testing.capture_logs() as logs:
        async with start_bridge(server={"shutdown_timeout": 0.2}):
            await eventually(unparking.is_set)  # evt_0 taken; evt_1 being put back in line

    (line,) = (line for line in logs if line["event"] == "bridge.spool_not_empty")
    assert (line["depth"], line["parked"]) == on_disk(tmp_path / "spool")


# --- what operators see --------------------------------------------------------------------------


async def test_spool_status_counts_the_parked_events(tmp_path: Path) -> None:
    settings = SpoolSettings(path=tmp_path / "spool")
    async with await Spool.open(settings) as spool:
        await spool_with_parked(spool, count=2, parked=1)
    config = write_toml(tmp_path / "c.toml", {"spool": {"path": str(settings.path)}})

    code, out, _ = await run_command("spool", "status", "--config", str(config))
    _, as_json, _ = await run_command("spool", "status", "--json", "--config", str(config))

    assert code == 0
    assert "depth:  2 events\nparked: 1 of them, refused by the broker" in out
    assert json.loads(as_json)["parked"] == 1


async def park_the_first_of(path: Path, count: int, *, size: int = 16) -> None:
    """A spool of ``count`` events whose first one (of ``size`` bytes) the daemon parked."""
    events = [delivery(0, size=size), *(delivery(n) for n in range(1, count))]
    await spool_before_start(path, events)
    async with await Spool.open(SpoolSettings(path=path)) as spool:
        (first,) = await spool.peek(1)
        await spool.note_refusal(first.id, REFUSAL, certain=True)


def drain_config(tmp_path: Path, amqp_url: str, exchange: str) -> Path:
    return write_toml(
        tmp_path / "drain.toml",
        {
            "amqp": {"url": amqp_url, "exchange": exchange},
            "spool": {"path": str(tmp_path / "spool")},
            "reconcile": {"enabled": False},
        },
    )


async def test_spool_drain_tries_the_parked_events_too(
    tmp_path: Path, exchange_name: str, bind_queue: QueueFactory
) -> None:
    """``spool drain`` empties a spool whose node is decommissioned: parked events included,
    last, since the broker may take them now."""
    queue = await bind_queue("#")
    await park_the_first_of(tmp_path / "spool", 3)
    config = drain_config(tmp_path, AMQP_URL, exchange_name)

    code, out, err = await run_command("spool", "drain", "--config", str(config))

    assert code == 0, err
    assert "drained 3 events" in out
    received = await drain(queue, expect=3)
    assert [message.message_id for message in received] == ["evt_1", "evt_2", "evt_0"]


async def test_spool_drain_goes_past_what_the_broker_refuses_keeps_it_parked_and_fails(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
) -> None:
    """evt_0 was parked by the daemon; evt_50, as large, the broker refuses for the first time
    during the drain. Both stay in the spool, parked; the others are drained; exit 1."""
    path = tmp_path / "spool"
    await park_the_first_of(path, 2, size=TOO_LARGE)
    await spool_before_start(path, [delivery(50, size=TOO_LARGE), delivery(2)])
    config = drain_config(tmp_path, private_broker.url, exchange_name)

    with private_broker.max_message_size(BROKER_LIMIT):
        code, out, err = await run_command("spool", "drain", "--config", str(config))

    assert code == 1
    assert "drained 2 events" in out
    assert "2 parked events stay in the spool: the broker still refuses them" in err
    received = await drain(private_queue, expect=2)
    assert [message.message_id for message in received] == ["evt_1", "evt_2"]
    async with await Spool.open(SpoolSettings(path=path)) as kept:
        assert (kept.depth, kept.parked) == (2, 2)  # for the daemon to retry
        parked = [event.delivery.message_id for event in await kept.peek_parked(10)]
        assert parked == ["evt_0", "evt_50"]


async def test_spool_drain_drains_every_workers_spool_before_the_parked_events(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
) -> None:
    """Decommissioning a node of two workers: worker 0's spool holds an event the broker still
    refuses (parked), worker 1's an ordinary event, which a refusal must not keep back."""
    root = tmp_path / "spool"
    await park_the_first_of(root, 1, size=TOO_LARGE)
    await spool_before_start(root / "worker-1", [delivery(1)])
    config = drain_config(tmp_path, private_broker.url, exchange_name)

    with private_broker.max_message_size(BROKER_LIMIT):
        await run_command("spool", "drain", "--config", str(config))

    received = await drain(private_queue, expect=1)
    assert [m.message_id for m in received] == ["evt_1"]


async def test_spool_drain_drains_the_parked_events_behind_one_the_broker_still_refuses(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
) -> None:
    """A decommissioned node of two workers: worker 0 parked evt_99 (still too large) and evt_1,
    worker 1 parked evt_2; the broker takes evt_1 and evt_2 now, and they are drained."""
    root = tmp_path / "spool"
    await park_all(root, [delivery(99, size=TOO_LARGE), delivery(1)])
    await park_all(root / "worker-1", [delivery(2)])
    config = drain_config(tmp_path, private_broker.url, exchange_name)

    with private_broker.max_message_size(BROKER_LIMIT):
        code, _, _ = await run_command("spool", "drain", "--config", str(config))

    assert code == 1  # evt_99 stays
    received = await drain(private_queue, expect=2)
    assert sorted(m.message_id for m in received) == ["evt_1", "evt_2"]


async def test_spool_drain_does_not_try_what_is_as_large_as_an_event_refused_by_size(
    spool: Spool,
) -> None:
    """Each refusal costs the channel: once the broker has refused a size, a parked event at
    least as large would be refused too, and is counted so without being tried."""
    for n, size in enumerate((8000, 16, 9000, 8000)):
        await spool.append(delivery(n, size=size))
    for event in await spool.peek(4):
        await spool.note_refusal(event.id, REFUSAL, certain=True)
    broker = Refusing("evt_0", "evt_2", "evt_3")

    async def usable() -> None:
        pass

    drained, refused = await drain_parked(spool, broker.publish, usable=usable)

    assert (drained, refused) == (1, 3)
    assert broker.attempts == ["evt_0", "evt_1"]
    assert (spool.depth, spool.parked) == (3, 3)


async def test_a_spool_written_before_parking_existed_is_read_and_upgraded(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir()
    with contextlib.closing(sqlite3.connect(directory / FILE_NAME)) as old:
        old.execute(
            "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, event_type TEXT NOT NULL,"
            " message_id TEXT NOT NULL, body BLOB NOT NULL, headers TEXT NOT NULL,"
            " received_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0)"
        )
        old.execute(
            "INSERT INTO events (event_type, message_id, body, headers, received_at)"
            " VALUES ('avatar_video.success', 'evt_0', x'7b7d', '{}', 1.0)"
        )
        old.commit()
    config = write_toml(tmp_path / "c.toml", {"spool": {"path": str(directory)}})

    code, out, err = await run_command("spool", "status", "--json", "--config", str(config))
    assert (code, err) == (0, "")
    assert (json.loads(out)["depth"], json.loads(out)["parked"]) == (1, 0)

    async with await Spool.open(SpoolSettings(path=directory)) as spool:
        (entry,) = await spool.peek(10)
        await spool.note_refusal(entry.id, REFUSAL, certain=True)
        assert (spool.depth, spool.parked) == (1, 1)


async def test_a_message_rabbitmq_refuses_for_its_size_is_refused_naming_that_size(
    tmp_path: Path, exchange_name: str, private_broker: PrivateBroker
) -> None:
    """RabbitMQ refuses a message over ``max_message_size`` with a PRECONDITION_FAILED whose
    text names the size; every publish in flight on the channel fails with it. The bridge reads
    the size from the broker's own words to tell which message was refused (``blames``): a
    spooled event that failed beside a live oversized one is then not counted as refused, and
    one refused for itself is parked at once. Pinned against a real broker, so that a RabbitMQ
    whose wording changes is noticed here, not by events parked for another's size."""
    settings = make_settings(tmp_path, exchange_name, amqp={"url": private_broker.url})
    publisher = Publisher(settings.amqp)
    oversized = Delivery("avatar_video.success", b"0" * 8000, "evt_oversized")
    with private_broker.max_message_size(4096):
        await publisher.start()
        try:
            await asyncio.wait_for(publisher.until_ready(), 10)
            with pytest.raises(MessageRefused) as refused:
                await publisher.publish(oversized)
        finally:
            await publisher.close()

    assert refused.value.size == 8000
    assert refused.value.blames(oversized.body) is True
    assert refused.value.blames(b"0" * 16) is False


async def test_spool_drain_tries_larger_parked_events_after_a_refusal_that_names_no_size(
    spool: Spool,
) -> None:
    """Only a refusal by size tells that every larger event would be refused too; one whose
    text names no size says nothing about the others, so `spool drain` still tries them."""
    await spool.append(delivery(0, size=16))
    await spool.append(delivery(1, size=64))
    for entry in await spool.peek(10):
        assert await spool.note_refusal(entry.id, "refused", certain=True)
    published: list[str] = []

    async def publish(event: Delivery) -> None:
        if event.message_id == "evt_0":
            raise MessageRefused("PRECONDITION_FAILED - refused, no size named")
        published.append(event.message_id)

    async def usable() -> None:
        return None

    assert await drain_parked(spool, publish, usable=usable) == (1, 1)
    assert published == ["evt_1"]
    assert (spool.depth, spool.parked) == (1, 1)
