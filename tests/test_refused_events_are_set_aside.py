"""An event the broker refuses for good is set aside (parked) in the spool, not lost, and does not
hold up the events behind it; once the broker takes it again, it goes through.

RabbitMQ refuses a message over its ``max_message_size`` by closing the channel with
PRECONDITION_FAILED. The end-to-end tests lower that limit on the private node; the others give
the forwarder a stand-in for the publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import aio_pika
import aiohttp
import pytest
import structlog

from bridge.config import SpoolSettings
from bridge.events import Delivery, MessageRefused, PublishFailed
from bridge.spool import FILE_NAME, PARK_AFTER, Forwarder, Spool, _Database
from tests.conftest import AMQP_URL, BridgeFactory, QueueFactory, drain
from tests.support.private_broker import PrivateBroker
from tests.support.process import run_command, write_toml
from tests.support.waiting import eventually
from tests.test_metrics_describe_the_bridge import scrape, value
from tests.test_spool import delivery

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


class Refusing:
    """A stand-in for the publisher: refuses the message ids it is told to (as the broker
    refuses a message over its size limit), fails on request, takes the rest."""

    def __init__(self, *refused: str) -> None:
        self.refusals_to_come: dict[str, float] = dict.fromkeys(refused, math.inf)
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
            raise MessageRefused(REFUSAL)
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
        assert (await kept.oldest_parked()) is not None


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


# --- the forwarder's rules ----------------------------------------------------------------------


async def test_an_event_is_parked_after_repeated_refusals_only(spool: Spool) -> None:
    for n in range(3):
        await spool.append(delivery(n))
    broker = Refusing("evt_1")
    with structlog.testing.capture_logs() as logs:
        async with forwarding(spool, broker):
            await eventually(lambda: broker.published == ["evt_0", "evt_2"])

    assert broker.attempts.count("evt_1") == PARK_AFTER
    assert (spool.depth, spool.parked) == (1, 1)
    assert await spool.peek(10) == []
    assert [line["event"] for line in logs].count("spool.event_parked") == 1


async def test_failures_other_than_a_refusal_never_park_an_event(spool: Spool) -> None:
    await spool.append(delivery(0))
    broker = Refusing()
    broker.failures_to_come = 3 * PARK_AFTER  # timeouts, say, during a memory alarm
    async with forwarding(spool, broker):
        await eventually(lambda: broker.published == ["evt_0"])

    assert len(broker.attempts) == 3 * PARK_AFTER + 1
    assert spool.parked == 0


async def test_fewer_refusals_than_the_limit_keep_the_order(spool: Spool) -> None:
    """Every publish in flight on a channel the broker closed fails with the same refusal, so
    an event may be refused for another message's size: it keeps its place."""
    for n in range(2):
        await spool.append(delivery(n))
    broker = Refusing()
    broker.refusals_to_come["evt_0"] = PARK_AFTER - 1
    async with forwarding(spool, broker):
        await eventually(lambda: broker.published == ["evt_0", "evt_1"])

    assert broker.attempts == ["evt_0"] * PARK_AFTER + ["evt_1"]
    assert spool.parked == 0


async def test_parked_events_stay_parked_across_a_restart_and_are_tried_at_the_first_look(
    tmp_path: Path,
) -> None:
    settings = SpoolSettings(path=tmp_path / "spool")
    async with await Spool.open(settings) as spool:
        for n in range(3):
            await spool.append(delivery(n))
        (first, second, _) = await spool.peek(3)
        for _ in range(PARK_AFTER):
            await spool.refused(first.id, REFUSAL)
            await spool.refused(second.id, REFUSAL)

    async with await Spool.open(settings) as spool:
        assert (spool.depth, spool.parked) == (3, 2)
        assert [entry.delivery.message_id for entry in await spool.peek(10)] == ["evt_2"]
        broker = Refusing()  # the broker takes them now
        with structlog.testing.capture_logs() as logs:
            async with forwarding(spool, broker):
                await eventually(lambda: spool.depth == 0)

    assert broker.published == ["evt_0", "evt_1", "evt_2"]  # the oldest parked one first
    (released,) = (line for line in logs if line["event"] == "spool.parked_released")
    assert (released["forwarded"], released["back_in_line"]) == (1, 1)


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
    (first, _) = await spool.peek(2)
    for _ in range(PARK_AFTER - 1):  # refused before, in this process
        await spool.refused(first.id, REFUSAL)
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
    the next retry of parked events must not take it for one still parked."""
    for n in range(2):
        await spool.append(delivery(n))
    (first, _) = await spool.peek(2)
    for _ in range(PARK_AFTER):
        await spool.refused(first.id, REFUSAL)
    disk_full = True
    delete = _Database.delete

    def delete_unless_the_disk_is_full(self: _Database, ids: Sequence[int]) -> tuple[int, ...]:
        if disk_full:
            raise sqlite3.OperationalError("database or disk is full")
        return delete(self, ids)

    monkeypatch.setattr(_Database, "delete", delete_unless_the_disk_is_full)
    broker = Refusing()
    async with forwarding(spool, broker, parked_retry_interval=0.1):
        await eventually(lambda: broker.published == ["evt_0", "evt_1"])
        await asyncio.sleep(0.5)  # a few retries of parked events, with removals still failing
        disk_full = False
        await eventually(lambda: spool.depth == 0)

    assert broker.published == ["evt_0", "evt_1"]


async def test_parked_events_make_no_busy_loop_while_the_broker_is_away(spool: Spool) -> None:
    await spool.append(delivery(0))
    (first,) = await spool.peek(1)
    for _ in range(PARK_AFTER):
        await spool.refused(first.id, REFUSAL)  # parked by the last run: due at the first look
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


# --- what operators see --------------------------------------------------------------------------


async def test_spool_status_counts_the_parked_events(tmp_path: Path) -> None:
    settings = SpoolSettings(path=tmp_path / "spool")
    async with await Spool.open(settings) as spool:
        for n in range(2):
            await spool.append(delivery(n))
        (first, _) = await spool.peek(2)
        for _ in range(PARK_AFTER):
            await spool.refused(first.id, REFUSAL)
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
        (first, *_) = await spool.peek(1)
        for _ in range(PARK_AFTER):
            await spool.refused(first.id, REFUSAL)


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


async def test_spool_drain_fails_on_an_event_the_broker_still_refuses_and_keeps_it(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
) -> None:
    await park_the_first_of(tmp_path / "spool", 3, size=TOO_LARGE)
    config = drain_config(tmp_path, private_broker.url, exchange_name)

    with private_broker.max_message_size(BROKER_LIMIT):
        code, _, err = await run_command("spool", "drain", "--config", str(config))

    assert code == 1
    assert "drain stopped: broker refused the message: PRECONDITION_FAILED" in err
    assert "the rest stays in the spool" in err
    received = await drain(private_queue, expect=2)
    assert [message.message_id for message in received] == ["evt_1", "evt_2"]
    async with await Spool.open(SpoolSettings(path=tmp_path / "spool")) as kept:
        (left,) = await kept.peek(10)
        assert left.delivery.message_id == "evt_0"


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
        for _ in range(PARK_AFTER):
            await spool.refused(entry.id, REFUSAL)
        assert (spool.depth, spool.parked) == (1, 1)
