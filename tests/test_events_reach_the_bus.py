"""Every accepted delivery is on the bus, byte for byte, routed by its event type."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid

import aio_pika
import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractChannel
from hypothesis import given
from hypothesis import strategies as st
from pamqp import commands, frame
from pamqp.header import ContentHeader

from bridge.app import Bridge
from bridge.contract import ContractProperties
from bridge.events import (
    EVENT_ID_HEADER,
    EVENT_TYPE_MAX_LENGTH,
    FORWARDED_HEADERS,
    MAX_EVENT_ID_BYTES,
    MAX_FORWARDED_HEADER_BYTES,
    Delivery,
    body_digest,
    publishable,
)
from tests.support.deliveries import JSON, envelope, post_status
from tests.support.harness import BridgeFactory, QueueFactory, drain
from tests.support.private_broker import PrivateBroker
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

SEED_EVENTS = {
    "avatar_video.success": {
        "video_id": "v1",
        "url": "https://resource.example/video/v1/1280x720.mp4",
        "gif_download_url": None,
        "video_share_page_url": None,
        "folder_id": "",
        "callback_id": None,
    },
    "avatar_video.fail": {"video_id": "v2", "msg": "render failed", "callback_id": "c2"},
    "avatar_video_gif.success": {"video_id": "v3", "url": "https://r.example/v3.gif"},
    "avatar_video_gif.fail": {"video_id": "v4", "msg": "gif failed", "callback_id": None},
    "video_translate.success": {
        "video_translate_id": "t1",
        "url": "https://r.example/t1.mp4",
        "callback_id": None,
        "output_language": "de",
    },
    "video_translate.fail": {
        "video_translate_id": "t2",
        "message": "unsupported",
        "callback_id": None,
        "output_language": "fr",
    },
    "personalized_video": {
        "project_id": "p1",
        "video_id": "v5",
        "video_url": "https://r.example/v5.mp4",
        "landing_page_url": "https://r.example/l",
        "gif_url": None,
        "gif_html": None,
        "contact_info": {"email": "a@example.com"},
    },
}


def event_body(event_type: str, **event_data: object) -> bytes:
    data = event_data or SEED_EVENTS.get(event_type, {"id": "x"})
    return orjson.dumps({"event_type": event_type, "event_data": data})


async def post(
    http: aiohttp.ClientSession,
    bridge: Bridge,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, object]]:
    url = bridge.webhook_url
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(url, data=body, headers=all_headers) as response:
        return response.status, await response.json(content_type=None)


@pytest.mark.parametrize("event_type", sorted(SEED_EVENTS))
async def test_each_seed_event_lands_in_a_queue_bound_to_its_type_unchanged(
    event_type: str,
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue(event_type)
    # Deliberately odd spacing: the bridge must forward the bytes, not a re-serialisation.
    body = b'{"event_type":  "%s", "event_data": %s }' % (
        event_type.encode(),
        orjson.dumps(SEED_EVENTS[event_type]),
    )
    headers = {"KonPro-Event-Id": f"evt-{event_type}", "KonPro-Timestamp": str(int(time.time()))}
    async with start_bridge() as bridge:
        before = time.time()
        status, answer = await post(http, bridge, body, headers)

    assert (status, answer["status"], answer["outcome"]) == (200, "accepted", "published")
    assert answer["message_id"] == f"evt-{event_type}"
    [message] = await drain(queue, expect=1)
    assert message.body == body
    assert message.routing_key == event_type
    assert message.type == event_type
    assert message.message_id == f"evt-{event_type}"
    assert message.delivery_mode == 2
    assert message.content_type == "application/json"
    assert message.app_id == "konpro-bridge"
    assert message.timestamp is not None
    assert message.timestamp.timestamp() >= int(before)
    assert message.headers == headers


@pytest.mark.parametrize("header", ["KonPro-Signature", "Signature"])
async def test_the_signature_travels_with_the_message_under_either_name(
    header: str, start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    # Consumers may check it again themselves; the other request headers stay behind.
    queue = await bind_queue("#")
    body = event_body("avatar_video.success", video_id="signed")
    headers = {header: "ab" * 32, "X-Forwarded-For": "10.0.0.1", "KonPro-Event-Id": "e-sig"}
    async with start_bridge() as bridge:  # no secret: the signature is carried, not checked
        assert (await post(http, bridge, body, headers))[0] == 200

    [message] = await drain(queue, expect=1)
    assert message.headers == {header: "ab" * 32, "KonPro-Event-Id": "e-sig"}


_short_strings = st.text(min_size=1).filter(lambda text: len(text.encode()) <= 255)


@given(
    event_type=_short_strings,
    message_id=_short_strings,
    headers=st.dictionaries(st.sampled_from(["KonPro-Event-Id", "KonPro-Timestamp"]), st.text()),
    received_at=st.floats(min_value=0, max_value=4e9),
)
def test_the_contract_properties_marshal_to_the_same_bytes_as_pamqps_own_encoding(
    event_type: str, message_id: str, headers: dict[str, str], received_at: float
) -> None:
    delivery = Delivery(event_type, b"{}", message_id, headers, received_at)
    properties = ContractProperties(delivery)

    assert properties.marshal() == commands.Basic.Properties.marshal(properties)


def test_contract_properties_changed_after_construction_are_marshalled_as_changed() -> None:
    properties = ContractProperties(Delivery("avatar_video.success", b"{}", "evt-1"))
    properties.priority = 5
    properties.app_id = "someone-else"

    decoded = commands.Basic.Properties()
    data = properties.marshal()
    decoded.unmarshal(int.from_bytes(data[:2]), data[2:])
    assert (decoded.priority, decoded.app_id) == (5, "someone-else")


def test_the_largest_properties_fit_the_smallest_frame_a_broker_may_set() -> None:
    # AMQP lets a broker set frame_max as low as 4096 bytes; the properties go in one frame,
    # and a frame over the limit costs the connection. Each bound at its maximum, in UTF-8:
    headers = dict.fromkeys(FORWARDED_HEADERS, "é" * (MAX_FORWARDED_HEADER_BYTES // 2))
    headers[EVENT_ID_HEADER] = event_id = "é" * (MAX_EVENT_ID_BYTES // 2)
    delivery = Delivery("a" * EVENT_TYPE_MAX_LENGTH, b"{}", event_id, headers)

    content_header = ContentHeader(0, 2**63, ContractProperties(delivery))

    assert len(frame.marshal(content_header, 65535)) <= 4096


async def test_message_id_is_the_body_digest_when_konpro_sends_no_event_id(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    body = event_body("avatar_video.success")
    async with start_bridge() as bridge:
        status, answer = await post(http, bridge, body)

    assert status == 200
    [message] = await drain(queue, expect=1)
    assert message.message_id == answer["message_id"] == hashlib.sha256(body).hexdigest()


async def test_a_fail_binding_receives_only_fail_events(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    failures = await bind_queue("*.fail")
    async with start_bridge() as bridge:
        for event_type in SEED_EVENTS:
            assert (await post(http, bridge, event_body(event_type)))[0] == 200

    received = await drain(failures, expect=3)
    assert sorted(m.routing_key for m in received) == [
        "avatar_video.fail",
        "avatar_video_gif.fail",
        "video_translate.fail",
    ]


async def test_routes_send_matching_event_types_to_their_own_exchange(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
    exchange_name: str,
) -> None:
    other = f"{exchange_name}.other"
    main_queue = await bind_queue("#")
    routed_queue = await bind_queue("#", exchange=other)
    # The first route that matches wins: video_translate.fail goes to `other`, not `main`.
    routes = [
        {"match": "video_translate.*", "exchange": other},
        {"match": "*.fail", "exchange": exchange_name},
    ]
    async with start_bridge(amqp={"routes": routes}) as bridge:
        for event_type in ("video_translate.success", "video_translate.fail", "avatar_video.fail"):
            assert (await post(http, bridge, event_body(event_type)))[0] == 200

    assert [m.routing_key for m in await drain(main_queue, expect=1)] == ["avatar_video.fail"]
    assert sorted(m.routing_key for m in await drain(routed_queue, expect=2)) == [
        "video_translate.fail",
        "video_translate.success",
    ]


async def test_a_spooled_event_carries_the_time_it_was_received_not_forwarded(
    start_bridge_cut_off: BridgeFactory,
    bind_queue: QueueFactory,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_bridge_cut_off() as bridge:
        received = time.time()
        status, _ = await post(http, bridge, event_body("avatar_video.success", video_id="late"))
        assert status == 202
        await asyncio.sleep(3)  # the broker comes back seconds later
        await broker_proxy.restore()
        [message] = await drain(queue, expect=1, within=15)

    assert message.timestamp is not None
    assert message.timestamp.timestamp() <= received + 1  # AMQP timestamps are whole seconds


async def test_an_event_no_queue_is_bound_for_is_kept_in_the_unrouted_queue(
    start_bridge: BridgeFactory,
    channel: AbstractChannel,
    http: aiohttp.ClientSession,
    exchange_name: str,
) -> None:
    body = event_body("instant_avatar.success", avatar_id="a1")
    async with start_bridge() as bridge:
        status, _ = await post(http, bridge, body)
        assert status == 200

    unrouted = await channel.declare_queue(f"{exchange_name}.unrouted", passive=True)
    [message] = await drain(unrouted, expect=1)
    assert message.body == body
    assert message.routing_key == "instant_avatar.success"
    # Kept across a broker restart: a durable queue fed by a fanout (a declaration with other
    # arguments than the existing ones would close the channel with PRECONDITION_FAILED).
    await channel.declare_queue(f"{exchange_name}.unrouted", durable=True)
    await channel.declare_exchange(
        f"{exchange_name}.unrouted", aio_pika.ExchangeType.FANOUT, durable=True
    )


async def test_a_broker_user_allowed_only_the_bridges_own_names_is_enough(
    start_bridge: BridgeFactory,
    private_broker: PrivateBroker,
    exchange_name: str,
    http: aiohttp.ClientSession,
) -> None:
    # What the README tells a platform team to grant: configure, write and read on
    # <exchange> and <exchange>.unrouted, nothing else.
    url = user_for_own_names(private_broker, exchange_name)
    async with start_bridge(amqp={"url": url}) as bridge:
        status, answer = await post(http, bridge, event_body("avatar_video.fail"))
    assert (status, answer["outcome"]) == (200, "published")


async def test_a_broker_user_without_a_permission_it_needs_is_named_in_readiness(
    start_bridge: BridgeFactory, private_broker: PrivateBroker, exchange_name: str
) -> None:
    url = user_for_own_names(private_broker, exchange_name, read="^$")
    async with start_bridge(amqp={"url": url}, wait_ready=False) as bridge:
        await eventually(lambda: "ACCESS_REFUSED" in (bridge.publisher.not_ready_reason() or ""))
        reason = bridge.publisher.not_ready_reason() or ""
    assert reason.startswith("cannot connect to the broker: ACCESS_REFUSED - access to exchange")


def user_for_own_names(broker: PrivateBroker, exchange: str, *, read: str | None = None) -> str:
    """A user with every permission on ``exchange`` and ``<exchange>.unrouted`` alone (``read``
    narrowed if given); its AMQP URL."""
    own_names = rf"^{re.escape(exchange)}(\.unrouted)?$"
    name = f"bridge-{uuid.uuid4().hex[:6]}"
    return broker.add_user(
        name, "pw", configure=own_names, write=own_names, read=own_names if read is None else read
    )


async def test_many_deliveries_in_flight_at_once_are_all_confirmed_and_stored(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    bodies = [event_body("avatar_video.success", video_id=f"v{i}") for i in range(300)]
    async with start_bridge() as bridge:
        answers = await asyncio.gather(*(post(http, bridge, body) for body in bodies))

    assert {status for status, _ in answers} == {200}
    stored = await drain(queue, expect=len(bodies))
    assert sorted(m.body for m in stored) == sorted(bodies)


def test_a_spooled_message_id_of_255_bytes_is_kept_and_one_of_256_replaced() -> None:
    """An AMQP message id is a short string: at most 255 bytes. A spooled event whose id is
    one byte longer would fail at every try and hold up the events behind it."""
    fits = Delivery("avatar_video.success", b"{}", "é" * 127 + "e", {})  # 255 bytes
    too_long = Delivery("avatar_video.success", b"{}", "é" * 128, {})  # 256 bytes

    assert publishable(fits) == (fits, [])
    adjusted, changes = publishable(too_long)
    assert adjusted.message_id == body_digest(b"{}")
    assert changes == ["message id longer than AMQP's 255 bytes: the body's digest instead"]


async def test_an_empty_event_id_header_gives_the_body_digest_as_the_message_id(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    """An empty ``KonPro-Event-Id`` is no event id: consumers drop repeats by message id, so
    two events published under the same empty id could be taken for one, and the second lost."""
    queue = await bind_queue("#")
    first, second = envelope("v_empty_id_1"), envelope("v_empty_id_2")
    async with start_bridge() as bridge:
        for body in (first, second):
            headers = {**JSON, "KonPro-Event-Id": ""}
            assert await post_status(http, bridge.webhook_url, body, headers) == 200
    messages = await drain(queue, expect=2)
    assert [m.message_id for m in messages] == [body_digest(first), body_digest(second)]


@pytest.mark.parametrize("headers", [{}, {"Content-Type": "application/octet-stream"}], ids=str)
async def test_a_delivery_without_a_json_content_type_header_is_taken(
    headers: dict[str, str],
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    """A delivery with no Content-Type (aiohttp reads it as ``application/octet-stream``) is
    taken: a proxy or client that drops the header must not cost the events (415 for ever)."""
    queue = await bind_queue("#")
    body = envelope("v_untyped")
    async with start_bridge() as bridge:
        # skip_auto_headers: aiohttp would otherwise add its own octet-stream for bytes.
        post = http.post(
            bridge.webhook_url, data=body, headers=headers, skip_auto_headers={"Content-Type"}
        )
        async with post as response:
            status = response.status
    assert status == 200
    assert [m.body for m in await drain(queue, expect=1)] == [body]
