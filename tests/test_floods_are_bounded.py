"""A flood of large deliveries is refused 503 as its bodies arrive, rather than growing the bridge
until a memory limit kills it; what the bridge holds is still delivered."""

from __future__ import annotations

import asyncio
import gzip
import re
import socket
import uuid
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
import structlog

from bridge.app import Bridge
from bridge.events import DeliveryRefused
from bridge.server import BodiesInFlight
from tests.support.harness import BridgeFactory, QueueFactory, drain
from tests.support.observing import scrape, status, value
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

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


async def bytes_in_flight(http: aiohttp.ClientSession, bridge: Bridge) -> int:
    intake = (await status(http, bridge))["intake"]
    assert intake["max_bytes_in_flight"] == BOUND["max_bytes_in_flight"]
    held: int = intake["bytes_in_flight"]
    return held


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
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_proxied_bridge(server=BOUND, amqp={"publish_timeout": 8.0}) as bridge:
        url = bridge.webhook_url
        broker_proxy.mute()  # confirms stop coming: the bodies stay held
        held = await held_by_a_silent_broker(http, url, broker_proxy, 40_000, 40_000)
        with structlog.testing.capture_logs() as logs:
            async with http.post(
                url, data=padded_event(40_000), headers={"Content-Type": "application/json"}
            ) as refused:
                refusal = (refused.status, refused.headers.get("Retry-After"), await refused.json())
        samples = await scrape(http, bridge.url + "/metrics")
        broker_proxy.release()
        answers = await asyncio.gather(*held)
        after = await post(http, url, padded_event(40_000))  # the bytes were given back
        left_held = await bytes_in_flight(http, bridge)

    assert refusal == (503, "5", {"status": "unavailable", "detail": "retry later"})
    [line] = [entry for entry in logs if entry["event"] == "webhook.refused"]
    assert re.fullmatch(  # two bodies of 40,000 bytes, and their header fields
        r"80[0-9]{3} bytes of requests in flight, \d+ more would pass "
        r"server.max_bytes_in_flight \(100000\)",
        line["reason"],
    )
    assert line["event_type"] is None  # refused as its body was read
    received_total = "konpro_bridge_events_received_total"
    assert value(samples, received_total, event_type="other", outcome="refused") == 1
    assert (answers, after, left_held) == ([200, 200], 200, 0)
    assert len(await drain(queue, expect=3)) == 3


async def test_a_slow_sender_holds_only_what_it_has_sent(
    start_proxied_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    """Or a few connections announcing large bodies and sending nothing more would keep
    KonPro's deliveries out."""
    async with start_proxied_bridge(server=BOUND, amqp={"publish_timeout": 8.0}) as bridge:
        url = bridge.webhook_url
        _, slow = await asyncio.open_connection("127.0.0.1", bridge.port)
        slow.write(
            b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 50000\r\n\r\n" + padded_event(1_000)  # and then nothing
        )
        await slow.drain()
        broker_proxy.mute()
        held = await held_by_a_silent_broker(http, url, broker_proxy, 40_000, 40_000)  # 81k
        sent = broker_proxy.sent_upstream
        unannounced = asyncio.create_task(post(http, url, chunked(padded_event(10_000))))  # 91k
        await eventually(lambda: broker_proxy.sent_upstream >= sent + 10_000)
        broker_proxy.release()
        answers = await asyncio.gather(*held, unannounced)
        while_slow = await bytes_in_flight(http, bridge)
        slow.close()

    assert answers == [200, 200, 200]
    # What the slow sender has sent: its header fields (Host, Content-Type, Content-Length: 52
    # bytes as received) and the body's first 1,000 bytes, and nothing else.
    assert while_slow == 52 + 1_000


async def test_a_compressed_body_counts_as_what_it_decompresses_to(
    start_proxied_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    async with start_proxied_bridge(server=BOUND, amqp={"publish_timeout": 8.0}) as bridge:
        url = bridge.webhook_url
        broker_proxy.mute()
        held = await held_by_a_silent_broker(http, url, broker_proxy, 40_000, 40_000)
        compressed = gzip.compress(padded_event(40_000))  # a few hundred bytes
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        async with http.post(url, data=compressed, headers=headers) as response:
            refused = response.status
        broker_proxy.release()
        answers = await asyncio.gather(*held)
        left_held = await bytes_in_flight(http, bridge)

    assert len(compressed) < 1_000
    assert (refused, answers, left_held) == (503, [200, 200], 0)


async def test_bodies_refused_for_what_they_are_are_not_held(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    server = {**BOUND, "body_timeout": 0.5}
    async with start_bridge(server=server) as bridge:
        url = bridge.webhook_url
        too_large = await post(http, url, chunked(padded_event(60_000)))
        not_an_event = await post(http, url, chunked(b'{"event_type": 1}'))
        answer, stalled = await asyncio.open_connection("127.0.0.1", bridge.port)
        stalled.write(  # a first kilobyte of a chunked body, then nothing
            b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n400\r\n" + b"x" * 1024 + b"\r\n"
        )
        await stalled.drain()
        async with asyncio.timeout(5):
            timed_out = await answer.readline()
        stalled.close()
        left_held = await bytes_in_flight(http, bridge)

    assert timed_out.startswith(b"HTTP/1.1 408")
    assert (too_large, not_an_event, left_held) == (413, 400, 0)


def stalled_request(fields: int) -> bytes:
    """A delivery with ``fields`` extra header fields of 8,007 bytes each (as received: name
    and value), whose body stops after its first 15 bytes."""
    padding = b"".join(b"X-Pad-%d: %s\r\n" % (n, b"a" * 8000) for n in range(fields))
    return (
        b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + padding
        + b'Content-Length: 100\r\n\r\n{"event_type": '
    )


async def test_header_fields_count_with_the_body_and_a_refused_request_is_soon_let_go(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """A request may carry 128 header fields of ``server.max_header_bytes``: a megabyte, twice
    that once parsed, held as long as its body takes. Before, they were counted nowhere, and a
    request refused before its body was read was still read on for ten seconds (aiohttp's
    lingering; one second now), its header fields held: 60 such requests whose bodies never
    came held 114 MiB of RSS while ``/status`` showed a few bytes in flight."""
    async with start_bridge(server=BOUND) as bridge:
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
            writer.write(stalled_request(5))
            held.append(writer)

        async def both_held() -> bool:
            return await bytes_in_flight(http, bridge) > 80_000

        await eventually(both_held)
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(stalled_request(5))
        async with asyncio.timeout(3):  # to the end: closed a second after the answer
            refused = await reader.read()
        in_flight = await bytes_in_flight(http, bridge)
        for stalled in [*held, writer]:
            stalled.close()

    assert refused.startswith(b"HTTP/1.1 503")
    assert in_flight == 2 * (5 * 8_007 + 50 + 15)  # two requests' header fields, first bytes


def _post_all_then_read(port: int, body: bytes) -> bytes:
    """Its body is read on and discarded for a second before the connection closes: closed at
    once with the body unread, the kernel reset it, and a client that sends its whole request
    before reading (most simple ones) got ECONNRESET instead of the 503 ``Retry-After``."""
    head = (
        f"POST /webhooks/konpro HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        return sock.recv(65536)


async def test_a_delivery_refused_503_mid_body_gets_its_answer_while_still_sending(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """``lingering_time=0`` (app.py): a delivery refused while its body is still arriving
    (``server.max_bytes_in_flight`` reached) is answered 503, and its connection is closed at
    once with the rest of the body unread: the kernel resets it, and a client still sending
    (any that sends its request before reading) gets ECONNRESET/EPIPE, never the 503
    ``Retry-After`` the README promises. aiohttp's lingering read let it finish sending.
    Expected: the client reads the 503."""
    body_limit = 16 * 1024 * 1024
    server = {
        "max_body_bytes": body_limit,
        "max_bytes_in_flight": body_limit + 16384,
        "body_timeout": 30.0,
    }
    async with start_bridge(server=server) as bridge:
        # A slow sender holds most of the room: 15 MiB of a 16 MiB body, then nothing.
        holder = socket.create_connection(("127.0.0.1", bridge.port))
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(
                None,
                holder.sendall,
                b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {body_limit}\r\n\r\n".encode()
                + b" " * (15 * 1024 * 1024),
            )

            async def room_held() -> bool:  # the bridge has read the 15 MiB
                held: int = (await status(http, bridge))["intake"]["bytes_in_flight"]
                return held >= 15 * 1024 * 1024

            await eventually(room_held)
            try:
                answer = await loop.run_in_executor(
                    None, _post_all_then_read, bridge.port, b" " * (body_limit - 100)
                )
            except OSError as exc:
                pytest.fail(f"the client lost the bridge's answer: {exc!r}")
            assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
        finally:
            holder.close()


def test_the_bytes_in_flight_may_reach_the_bound_and_not_pass_it() -> None:
    """``server.max_bytes_in_flight`` is a bound: what would pass it is refused (503), what
    reaches it exactly is taken; what is given back may be taken again."""
    bodies = BodiesInFlight(10_000)
    bodies.take(6_000)
    bodies.take(4_000)  # exactly the bound
    with pytest.raises(DeliveryRefused, match=r"10000 bytes of requests in flight, 1 more"):
        bodies.take(1)
    bodies.give_back(4_000)
    bodies.take(4_000)
    assert bodies.held == 10_000
