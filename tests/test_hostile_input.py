"""Whatever arrives, the answer is 2xx or 4xx, the process stays healthy, and nothing invalid or
unsigned reaches the bus."""

from __future__ import annotations

import asyncio
import gzip
import time

import aiohttp
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.app import Bridge
from bridge.events import InvalidEvent, parse_event_type
from bridge.signatures import sign
from tests.support import raw_http
from tests.support.harness import BridgeFactory, QueueFactory, drain

SECRET = "whsec_property_based"
VALID_BODY = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'
# Printable ASCII and, sent as UTF-8, Latin and IPA letters of two bytes each: long enough that
# an event id of at most 200 characters can still be over 255 bytes.
HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x2AF, exclude_categories=["Cc"]),
    max_size=150,
)
EVENT_TYPES = st.one_of(
    st.sampled_from(["avatar_video.success", "video_translate.fail", "personalized_video"]),
    st.from_regex(r"[A-Za-z0-9_-]{1,12}(\.[A-Za-z0-9_-]{1,12}){0,3}", fullmatch=True),
    st.text(max_size=300),
    st.integers(-(2**63), 2**63 - 1),
    st.none(),
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
ENVELOPES = st.fixed_dictionaries(
    {"event_type": EVENT_TYPES, "event_data": JSON_VALUES},
    optional={"extra": JSON_VALUES},
).map(orjson.dumps)
VALID_ENVELOPES = st.fixed_dictionaries(
    {
        "event_type": EVENT_TYPES.filter(lambda t: isinstance(t, str) and t.isascii() and "." in t),
        "event_data": st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5),
    },
).map(orjson.dumps)
BODIES = st.one_of(
    VALID_ENVELOPES, ENVELOPES, st.binary(max_size=600), JSON_VALUES.map(orjson.dumps)
)


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    body = draw(BODIES)
    headers = {
        "Content-Type": draw(
            st.sampled_from(
                [
                    "application/json",
                    "application/json; charset=utf-8",
                    "text/plain",
                    "application/xml",
                    "application/vnd.konpro+json",
                    "multipart/form-data; boundary=x",
                ]
            )
        )
    }
    signature = draw(st.sampled_from(["valid", "valid", "valid", "absent", "garbage", "other"]))
    if signature == "valid":
        headers[draw(st.sampled_from(["KonPro-Signature", "Signature"]))] = sign(body, SECRET)
    elif signature == "garbage":
        headers["KonPro-Signature"] = draw(HEADER_TEXT)
    elif signature == "other":
        headers["Signature"] = sign(body + b" ", SECRET)
    if draw(st.booleans()):
        headers["KonPro-Timestamp"] = draw(
            st.one_of(st.just(str(int(time.time()))), HEADER_TEXT, st.integers().map(str))
        )
    if draw(st.booleans()):
        headers["KonPro-Event-Id"] = draw(HEADER_TEXT)
    for name in draw(st.lists(st.sampled_from(["X-Odd", "Accept", "User-Agent"]), max_size=3)):
        headers[name] = draw(HEADER_TEXT)
    return body, headers


def is_valid_envelope(body: bytes) -> bool:
    try:
        parse_event_type(body)
    except InvalidEvent:
        return False
    return True


async def test_thousands_of_generated_deliveries_get_2xx_or_4xx_and_only_valid_ones_are_published(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
    exchange_name: str,
) -> None:
    queue = await bind_queue("#")
    published: list[bytes] = []
    async with start_bridge(konpro={"webhook_secret": SECRET}) as bridge:
        url = bridge.webhook_url

        @settings(
            max_examples=2000,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(deliveries())
        def check(delivery: tuple[bytes, dict[str, str]]) -> None:
            body, headers = delivery
            status, answer = asyncio.run_coroutine_threadsafe(
                send(http, url, body, headers), loop
            ).result(timeout=30)
            assert 200 <= status < 300 or 400 <= status < 500, (status, answer)
            if status < 300:
                assert is_valid_envelope(body)
                assert any(
                    headers.get(h) == sign(body, SECRET) for h in ("KonPro-Signature", "Signature")
                )
                if answer.get("outcome") in {"published", "spooled"}:
                    published.append(body)

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(check)
        await assert_healthy(http, bridge)

    assert len(published) > 50, "the generator should also produce deliveries worth publishing"
    received = await drain(queue, expect=len(published), within=30)
    assert sorted(m.body for m in received) == sorted(published)


RAW_HEADER_NAMES = [
    "Content-Type", "Content-Encoding", "Transfer-Encoding", "Expect", "Host",
    "KonPro-Event-Id", "KonPro-Timestamp", "KonPro-Signature", "Signature", "X-Odd",
]  # fmt: skip
RAW_VALUES = st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """What no client library sends: any bytes in the header values, any method and path."""
    method = draw(st.sampled_from([b"POST", b"GET", b"OPTIONS", b"PUT", b"FOO"]))
    path = draw(st.sampled_from([b"/webhooks/konpro", b"/readyz", b"/status", b"/%ff", b"/x"]))
    headers = b"".join(
        name.encode() + b": " + value + b"\r\n"
        for name, value in draw(
            st.lists(st.tuples(st.sampled_from(RAW_HEADER_NAMES), RAW_VALUES), max_size=4)
        )
    )
    body = draw(st.sampled_from([VALID_BODY, gzip.compress(VALID_BODY), b"\x1f\x8b garbage", b""]))
    return (
        b"%s %s HTTP/1.1\r\nHost: bridge\r\n%sContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (method, path, headers, len(body), body)
    )


async def test_requests_of_arbitrary_bytes_never_get_a_500(start_bridge: BridgeFactory) -> None:
    # Each class of 500 this found once (an undecodable Expect, KonPro-Timestamp or gzip body)
    # has a test of its own in test_bad_input_is_refused.py.
    async with start_bridge() as bridge:

        @settings(max_examples=500, deadline=None, derandomize=True)
        @given(raw_requests())
        def check(request: bytes) -> None:
            answer = asyncio.run_coroutine_threadsafe(
                raw_http.exchange(bridge.port, request), loop
            ).result(timeout=30)
            status_line = answer.split(b"\r\n", 1)[0]
            assert status_line.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), answer[:200]
            assert b" 500 " not in status_line, (request, answer[:300])

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(check)


async def send(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str]]:
    async with http.post(url, data=body, headers=headers) as response:
        answer = await response.read()
        return response.status, orjson.loads(answer) if answer.startswith(b"{") else {}


async def assert_healthy(http: aiohttp.ClientSession, bridge: Bridge) -> None:
    for path in ("/healthz", "/readyz"):
        async with http.get(bridge.url + path) as response:
            assert response.status == 200


async def test_a_client_that_stalls_mid_body_gets_408_and_frees_its_connection(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    async with start_bridge(server={"body_timeout": 0.5}) as bridge:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(
            b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"event_type": '
        )
        await writer.drain()
        async with asyncio.timeout(5):
            status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 408")
        await assert_healthy(http, bridge)


async def test_a_client_that_never_finishes_its_headers_is_disconnected(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    async with start_bridge(server={"keepalive_timeout": 0.5}) as bridge:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\n")
        await writer.drain()
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed by the server
        writer.close()
        await assert_healthy(http, bridge)


async def test_the_header_limit_and_the_webhook_path_are_the_ones_configured(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    server = {"max_header_bytes": 16_384, "webhook_path": "/hooks/konpro"}
    async with start_bridge(server=server) as bridge:
        answers = []
        for size in (12_000, 20_000):  # over the default 8,190; under, then over the setting
            headers = {"Content-Type": "application/json", "X-Big": "x" * size}
            async with http.post(bridge.webhook_url, data=VALID_BODY, headers=headers) as r:
                answers.append(r.status)
        async with http.post(bridge.url + "/webhooks/konpro", data=VALID_BODY) as default_path:
            answers.append(default_path.status)
        assert bridge.webhook_url.endswith("/hooks/konpro")

    assert answers[0] == 200
    assert 400 <= answers[1] < 500
    assert answers[2] == 405


async def test_oversized_headers_are_refused_with_a_4xx(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    async with start_bridge() as bridge:
        url = bridge.webhook_url
        headers = {"Content-Type": "application/json", "X-Huge": "x" * 20_000}
        async with http.post(url, data=b"{}", headers=headers) as response:
            assert 400 <= response.status < 500
        await assert_healthy(http, bridge)
