"""Input that is not a KonPro event gets a clear 4xx and a log line, and never reaches the bus."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import structlog
from aio_pika.abc import AbstractChannel
from structlog.testing import capture_logs

from bridge.app import Bridge
from bridge.events import InvalidEvent, parse_event_type
from bridge.signatures import sign
from tests.support import raw_http
from tests.support.deliveries import JSON, envelope, post_status
from tests.support.harness import BridgeFactory, QueueFactory, drain, process_sections
from tests.support.observing import scrape, seen, value
from tests.support.process import BridgeProcess
from tests.support.waiting import eventually

SECRET = "whsec_configured_1f2e"
VALID = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'

BAD_BODIES = {
    "empty body": b"",
    "not json": b"event_type=avatar_video.success",
    "truncated json": VALID[:-3],
    "json array": b'[{"event_type": "avatar_video.success", "event_data": {}}]',
    "json string": b'"avatar_video.success"',
    "missing event_type": b'{"event_data": {}}',
    "numeric event_type": b'{"event_type": 7, "event_data": {}}',
    "empty event_type": b'{"event_type": "", "event_data": {}}',
    "double dot": b'{"event_type": "avatar_video..success", "event_data": {}}',
    "leading dot": b'{"event_type": ".success", "event_data": {}}',
    "trailing dot": b'{"event_type": "avatar_video.", "event_data": {}}',
    "space in type": b'{"event_type": "avatar video.success", "event_data": {}}',
    "routing wildcard": b'{"event_type": "avatar_video.#", "event_data": {}}',
    "non-ascii type": '{"event_type": "vidéo.success", "event_data": {}}'.encode(),
    "type of 256 chars": json.dumps({"event_type": "a" * 256, "event_data": {}}).encode(),
    "missing event_data": b'{"event_type": "avatar_video.success"}',
    "event_data array": b'{"event_type": "avatar_video.success", "event_data": []}',
    "event_data null": b'{"event_type": "avatar_video.success", "event_data": null}',
    "invalid utf-8": b'{"event_type": "avatar_video.success", "event_data": {"x": "\xff\xfe"}}',
    # Not JSON, although a lenient parser would take them.
    "NaN": b'{"event_type": "avatar_video.success", "event_data": {"x": NaN}}',
    "Infinity": b'{"event_type": "avatar_video.success", "event_data": {"x": -Infinity}}',
    "byte-order mark": b"\xef\xbb\xbf" + VALID,
    "deeply nested": b'{"event_type": "a.b", "event_data": '
    + b'{"x": ' * 2000
    + b"1"
    + b"}" * 2001,
    # The bridge routes by the last of two keys, a consumer's parser may read the first.
    "event_type twice": b'{"event_type": "a.fail", "event_type": "a.success", "event_data": {}}',
    "event_type twice, escaped": b'{"event_type": "a.fail", "event\\u005ftype": "a.success", '
    b'"event_data": {}}',
    "event_data twice": b'{"event_type": "a.b", "event_data": {}, "event_data": {"x": 1}}',
    "nested 1000 deep, escaped": b'{"event_type": "a.b", "x": "\\u00e9", "event_data": '
    + b'{"x": ' * 1000
    + b"1"
    + b"}" * 1001,
}


async def test_every_malformed_envelope_is_answered_400_naming_the_problem(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    channel: AbstractChannel,
    http: aiohttp.ClientSession,
    exchange_name: str,
) -> None:
    queue = await bind_queue("#")
    answers = {}
    async with start_bridge() as bridge:
        url = bridge.webhook_url
        with structlog.testing.capture_logs() as logs:
            for name, body in BAD_BODIES.items():
                headers = {"Content-Type": "application/json"}
                async with http.post(url, data=body, headers=headers) as response:
                    answers[name] = (response.status, await response.json())

    assert {name: status for name, (status, _) in answers.items()} == dict.fromkeys(BAD_BODIES, 400)
    assert {answer["error"] for _, answer in answers.values()} == {"invalid_event"}
    assert "event_type" in answers["double dot"][1]["detail"]
    assert "event_data" in answers["event_data array"][1]["detail"]
    assert "JSON" in answers["not json"][1]["detail"]
    assert "names event_type more than once" in answers["event_type twice, escaped"][1]["detail"]
    rejected = [line for line in logs if line["event"] == "webhook.rejected"]
    assert len(rejected) == len(BAD_BODIES)
    assert await drain(queue, expect=0) == []
    unrouted = await channel.declare_queue(f"{exchange_name}.unrouted", passive=True)
    assert await drain(unrouted, expect=0) == []


async def test_what_the_json_grammar_allows_inside_event_data_is_forwarded_unchanged(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    """Only the envelope is the bridge's business; ``event_data`` is the consumers' to read.
    Refused, an event is retried by KonPro for a day, then dropped. So keys repeated inside it,
    escapes (``\\u00e9``, how many JSON writers send text that is not ASCII), an unpaired
    surrogate (a title cut in the middle of an emoji, as ``JSON.stringify`` writes it) and a
    number beyond a double's range all pass, although orjson refuses the last two."""
    queue = await bind_queue("#")
    bodies = [
        b'{"event_type": "a.b", "event_data": {"event_type": 1, "event_type": 2}}',
        b'{"event_type": "a.b", "event_data": {"caption": "caf\\u00e9"}}',
        b'{"event_type": "a.b", "event_data": {"msg": "Failed: \\u201cMy \\ud83d\\u201d"}}',
        b'{"event_type": "a.b", "event_data": {"credits": 1e400, "n": 12345678901234567890123}}',
    ]
    async with start_bridge() as bridge:
        for body in bodies:
            headers = {"Content-Type": "application/json"}
            async with http.post(bridge.webhook_url, data=body, headers=headers) as response:
                assert response.status == 200
    assert [message.body for message in await drain(queue, expect=len(bodies))] == bodies


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_body_that_does_not_claim_to_be_json_is_answered_415(
    content_type: str,
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        url = bridge.webhook_url
        async with http.post(url, data=VALID, headers={"Content-Type": content_type}) as response:
            assert response.status == 415
            assert (await response.json())["error"] == "unsupported_media_type"
    assert await drain(queue, expect=0) == []


async def test_json_variants_of_the_content_type_are_accepted(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        url = bridge.webhook_url
        variants = ("application/json; charset=utf-8", "application/cloudevents+json")
        for n, content_type in enumerate(variants):
            body = VALID.replace(b'"v1"', b'"v%d"' % n)  # two events, not one replayed
            async with http.post(url, data=body, headers={"Content-Type": content_type}) as resp:
                assert resp.status == 200
    assert len(await drain(queue, expect=2)) == 2


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_answered_413(
    chunked: bool,
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    padding = b" " * 5000
    body = VALID[:-1] + padding + b"}"

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    async with start_bridge(server={"max_body_bytes": 4096}) as bridge:
        url = bridge.webhook_url
        data = chunks() if chunked else body
        headers = {"Content-Type": "application/json"}
        async with http.post(url, data=data, headers=headers) as response:
            assert response.status == 413
            assert (await response.json())["error"] == "body_too_large"
        # The server is still healthy and accepts a delivery under the limit.
        async with http.post(url, data=VALID, headers=headers) as response:
            assert response.status == 200
    assert len(await drain(queue, expect=1)) == 1


@pytest.mark.parametrize(
    "event_id",
    ["e" * 201, "é" * 101],
    # An AMQP message id holds 255 bytes: 200 printable characters could be 800 (a 500, once).
    ids=["201 characters", "202 bytes in UTF-8"],
)
async def test_an_unusable_event_id_header_is_answered_400(
    event_id: str,
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        url = bridge.webhook_url
        headers = {"Content-Type": "application/json", "KonPro-Event-Id": event_id}
        async with http.post(url, data=VALID, headers=headers) as response:
            assert response.status == 400
            assert "KonPro-Event-Id" in (await response.json())["detail"]
    assert await drain(queue, expect=0) == []


@pytest.mark.parametrize(
    "header",
    [b"KonPro-Timestamp: \xff\xfe", b"KonPro-Signature: \xff", b"Signature: caf\xc3"],
    ids=["KonPro-Timestamp", "KonPro-Signature", "Signature"],
)
async def test_a_konpro_header_that_is_not_printable_text_is_answered_400(
    header: bytes, start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    # Invalid UTF-8, sent raw: a client library would not send it. Without a webhook secret
    # nothing else checks these headers, yet they are forwarded to the bus, where they must be
    # text (a 500 once, from the AMQP encoder). aiohttp's parser refuses control characters.
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        answer = await raw_post(bridge, header, VALID)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(body)["error"] == "invalid_event"
    assert header.split(b":")[0].decode() in json.loads(body)["detail"]
    assert await drain(queue, expect=0) == []


@pytest.mark.parametrize("name", ["KonPro-Timestamp", "KonPro-Signature", "Signature"])
async def test_a_konpro_header_over_512_bytes_is_answered_400(
    name: str, start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    # Forwarded to the bus, where all of a message's headers go in one AMQP frame: one that
    # passed the broker's frame size would cost the connection, at each try (poisoning the
    # spool), so the headers are bounded to fit the smallest frame a broker may set (4 KiB).
    queue = await bind_queue("#")
    async with start_bridge(server={"max_header_bytes": 65536}) as bridge:
        headers = {"Content-Type": "application/json", name: "1" * 513}
        async with http.post(bridge.webhook_url, data=VALID, headers=headers) as response:
            assert response.status == 400
            assert (await response.json())["detail"] == (
                f"{name} must be printable UTF-8 text of at most 512 bytes"
            )
    assert await drain(queue, expect=0) == []


async def test_konpro_headers_of_512_bytes_each_reach_the_bus_with_the_event(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    largest = dict.fromkeys(("KonPro-Timestamp", "KonPro-Signature", "Signature"), "é" * 256)
    async with start_bridge() as bridge:
        headers = {"Content-Type": "application/json", **largest}
        async with http.post(bridge.webhook_url, data=VALID, headers=headers) as response:
            assert response.status == 200
    [message] = await drain(queue, expect=1)
    assert message.headers == largest


def webhook_path(bridge: Bridge | BridgeProcess) -> bytes:
    return urlsplit(bridge.webhook_url).path.encode()


async def raw_post(
    bridge: Bridge | BridgeProcess,
    header: bytes,
    body: bytes,
    *,
    path: str | None = None,
    version: bytes = b"1.1",
) -> bytes:
    """POST with ``header`` as given, bytes no client library would send; the whole answer."""
    target = path.encode() if path is not None else webhook_path(bridge)
    head = (
        b"POST %s HTTP/%s\r\nHost: bridge\r\nContent-Type: application/json\r\n%s\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (target, version, header, len(body))
    )
    return await raw_http.exchange(bridge.port, head + body)


@pytest.mark.parametrize("expect", [b"\xb0\xff", b"something-else"], ids=["invalid UTF-8", "other"])
async def test_an_expectation_other_than_100_continue_is_answered_417(
    expect: bytes, start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    # aiohttp's own handler quotes the header in its 417, and invalid UTF-8 made that a 500.
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        answer = await raw_post(bridge, b"Expect: " + expect, VALID)
        # Where no route takes the request, aiohttp's 405 would have used its own handler.
        unrouted = await raw_post(bridge, b"Expect: " + expect, VALID, path="/readyz")
        assert unrouted.startswith(b"HTTP/1.1 417"), unrouted
        async with aiohttp.ClientSession() as http:
            headers = {"Expect": "x" * 10}
            async with http.get(bridge.url + "/readyz", headers=headers) as response:
                assert response.status == 417
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417"), answer
    assert json.loads(body)["error"] == "expectation_failed"
    assert await drain(queue, expect=0) == []


async def head_of_answer_to_expectation(bridge: Bridge, expectation: bytes, length: int) -> bytes:
    """POST headers with ``Expect: <expectation>`` and no body; the answer's head. The connection
    is left open by the client, as one waiting for ``100 Continue`` does."""
    return await raw_http.answer_head(
        bridge.port,
        b"POST %s HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        b"Expect: %s\r\nContent-Length: %d\r\n\r\n" % (webhook_path(bridge), expectation, length),
    )


# A refused expectation leaves aiohttp waiting (up to 10 s) for a body that will not come; the
# bridge's stop waits for it in turn, for the grace period: short here.
SMALL_BODIES = {"max_body_bytes": 4096, "shutdown_timeout": 0.2}


async def test_expect_100_continue_refuses_a_body_over_the_limit_before_it_is_sent(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """Counted and logged as a delivery refused 413 after its body was sent: before, only an
    ``http.expect_refused`` line said so, and no metric."""
    async with start_bridge(server=SMALL_BODIES) as bridge:
        with structlog.testing.capture_logs() as logs:
            head = await head_of_answer_to_expectation(bridge, b"100-continue", 5000)
        samples = await scrape(http, bridge.url + "/metrics")
    assert head.startswith(b"HTTP/1.1 413"), head  # not "100 Continue"
    [line] = [entry for entry in logs if entry["event"] == "webhook.rejected"]
    assert (line["status"], line["error"]) == (413, "body_too_large")
    received = "konpro_bridge_events_received_total"
    assert value(samples, received, event_type="other", outcome="invalid") == 1


async def test_a_refused_expectation_closes_the_connection_instead_of_waiting_for_the_body(
    start_bridge: BridgeFactory,
) -> None:
    """Kept open, a client would send its next request on it, and that would be read as the
    body of this one."""
    async with start_bridge(server=SMALL_BODIES) as bridge:
        too_large = await head_of_answer_to_expectation(bridge, b"100-continue", 5000)
        unknown = await head_of_answer_to_expectation(bridge, b"something-else", 100)
    for head in (too_large, unknown):
        assert b"\r\nConnection: close\r\n" in head, head


async def test_expect_100_continue_gets_the_body_sent_and_the_event_published(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        headers = {"Content-Type": "application/json"}
        async with http.post(
            bridge.webhook_url, data=VALID, headers=headers, expect100=True
        ) as response:
            assert response.status == 200
        another = VALID.replace(b'"v1"', b'"v2"')  # a second event, not the first replayed
        answer = await raw_post(bridge, b"Expect: 100-continue", another)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), answer
    assert len(await drain(queue, expect=2)) == 2


async def test_an_event_id_of_200_bytes_in_utf_8_is_the_message_id_unchanged(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    event_id = "é" * 100
    async with start_bridge() as bridge:
        headers = {"Content-Type": "application/json", "KonPro-Event-Id": event_id}
        async with http.post(bridge.webhook_url, data=VALID, headers=headers) as response:
            assert response.status == 200
    [message] = await drain(queue, expect=1)
    assert message.message_id == event_id


async def test_a_delivery_to_another_path_is_refused_with_a_warning_naming_it(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    # A public_url with a trailing slash, say: KonPro's OPTIONS check passes on every path.
    async with start_bridge() as bridge:
        with structlog.testing.capture_logs() as logs:
            async with http.post(bridge.webhook_url + "/", data=VALID) as response:
                status = response.status

            async with http.get(bridge.url + "/favicon.ico") as scanner:
                assert scanner.status == 405

    assert status == 405
    astray, scanned = [entry for entry in logs if entry["event"] == "http.not_routed"]
    assert (astray["log_level"], scanned["log_level"]) == ("warning", "info")  # not a delivery
    assert (astray["method"], astray["path"], astray["status"]) == (
        "POST",
        "/webhooks/konpro/",
        405,
    )


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_on_the_webhook_path_are_answered_405(
    method: str, start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    async with start_bridge() as bridge:
        url = bridge.webhook_url
        async with http.request(method, url) as response:
            assert response.status == 405


def daemon_logging_json(tmp_path: Path, exchange_name: str) -> BridgeProcess:
    """The bridge as deployed, in a process of its own: what reaches its log is aiohttp's too."""
    return BridgeProcess(
        tmp_path,
        process_sections(tmp_path, exchange_name),
    )


async def test_a_malformed_request_is_answered_400_and_logged_as_one_warning_line(
    tmp_path: Path, exchange_name: str
) -> None:
    bridge = daemon_logging_json(tmp_path, exchange_name)
    await bridge.start()
    try:
        answer = await raw_post(bridge, b"Host: a-second-host", VALID)
        # Not gzip, to a path that takes no POST: aiohttp drains the body after its 405.
        refused = await raw_post(bridge, b"Content-Encoding: gzip", VALID, path="/nowhere")
    finally:
        assert await bridge.stop() == 0

    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), answer
    assert refused.startswith(b"HTTP/1.1 405"), refused
    lines = [json.loads(line) for line in bridge.log().splitlines()]
    bad = [entry for entry in lines if "bad HTTP request" in entry["event"]]
    assert [entry["level"] for entry in bad] == ["warning", "warning"]
    assert "Duplicate 'Host' header" in bad[0]["event"]
    assert "Can not decode content-encoding: gzip" in bad[1]["event"]
    assert not [entry for entry in lines if "exception" in entry]  # aiohttp's has a traceback


async def test_a_body_that_does_not_decode_as_its_content_encoding_is_answered_400(
    start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        answer = await raw_post(bridge, b"Content-Encoding: gzip", VALID)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(body) == {
        "error": "undecodable_body",
        "detail": "body could not be decoded (Content-Encoding: gzip)",
    }
    assert await drain(queue, expect=0) == []


async def test_a_gzip_body_is_published_decoded(
    start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        answer = await raw_post(bridge, b"Content-Encoding: gzip", gzip.compress(VALID))
    assert answer.startswith(b"HTTP/1.1 200"), answer
    [message] = await drain(queue, expect=1)
    assert message.body == VALID


async def test_a_client_that_hangs_up_mid_body_is_one_warning_line_not_an_error(
    tmp_path: Path, exchange_name: str
) -> None:
    bridge = daemon_logging_json(tmp_path, exchange_name)
    await bridge.start()
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(
            b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"event_type": '
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler is waiting for the rest of the body
        writer.close()
        await writer.wait_closed()
        await eventually(lambda: "client_disconnected" in bridge.log())
    finally:
        assert await bridge.stop() == 0

    lines = [json.loads(line) for line in bridge.log().splitlines()]
    [gone] = [entry for entry in lines if entry.get("error") == "client_disconnected"]
    assert (gone["event"], gone["level"]) == ("webhook.rejected", "warning")
    assert not [entry for entry in lines if entry["level"] in {"error", "critical"}]
    assert not [entry for entry in lines if "exception" in entry]


def test_an_integer_of_more_than_4300_digits_is_taken_as_the_json_grammar_allows() -> None:
    """An integer of 5,000 digits is a JSON number: orjson refuses it, and Python will not
    convert more than 4,300 digits. The bridge never reads a number of the body."""
    body = (
        b'{"event_type": "avatar_video.success", "event_data": {"checksum": 1' + b"0" * 5000 + b"}}"
    )

    assert parse_event_type(body) == "avatar_video.success"


# A number where the event type should be, in bodies that take the exact reading.
NUMERIC_TYPE_BODIES = {
    # three '"event_' in the body: a key of event_data named like an envelope key
    "a nested event_type key": b'{"event_type": 7, "event_data": {"event_type": "x"}}',
    # msgspec refuses the unpaired surrogate, so the standard library's parser reads it
    "an unpaired surrogate": b'{"event_type": 7, "event_data": {"title": "\\ud83d"}}',
    # a number that even matches the event type pattern, as text
    "a float, and a surrogate": b'{"event_type": -1.5e3, "event_data": {"t": "\\udc00"}}',
}


@pytest.mark.parametrize("body", NUMERIC_TYPE_BODIES.values(), ids=NUMERIC_TYPE_BODIES.keys())
def test_a_numeric_event_type_is_refused_whichever_reading_the_body_takes(body: bytes) -> None:
    """A number is no event type, whatever else the body holds: the exact reading (for a body
    that may name a key twice, or that msgspec refuses) must tell a number from a string too."""
    with pytest.raises(InvalidEvent, match="event_type must be a string"):
        parse_event_type(body)


async def test_a_numeric_event_type_is_answered_400_and_never_published_under_a_number(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    channel: AbstractChannel,
    http: aiohttp.ClientSession,
    exchange_name: str,
) -> None:
    """End to end: answered 400, and nothing reaches the bus under a routing key made of a
    number."""
    queue = await bind_queue("#")
    body = NUMERIC_TYPE_BODIES["an unpaired surrogate"]
    async with (
        start_bridge() as bridge,
        http.post(bridge.webhook_url, data=body, headers=JSON) as response,
    ):
        status, answer = response.status, await response.json()
    published = await drain(queue, expect=0)
    unrouted = await channel.declare_queue(f"{exchange_name}.unrouted", passive=True)
    stray = await drain(unrouted, expect=0)
    assert [m.routing_key for m in published + stray] == []
    assert (status, answer.get("error")) == (400, "invalid_event")


def test_an_event_type_beyond_a_doubles_range_is_not_said_to_be_a_body_that_is_no_object() -> None:
    """The detail names the problem: the event type, not the body."""
    body = b'{"event_type": 1e400, "event_data": {"video_id": "v1"}}'

    with pytest.raises(InvalidEvent) as refused:
        parse_event_type(body)

    assert str(refused.value) == "event_type must be a string"


async def test_a_chunked_body_one_byte_over_the_limit_is_answered_413_and_one_at_it_taken(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    """A body sent without a Content-Length is counted as it arrives: one byte over
    ``server.max_body_bytes`` is refused, a body of exactly that size is taken."""
    queue = await bind_queue("#")
    limit = 4096

    def padded(size: int, video: str) -> bytes:
        body = envelope(video)
        return body[:-1] + b" " * (size - len(body)) + b"}"

    async def chunked(body: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]
            await asyncio.sleep(0.05)  # not all with the headers: counted as it arrives

    at_limit, over_limit = padded(limit, "v_at"), padded(limit + 1, "v_over")
    async with start_bridge(server={"max_body_bytes": limit}) as bridge:
        over = await post_status(http, bridge.webhook_url, chunked(over_limit))  # type: ignore[arg-type]
        at = await post_status(http, bridge.webhook_url, chunked(at_limit))  # type: ignore[arg-type]

    assert (over, at) == (413, 200)
    assert [m.body for m in await drain(queue, expect=1)] == [at_limit]


async def test_an_empty_body_is_named_as_such_even_when_signatures_are_checked(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """A proxy that drops bodies leaves KonPro's signature header in place: the answer and the
    log line must say "body is empty", not a 401 "signature mismatch" that sends the operator
    after the secret."""
    signed_for_the_real_body = {**JSON, "KonPro-Signature": sign(VALID, SECRET)}
    with capture_logs() as logs:
        async with (
            start_bridge(konpro={"webhook_secret": SECRET}) as bridge,
            http.post(bridge.webhook_url, data=b"", headers=signed_for_the_real_body) as response,
        ):
            answer = (response.status, await response.json())
    assert answer == (400, {"error": "invalid_event", "detail": "body is empty"})
    [line] = seen(logs, "webhook.rejected")
    assert line["detail"] == "body is empty"


@pytest.mark.parametrize("expect", [b"100-continue", b"something-else"])
async def test_an_http_1_0_delivery_with_an_expect_header_is_taken_as_if_it_had_none(
    expect: bytes, start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    """HTTP/1.0 has no ``100 Continue``: the header means nothing there (aiohttp ignores it
    too). An old proxy that forwards it must not get a 417 for every delivery, nor a
    ``100 Continue`` its protocol does not know."""
    queue = await bind_queue("#")
    body = envelope("v_http10_" + expect.decode())
    async with start_bridge() as bridge:
        answer = await raw_post(bridge, b"Expect: " + expect, body, version=b"1.0")
    assert answer.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), answer
    assert b"100 Continue" not in answer
    assert [m.body for m in await drain(queue, expect=1)] == [body]


async def test_expect_100_continue_lets_a_body_of_exactly_the_limit_be_sent(
    start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    """``server.max_body_bytes`` is the largest body taken: announced with ``Expect:
    100-continue``, a body of exactly that size is asked for and published, not refused 413."""
    queue = await bind_queue("#")
    limit = 4096
    body = envelope("v_at_limit")
    body = body[:-1] + b" " * (limit - len(body)) + b"}"
    async with start_bridge(server={"max_body_bytes": limit}) as bridge:
        answer = await raw_post(bridge, b"Expect: 100-continue", body)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), answer[:200]
    assert [m.body for m in await drain(queue, expect=1)] == [body]


async def test_options_with_an_unknown_expectation_is_answered_417_not_500(
    start_bridge: BridgeFactory,
) -> None:
    """KonPro's registration check is an OPTIONS; whatever the Expect header, it gets the
    bridge's own 417, never aiohttp's, which quotes the header and turns invalid UTF-8 into a
    500 (the module's promise: every request the bridge answers)."""
    async with start_bridge() as bridge:
        answer = await raw_http.exchange(
            bridge.port,
            b"OPTIONS %s HTTP/1.1\r\nHost: bridge\r\nExpect: \xb0\xff\r\n"
            b"Connection: close\r\n\r\n" % webhook_path(bridge),
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417"), answer
    assert orjson.loads(body)["error"] == "expectation_failed"


async def test_the_100_continue_expectation_is_read_whatever_its_case(
    start_bridge: BridgeFactory, bind_queue: QueueFactory
) -> None:
    """Expectation values are case-insensitive (RFC 9110): a client or proxy that writes
    ``100-Continue`` gets its body asked for and the event published, not a 417 at every try."""
    queue = await bind_queue("#")
    body = envelope("v_expect_case")
    async with start_bridge() as bridge:
        answer = await raw_post(bridge, b"Expect: 100-Continue", body)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200"), answer[:200]
    assert [m.body for m in await drain(queue, expect=1)] == [body]
