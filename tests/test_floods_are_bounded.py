"""A flood of large deliveries is refused 503 before its bodies are read, rather than growing the
bridge until a memory limit kills it; what the bridge holds is still delivered."""

from __future__ import annotations

import asyncio
import gzip
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import structlog

from tests.conftest import BridgeFactory, QueueFactory, drain, proxied_amqp_url
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually
from tests.test_metrics_describe_the_bridge import scrape, value

BOUND = {"max_body_bytes": 50_000, "max_bytes_in_flight": 100_000}


def padded_event(size: int) -> bytes:
    """A KonPro envelope of exactly ``size`` bytes."""
    data = {"video_id": uuid.uuid4().hex, "pad": ""}
    envelope = {"event_type": "avatar_video.success", "event_data": data}
    data["pad"] = "x" * (size - len(orjson.dumps(envelope)))
    return orjson.dumps(envelope)


async def post(http: aiohttp.ClientSession, url: str, body: bytes | AsyncIterator[bytes]) -> int:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
        return r.status


async def chunked(body: bytes) -> AsyncIterator[bytes]:
    """The body without a Content-Length: its size is known only once it is read."""
    yield body


async def held_by_a_silent_broker(
    http: aiohttp.ClientSession, url: str, proxy: TcpProxy, *sizes: int
) -> list[asyncio.Task[int]]:
    """Deliveries whose confirms do not come back (yet); returns once the bridge has read each
    body and sent it on."""
    sent_before = proxy.sent_upstream
    deliveries = [asyncio.create_task(post(http, url, padded_event(size))) for size in sizes]
    await eventually(lambda: proxy.sent_upstream >= sent_before + sum(sizes))
    return deliveries


async def test_past_the_bytes_in_flight_a_delivery_is_refused_503_and_the_held_ones_delivered(
    start_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    amqp = {"url": proxied_amqp_url(broker_proxy), "publish_timeout": 8.0}
    async with start_bridge(server=BOUND, amqp=amqp) as bridge:
        url = bridge.webhook_url
        broker_proxy.mute()  # confirms stop coming: the bodies stay held
        held = await held_by_a_silent_broker(http, url, broker_proxy, 40_000, 40_000)
        with structlog.testing.capture_logs() as logs:
            async with http.post(
                url, data=padded_event(40_000), headers={"Content-Type": "application/json"}
            ) as refused:
                refusal = (refused.status, refused.headers.get("Retry-After"), await refused.json())
                closed = refused.headers.get("Connection")  # not read to its end to keep it
        samples = await scrape(http, bridge.url + "/metrics")
        broker_proxy.release()
        answers = await asyncio.gather(*held)
        after = await post(http, url, padded_event(40_000))  # the bytes were given back

    assert refusal == (503, "5", {"status": "unavailable", "detail": "retry later"})
    assert closed == "close"
    [line] = [entry for entry in logs if entry["event"] == "webhook.refused"]
    assert line["reason"] == (
        "80000 bytes of bodies in flight, 40000 more would pass server.max_bytes_in_flight (100000)"
    )
    assert line["event_type"] is None  # refused before its body was read
    received_total = "konpro_bridge_events_received_total"
    assert value(samples, received_total, event_type="other", outcome="refused") == 1
    assert (answers, after) == ([200, 200], 200)
    assert len(await drain(queue, expect=3)) == 3


@pytest.mark.parametrize("form", ["chunked", "gzip"])
async def test_a_body_of_unknown_size_counts_as_the_largest_allowed_until_it_is_read(
    start_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession, form: str
) -> None:
    amqp = {"url": proxied_amqp_url(broker_proxy), "publish_timeout": 8.0}
    async with start_bridge(server=BOUND, amqp=amqp) as bridge:
        url = bridge.webhook_url
        broker_proxy.mute()
        held = await held_by_a_silent_broker(http, url, broker_proxy, 30_000, 30_000)
        small = padded_event(1_000)
        if form == "chunked":  # no Content-Length
            unknown = await post(http, url, chunked(small))  # 60k + 50k
        else:  # a Content-Length, of the compressed body
            headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
            async with http.post(url, data=gzip.compress(small), headers=headers) as response:
                unknown = response.status
        sent = broker_proxy.sent_upstream
        declared = asyncio.create_task(post(http, url, padded_event(30_000)))  # 60k + 30k
        await eventually(lambda: broker_proxy.sent_upstream >= sent + 30_000)
        broker_proxy.release()
        answers = await asyncio.gather(*held, declared)

    assert unknown == 503
    assert answers == [200, 200, 200]


async def test_once_read_a_body_of_unknown_size_counts_as_what_it_was(
    start_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    amqp = {"url": proxied_amqp_url(broker_proxy), "publish_timeout": 8.0}
    async with start_bridge(server=BOUND, amqp=amqp) as bridge:
        url = bridge.webhook_url
        broker_proxy.mute()
        sent = broker_proxy.sent_upstream
        small_but_chunked = asyncio.create_task(post(http, url, chunked(padded_event(1_000))))
        await eventually(lambda: broker_proxy.sent_upstream >= sent + 1_000)
        held = await held_by_a_silent_broker(http, url, broker_proxy, 40_000, 40_000)  # 81k
        broker_proxy.release()
        answers = await asyncio.gather(small_but_chunked, *held)

    assert answers == [200, 200, 200]
