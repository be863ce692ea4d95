"""The broker going away: OPTIONS and health stay instant, readiness tells the truth, no false 2xx.

The link to the shared broker is cut with a TCP proxy of the test's own; the broker itself is
never stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
import structlog
from aio_pika.abc import AbstractChannel
from structlog.testing import capture_logs

from bridge.app import Bridge
from bridge.events import Delivery, PublishFailed
from bridge.forwarder import Forwarder
from bridge.publisher import Outage, Publisher
from bridge.spool import Spool
from tests.support.deliveries import envelope, post_status
from tests.support.harness import (
    BridgeFactory,
    QueueFactory,
    drain,
    make_settings,
    process_sections,
    proxied_amqp_url,
)
from tests.support.observing import seen
from tests.support.private_broker import PrivateBroker
from tests.support.process import BridgeProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

VALID = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'
NEXT = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v2"}}'
JSON = {"Content-Type": "application/json"}


async def deliver(http: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with http.post(url, data=body, headers=JSON) as response:
        return response.status


async def readiness(http: aiohttp.ClientSession, bridge: Bridge) -> tuple[int, dict[str, str]]:
    async with http.get(bridge.url + "/readyz") as response:
        return response.status, await response.json()


async def wait_for_readiness(
    http: aiohttp.ClientSession, bridge: Bridge, status: int
) -> dict[str, str]:
    answers: list[tuple[int, dict[str, str]]] = []

    async def has_status() -> bool:
        answers.append(await readiness(http, bridge))
        return answers[-1][0] == status

    await eventually(has_status)
    return answers[-1][1]


async def wait_for_empty_spool(bridge: Bridge) -> None:
    await eventually(lambda: bridge.spool.depth == 0)


async def test_options_and_health_are_answered_while_the_broker_is_unreachable(
    start_bridge_cut_off: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    """KonPro checks the endpoint with OPTIONS when it is registered, and probes ask for health:
    neither waits for the broker, so an outage neither fails the registration nor has the
    bridge restarted; readiness says why it is not ready."""
    async with start_bridge_cut_off() as bridge:
        url = bridge.webhook_url
        for path in (url, bridge.url + "/", bridge.url + "/any/path"):
            async with http.options(path, timeout=aiohttp.ClientTimeout(total=10)) as response:
                assert response.status == 200
                assert "POST" in response.headers["Allow"]
        async with http.get(bridge.url + "/healthz") as response:
            assert response.status == 200
        status, body = await readiness(http, bridge)
        assert status == 503
        # As the README's troubleshooting table quotes it, for an operator to search for:
        port = broker_proxy.port
        expected = (
            f"cannot connect to the broker: [Errno 111] Connect call failed ('127.0.0.1', {port})"
        )
        assert body["reason"] == expected


async def test_a_delivery_while_the_broker_is_down_is_spooled_then_forwarded(
    start_bridge_cut_off: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_bridge_cut_off() as bridge:
        url = bridge.webhook_url
        async with http.post(url, data=VALID, headers=JSON) as response:
            assert response.status == 202
            assert (await response.json())["outcome"] == "spooled"
        assert bridge.spool.depth == 1
        await broker_proxy.restore()
        await wait_for_readiness(http, bridge, 200)
        assert [m.body for m in await drain(queue, expect=1)] == [VALID]
        await eventually(lambda: bridge.spool.depth == 0)  # removed once confirmed


async def test_the_bridge_connects_and_forwards_once_the_broker_appears(
    start_bridge_cut_off: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_bridge_cut_off() as bridge:
        assert (await readiness(http, bridge))[0] == 503
        await broker_proxy.restore()
        await wait_for_readiness(http, bridge, 200)
        assert await deliver(http, bridge.webhook_url, VALID) == 200
    assert [m.body for m in await drain(queue, expect=1)] == [VALID]


async def test_readiness_follows_the_link_down_and_up_and_delivery_resumes(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_proxied_bridge() as bridge:
        url = bridge.webhook_url
        assert (await readiness(http, bridge))[0] == 200

        await broker_proxy.cut()
        body = await wait_for_readiness(http, bridge, 503)
        assert "broker" in body["reason"]
        assert await deliver(http, url, VALID) == 202

        await broker_proxy.restore()
        await wait_for_readiness(http, bridge, 200)
        assert await deliver(http, url, NEXT) == 200
        await wait_for_empty_spool(bridge)
    assert sorted(m.body for m in await drain(queue, expect=2)) == sorted([VALID, NEXT])


async def test_an_outage_is_logged_once_then_less_and_less_often_and_its_end_says_how_long(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    """aio-pika retries every reconnect_interval; a line per attempt (and aiormq's errors
    beside them) would bury what happened. /status keeps the time the link went down."""
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp_url=proxied_amqp_url(broker_proxy),
        amqp={"reconnect_interval": 0.1},
    )
    async with BridgeProcess(tmp_path, sections) as bridge:
        await broker_proxy.cut()
        await eventually(lambda: "amqp.still_down" in bridge.log())
        since = await link_down_since(http, bridge.url)
        await asyncio.sleep(2.0)
        assert await link_down_since(http, bridge.url) == since
        await broker_proxy.restore()
        await eventually(lambda: "amqp.reconnected" in bridge.log())

    lines = [orjson.loads(line) for line in bridge.log().splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("amqp.connection_lost") == 1
    reminders = [line["attempts"] for line in lines if line["event"] == "amqp.still_down"]
    assert reminders == [2**n for n in range(len(reminders))]
    assert len(reminders) >= 3  # about 20 attempts in 2 s
    (back,) = (line for line in lines if line["event"] == "amqp.reconnected")
    assert back["failed_attempts"] >= reminders[-1]
    assert back["down_for_s"] >= 2.0
    assert [line for line in lines if "logger" in line] == []  # aiormq's and aio-pika's echoes
    assert all(line["level"] in {"info", "warning"} for line in lines)


async def link_down_since(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url + "/status") as response:
        broker = (await response.json())["broker"]
    assert broker["connected"] is False
    return broker["since"]


async def test_a_delivery_the_broker_does_not_confirm_in_time_is_spooled(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_proxied_bridge(amqp={"publish_timeout": 0.5}) as bridge:
        broker_proxy.hold()
        url = bridge.webhook_url
        assert await deliver(http, url, VALID) == 202
        broker_proxy.release()
    # The held publish may arrive as well as the spooled copy: at least once, same message id.
    received = await drain(queue, expect=1)
    assert {m.body for m in received} == {VALID}


async def test_a_delivery_waiting_when_a_silent_link_is_given_up_on_is_spooled_and_answered(
    start_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    """A broker that stops answering without closing (a partition, a frozen host): aiormq gives
    the connection up after three missed heartbeats, and the publish waiting for its confirm
    ends with the connection, not with the publish timeout."""
    queue = await bind_queue("#")
    url = proxied_amqp_url(broker_proxy) + "?heartbeat=1"
    async with start_bridge(amqp={"url": url, "publish_timeout": 30.0}) as bridge:
        broker_proxy.hold()
        async with http.post(bridge.webhook_url, data=VALID, headers=JSON) as response:
            assert response.status == 202
            assert (await response.json())["outcome"] == "spooled"
        assert "no frames" in (bridge.publisher.not_ready_reason() or "")
        broker_proxy.release()
        await wait_for_empty_spool(bridge)
    # The held publish may arrive as well as the spooled copy: at least once, same message id.
    assert {m.body for m in await drain(queue, expect=1)} == {VALID}


async def test_the_spool_still_drains_after_a_silent_link_is_given_up_in_mid_forward(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, bind_queue: QueueFactory
) -> None:
    queue = await bind_queue("#")
    url = proxied_amqp_url(broker_proxy) + "?heartbeat=1"
    settings = make_settings(tmp_path, exchange_name, amqp={"url": url, "publish_timeout": 30.0})
    publisher = Publisher(settings.amqp)
    async with await Spool.open(settings.spool) as spool:
        await spool.append(Delivery("avatar_video.success", VALID, "evt-held"))
        forwarder = Forwarder(spool, publisher.publish, is_connected=lambda: publisher.is_ready)
        await publisher.start()
        await publisher.until_ready()
        broker_proxy.hold()
        forwarder.start()  # it publishes the event and waits for a confirm that cannot come,
        # until aiormq gives the connection up (three missed heartbeats)
        try:
            await eventually(lambda: not publisher.is_ready, within=15)
            broker_proxy.release()
            await eventually(lambda: spool.depth == 0, within=15)
        finally:
            await forwarder.stop()
            await publisher.close()
    assert {m.message_id for m in await drain(queue, expect=1)} == {"evt-held"}


async def test_an_exchange_deleted_under_the_running_bridge_is_declared_again_and_nothing_is_lost(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    channel: AbstractChannel,
    exchange_name: str,
    http: aiohttp.ClientSession,
) -> None:
    first, second, third = (
        VALID.replace(b"v1", video_id.encode()) for video_id in ("first", "second", "third")
    )
    before = await bind_queue("#")
    async with start_bridge() as bridge:
        assert await deliver(http, bridge.webhook_url, first) == 200
        assert [m.body for m in await drain(before, expect=1)] == [first]
        # Publishing to a missing exchange makes the broker close the bridge's channel.
        await channel.exchange_delete(exchange_name)
        assert await deliver(http, bridge.webhook_url, second) in (200, 202)
        await wait_for_empty_spool(bridge)
        # Declared again by the bridge; its binding went with it, so the event went unrouted.
        unrouted = await channel.get_queue(f"{exchange_name}.unrouted")
        assert [m.body for m in await drain(unrouted, expect=1)] == [second]
        after = await bind_queue("#")
        assert await deliver(http, bridge.webhook_url, third) == 200
        assert [m.body for m in await drain(after, expect=1)] == [third]


async def test_a_channel_the_broker_will_not_restore_is_reported_and_rebuilt_once_fixed(
    start_bridge: BridgeFactory,
    channel: AbstractChannel,
    exchange_name: str,
    http: aiohttp.ClientSession,
) -> None:
    event = VALID.replace(b"v1", b"kept")
    unrouted = f"{exchange_name}.unrouted"
    async with start_bridge() as bridge:
        # An operator deletes the exchange and re-declares the unrouted queue with other
        # arguments: the bridge's channel closes, and re-declaring its topology fails.
        await channel.exchange_delete(exchange_name)
        await channel.queue_delete(unrouted)
        await channel.declare_queue(unrouted, durable=True, arguments={"x-max-length": 7})
        assert await deliver(http, bridge.webhook_url, event) == 202

        def reconnecting_fails_too() -> bool:
            reason = bridge.publisher.not_ready_reason() or ""
            return reason.startswith("cannot connect") and "PRECONDITION_FAILED" in reason

        await eventually(reconnecting_fails_too, within=15)
        status, body = await readiness(http, bridge)
        assert (status, "PRECONDITION_FAILED" in body["reason"]) == (503, True)
        await channel.queue_delete(unrouted)  # the operator undoes it
        await wait_for_readiness(http, bridge, 200)
        await wait_for_empty_spool(bridge)
        queue = await channel.get_queue(unrouted)
        assert [m.body for m in await drain(queue, expect=1)] == [event]


async def test_a_deleted_unrouted_exchange_is_declared_again_instead_of_blocking_the_spool(
    start_bridge: BridgeFactory,
    channel: AbstractChannel,
    exchange_name: str,
    http: aiohttp.ClientSession,
) -> None:
    unrouted = f"{exchange_name}.unrouted"
    async with start_bridge() as bridge:
        # Someone tidies up an exchange that looks unused: an event no queue is bound for is
        # then returned by the broker instead of kept, and spooled at the head of the spool.
        await channel.exchange_delete(unrouted)
        assert await deliver(http, bridge.webhook_url, VALID) == 202
        await wait_for_empty_spool(bridge)
        queue = await channel.get_queue(unrouted)
        assert [m.body for m in await drain(queue, expect=1)] == [VALID]


async def test_readiness_accepting_stays_ready_while_the_spool_can_take_deliveries(
    start_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    await broker_proxy.cut()
    sections = {
        "amqp": {"url": proxied_amqp_url(broker_proxy)},
        "server": {"readiness": "accepting"},
        "spool": {"max_events": 1},
    }
    async with start_bridge(wait_ready=False, **sections) as bridge:
        assert await readiness(http, bridge) == (200, {"status": "ready"})
        assert await deliver(http, bridge.webhook_url, VALID) == 202  # the spool is now full
        status, body = await readiness(http, bridge)
        assert status == 503
        assert body["reason"].startswith("cannot connect to the broker")
        assert body["reason"].endswith(
            "and the spool cannot take events (spool full: it holds its limit of 1 events)"
        )
        await broker_proxy.restore()
        await wait_for_readiness(http, bridge, 200)  # the broker is back: ready, spool or not


def test_an_outage_is_reported_at_attempts_1_2_4_8_and_at_least_every_ten_minutes() -> None:
    outage = Outage(started=0.0)
    reported = [n for n in range(1, 21) if outage.failed_attempt(now=n * 5.0)]
    assert reported == [1, 2, 4, 8, 16]  # every 5 s for 100 s: powers of two only

    hours = [n for n in range(21, 200) if outage.failed_attempt(now=n * 60.0)]  # a minute apart
    assert hours[:3] == [21, 31, 32]  # 10 minutes after attempt 16 (at 80 s), then 32
    assert all(later - earlier <= 10 for earlier, later in itertools.pairwise(hours))


async def test_the_first_confirm_after_a_silent_spell_ends_the_forwarders_back_off(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, bind_queue: QueueFactory
) -> None:
    """A broker silent for a while but never disconnected (a memory alarm, a stalled disk):
    no reconnect tells the forwarder it is back, so the first confirm after publishes that
    got none does, instead of the forwarder waiting out a back-off of up to a minute."""
    queue = await bind_queue("#")
    amqp = {"url": proxied_amqp_url(broker_proxy), "publish_timeout": 0.5}
    settings = make_settings(tmp_path, exchange_name, amqp=amqp)
    publisher = Publisher(settings.amqp)
    async with await Spool.open(settings.spool) as spool:
        await spool.append(Delivery("avatar_video.success", VALID, "evt-spooled"))
        forwarder = Forwarder(
            spool, publisher.publish, is_connected=lambda: publisher.is_ready, retry_delay=60
        )
        publisher.on_ready(forwarder.retry_now)  # as the bridge wires them
        await publisher.start()
        await publisher.until_ready()
        broker_proxy.hold()
        with structlog.testing.capture_logs() as logs:
            forwarder.start()
            await eventually(lambda: any(e["event"] == "spool.forward_failed" for e in logs))
        broker_proxy.release()  # the forwarder now backs off for a minute
        try:
            await publisher.publish(Delivery("avatar_video.success", NEXT, "evt-live"))
            await eventually(lambda: spool.depth == 0, within=5)
        finally:
            await forwarder.stop()
            await publisher.close()
    # The timed-out publish may arrive as well as the forwarded copy: same message id.
    assert {m.message_id for m in await drain(queue, expect=2)} == {"evt-spooled", "evt-live"}


def same_id_delivery(body: bytes, message_id: str) -> Delivery:
    return Delivery("avatar_video.success", body, message_id)


async def test_a_publish_waiting_behind_one_with_its_message_id_does_not_wait_for_a_reconnect(
    start_proxied_bridge: BridgeFactory, broker_proxy: TcpProxy
) -> None:
    """A publish waiting behind another with its message id (aiormq tells returns apart by
    it) looks at the link again once its turn comes: before, it went on to ask the robust
    channel for its channel, which waits for a reconnect with no bound, and a live delivery
    hung instead of being spooled."""
    async with start_proxied_bridge(amqp={"publish_timeout": 2.0}) as bridge:
        broker_proxy.mute()  # the first publish waits for a confirm that does not come
        publish = bridge.publisher.publish
        first = asyncio.create_task(publish(same_id_delivery(b'{"n": 1}', "same-id")))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(publish(same_id_delivery(b'{"n": 2}', "same-id")))
        await asyncio.sleep(0.3)
        await broker_proxy.cut()  # and the broker stays away
        try:
            with pytest.raises(PublishFailed):
                await asyncio.wait_for(first, 5)
            with pytest.raises(PublishFailed):
                await asyncio.wait_for(asyncio.shield(second), 5)
        finally:
            second.cancel()
            with contextlib.suppress(BaseException):
                await second


@asynccontextmanager
async def under_a_memory_alarm(
    tmp_path: Path, exchange_name: str, private_broker: PrivateBroker
) -> AsyncIterator[Bridge]:
    """A bridge whose broker keeps the connection but blocks publishers (a memory alarm) for as
    long as the block runs; then the alarm is cleared, and the spool must drain."""
    settings = make_settings(
        tmp_path, exchange_name, amqp={"url": private_broker.url, "publish_timeout": 0.5}
    )
    async with Bridge(settings) as bridge:
        await asyncio.wait_for(bridge.publisher.until_ready(), 10)
        private_broker.raise_memory_alarm()
        try:
            await asyncio.sleep(1.0)  # the broker has told the connection it is blocked
            yield bridge
        finally:
            private_broker.clear_memory_alarm()
        await eventually(lambda: bridge.spool.depth == 0, within=90)


async def test_status_tells_a_broker_that_blocks_publishing(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    http: aiohttp.ClientSession,
) -> None:
    """A memory alarm: the broker keeps the connection and blocks publishers. Deliveries are
    spooled, and ``/status`` says why, although the link is up."""
    async with under_a_memory_alarm(tmp_path, exchange_name, private_broker) as bridge:
        answers = [
            await post_status(http, bridge.webhook_url, envelope(f"alarm-{n}")) for n in range(3)
        ]
        async with http.get(bridge.url + "/status") as response:
            broker = (await response.json())["broker"]
    assert answers == [202, 202, 202]  # nothing could be published
    assert broker["reason"] is not None, f"/status during a memory alarm: {broker}"
    assert "memory" in broker["reason"] or "block" in broker["reason"]


async def test_a_broker_that_takes_the_connection_but_never_answers_is_named_in_the_reason(
    start_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    """A broker starting up or frozen, or a proxy that holds the connection: the reason says
    what timed out and after how long, not an exception's class name."""
    broker_proxy.hold()  # connections are taken, and nothing comes back
    with capture_logs() as logs:
        async with start_bridge(
            wait_ready=False, amqp={"url": proxied_amqp_url(broker_proxy)}
        ) as bridge:
            await eventually(lambda: bool(seen(logs, "amqp.connect_failed")), within=20)
            async with http.get(bridge.url + "/readyz") as response:
                reason = (await response.json())["reason"]
    (failed, *_) = seen(logs, "amqp.connect_failed")
    assert "bridge.listening_before_broker" in [entry["event"] for entry in logs]
    assert reason == f"cannot connect to the broker: {failed['error']}"
    assert failed["error"] != "TimeoutError", (
        "the line that should name the error names an exception class"
    )
    assert any(word in failed["error"] for word in ("handshake", "within", "answer"))


async def test_at_log_level_warning_the_end_of_an_outage_is_still_told(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    """Every delivery logs an info line, so a busy deployment may run at ``warning``: the
    line that ends an outage shows wherever the one that began it did."""
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp_url=proxied_amqp_url(broker_proxy),
        amqp={"reconnect_interval": 0.1},
        log={"level": "warning"},
    )
    async with BridgeProcess(tmp_path, sections) as bridge:
        await broker_proxy.cut()
        await eventually(lambda: "amqp.still_down" in bridge.log())
        assert await post_status(http, bridge.webhook_url, envelope("during")) == 202
        await broker_proxy.restore()

        async def forwarded() -> bool:  # ready again, and the spool drained (just after)
            async with http.get(bridge.url + "/status") as response:
                return bool((await response.json())["spool"]["depth"] == 0)

        await eventually(forwarded)
    events = [orjson.loads(line)["event"] for line in bridge.log().splitlines()]
    assert "amqp.connection_lost" in events
    assert "amqp.reconnected" in events, f"the log at level warning: {events}"


async def test_the_first_connect_backs_off_to_at_most_its_ceiling(
    tmp_path: Path, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bridge started while the broker is down tries again, doubling its wait up to a ceiling
    (30 s): uncapped, after an hour's outage it would wait another hour before noticing the
    broker is back, spooling meanwhile. Shrunk here (first 10 ms, ceiling 50 ms) to see many
    attempts."""
    monkeypatch.setattr("bridge.publisher._FIRST_RETRY_DELAY", 0.01)
    monkeypatch.setattr("bridge.publisher._MAX_CONNECT_DELAY", 0.05)
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    url = f"amqp://guest:guest@127.0.0.1:{port}/"
    publisher = Publisher(make_settings(tmp_path, exchange_name, amqp={"url": url}).amqp)
    with capture_logs() as logs:
        await publisher.start()
        try:
            await eventually(lambda: len(seen(logs, "amqp.connect_failed")) >= 10, within=20)
        finally:
            await publisher.close()
    waits = [line["retry_in"] for line in seen(logs, "amqp.connect_failed")]
    assert max(waits) <= 0.05 * 1.2, waits


async def test_a_broker_that_blocks_publishers_is_told_once_not_at_every_delivery(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
    http: aiohttp.ClientSession,
) -> None:
    """During a memory alarm every publish times out: ``amqp.confirms_late`` is said once, when
    it starts, and ``/status`` keeps saying since when, instead of a warning for every delivery
    and a time that moves with each."""
    async with under_a_memory_alarm(tmp_path, exchange_name, private_broker) as bridge:
        with capture_logs() as logs:
            reasons = []
            for n in range(3):
                body = envelope(f"blocked-{n}")
                assert await post_status(http, bridge.webhook_url, body) == 202
                reasons.append(bridge.publisher.confirms_late_reason)
    assert len(seen(logs, "amqp.confirms_late")) == 1
    assert reasons[0] is not None
    assert reasons == [reasons[0]] * 3  # the same "since"


async def test_a_deleted_unrouted_queue_is_declared_again_and_keeps_the_next_unrouted_event(
    start_bridge: BridgeFactory,
    channel: aio_pika.abc.AbstractChannel,
    exchange_name: str,
    http: aiohttp.ClientSession,
) -> None:
    """Someone deletes the queue ``<exchange>.unrouted`` (it looks like a dead letter heap): an
    event no queue is bound for is then returned, spooled, and the topology declared again,
    queue included, so that the event is kept there and the spool drains. (Whether the bridge's
    declare or the robust channel's restore brings the queue back, the event must not be lost
    or stuck.)"""
    unrouted = f"{exchange_name}.unrouted"
    body = envelope("v_unrouted_queue_deleted")
    async with start_bridge() as bridge:
        await channel.queue_delete(unrouted)
        assert await post_status(http, bridge.webhook_url, body) in (200, 202)
        await eventually(lambda: bridge.spool.depth == 0, within=30)
        queue = await channel.get_queue(unrouted)
        assert [m.body for m in await drain(queue, expect=1)] == [body]
