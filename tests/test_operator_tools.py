"""``send-test-event`` delivers what KonPro would; ``tail`` shows what reaches the exchange.

Called in-process, to show what they do in detail; ``test_operator_commands.py`` runs them as
processes."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aio_pika.abc import AbstractChannel
from aiohttp import web
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from bridge.events import DOCUMENTED_EVENT_TYPES, EVENT_ID_HEADER, parse_event_type
from bridge.samples import sample_event
from bridge.signatures import SignatureRejected, SignatureVerifier
from bridge.tools import format_json, format_line, local_webhook_url, send_test_event, tail
from tests.support.harness import BridgeFactory, QueueFactory, drain, make_settings
from tests.support.observing import scrape, value
from tests.support.private_broker import PrivateBroker
from tests.support.serving import serving

SECRET = "whsec_test_tools_secret"


class Receiver:
    """A real HTTP endpoint standing in for the bridge; keeps what it was sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[bytes, dict[str, str]]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((await request.read(), dict(request.headers)))
        return web.json_response({"status": "accepted"})


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    async with serving(app) as url:
        receiver.url = url + "/hook"
        yield receiver


@pytest.mark.parametrize("event_type", [*DOCUMENTED_EVENT_TYPES, "instant_avatar.success"])
def test_every_sample_is_a_valid_envelope_with_fresh_ids(event_type: str) -> None:
    first, second = sample_event(event_type), sample_event(event_type)

    assert parse_event_type(orjson.dumps(first)) == event_type
    assert first["event_data"] != second["event_data"]


async def test_a_test_event_is_signed_as_konpro_signs_it(
    receiver: Receiver, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, "unused", konpro={"webhook_secret": SECRET})

    answer = await send_test_event(settings, "avatar_video.success", url=receiver.url)

    assert answer.status == 200
    assert orjson.loads(answer.body) == {"status": "accepted"}
    [(body, headers)] = receiver.requests
    SignatureVerifier([SECRET], timestamp_tolerance=60).verify(body, headers)
    assert headers["Content-Type"] == "application/json"
    assert len(headers[EVENT_ID_HEADER]) == 32
    assert orjson.loads(body)["event_type"] == "avatar_video.success"


async def test_an_explicit_secret_wins_over_the_configured_one(
    receiver: Receiver, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, "unused", konpro={"webhook_secret": SECRET})

    await send_test_event(settings, "video_translate.fail", url=receiver.url, secret="whsec_new")

    [(body, headers)] = receiver.requests
    SignatureVerifier(["whsec_new"], timestamp_tolerance=60).verify(body, headers)
    with pytest.raises(SignatureRejected):
        SignatureVerifier([SECRET], timestamp_tolerance=60).verify(body, headers)


async def test_without_any_secret_the_test_event_goes_unsigned(
    receiver: Receiver, tmp_path: Path
) -> None:
    await send_test_event(make_settings(tmp_path, "unused"), "batch.finished", url=receiver.url)

    [(_, headers)] = receiver.requests
    assert "KonPro-Signature" not in headers
    assert "Signature" not in headers


def test_the_default_target_is_the_local_bridge(tmp_path: Path) -> None:
    wildcard = make_settings(tmp_path, "x", server={"host": "0.0.0.0", "port": 8080})  # noqa: S104
    ipv6 = make_settings(tmp_path, "x", server={"host": "::1", "port": 9000})

    assert local_webhook_url(wildcard) == "http://127.0.0.1:8080/webhooks/konpro"
    assert local_webhook_url(ipv6) == "http://[::1]:9000/webhooks/konpro"


async def _tail_while_publishing(
    channel: AbstractChannel,
    exchange: str,
    tmp_path: Path,
    messages: list[tuple[str, aio_pika.Message]],
    *,
    as_json: bool,
    patterns: list[str],
    expect: int,
) -> list[str]:
    out = io.StringIO()
    ready = asyncio.Event()
    settings = make_settings(tmp_path, exchange)
    task = asyncio.create_task(
        tail(settings, patterns, as_json, out, max_events=expect, duration=10, on_ready=ready.set)
    )
    await asyncio.wait_for(ready.wait(), 10)
    target = await channel.get_exchange(exchange)
    for routing_key, message in messages:
        await target.publish(message, routing_key)
    assert await task == expect
    return out.getvalue().splitlines()


def _event(event_type: str, message_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        orjson.dumps(sample_event(event_type)),
        message_id=message_id,
        headers={EVENT_ID_HEADER: message_id},
        content_type="application/json",
    )


async def test_tail_json_prints_each_event_with_its_routing_and_body(
    channel: AbstractChannel, exchange_name: str, tmp_path: Path
) -> None:
    message = _event("avatar_video.fail", "evt-1")

    [line] = await _tail_while_publishing(
        channel,
        exchange_name,
        tmp_path,
        [("avatar_video.fail", message)],
        as_json=True,
        patterns=[],
        expect=1,
    )

    record = orjson.loads(line)
    assert record["exchange"] == exchange_name
    assert record["routing_key"] == "avatar_video.fail"
    assert record["message_id"] == "evt-1"
    assert record["headers"] == {EVENT_ID_HEADER: "evt-1"}
    assert record["body"] == orjson.loads(message.body)


async def test_tail_shows_only_the_patterns_asked_for_as_readable_lines(
    channel: AbstractChannel, exchange_name: str, tmp_path: Path
) -> None:
    published = [
        ("avatar_video.success", _event("avatar_video.success", "evt-skipped")),
        ("video_translate.fail", _event("video_translate.fail", "evt-shown")),
    ]

    [line] = await _tail_while_publishing(
        channel,
        exchange_name,
        tmp_path,
        published,
        as_json=False,
        patterns=["*.fail"],
        expect=1,
    )

    assert f" {exchange_name} video_translate.fail evt-shown " in line
    assert '"output_language":"French"' in line


async def test_tail_shows_the_events_of_every_exchange_the_routes_name(
    channel: AbstractChannel, exchange_name: str, tmp_path: Path
) -> None:
    routed = f"{exchange_name}.translations"
    routes = [{"match": "video_translate.*", "exchange": routed}]
    settings = make_settings(tmp_path, exchange_name, amqp={"routes": routes})
    out = io.StringIO()
    ready = asyncio.Event()
    task = asyncio.create_task(
        tail(settings, ["#"], True, out, max_events=2, duration=10, on_ready=ready.set)
    )
    await asyncio.wait_for(ready.wait(), 10)
    for target, event_type in (
        (exchange_name, "avatar_video.fail"),
        (routed, "video_translate.fail"),
    ):
        exchange = await channel.get_exchange(target)
        await exchange.publish(_event(event_type, f"evt-{event_type}"), event_type)

    assert await task == 2
    shown = sorted(orjson.loads(line)["exchange"] for line in out.getvalue().splitlines())
    await channel.exchange_delete(routed)
    await channel.exchange_delete(f"{routed}.unrouted")
    assert shown == sorted([exchange_name, routed])


async def test_tail_leaves_no_queue_behind_on_the_broker(
    channel: AbstractChannel, exchange_name: str, tmp_path: Path
) -> None:
    """What ``tail`` binds is private to it: once it is gone, events on the exchange reach no
    queue of its (nobody else's queue is bound here, so they are returned as unroutable)."""
    [line] = await _tail_while_publishing(
        channel,
        exchange_name,
        tmp_path,
        [("avatar_video.fail", _event("avatar_video.fail", "evt-seen"))],
        as_json=True,
        patterns=["#"],
        expect=1,
    )
    assert orjson.loads(line)["message_id"] == "evt-seen"

    exchange = await channel.get_exchange(exchange_name)
    answer = await exchange.publish(_event("avatar_video.fail", "evt-after"), "avatar_video.fail")
    assert isinstance(answer, DeliveredMessage)  # returned unroutable, not acknowledged
    assert isinstance(answer.delivery, Basic.Return)


async def test_tail_unrouted_shows_what_no_queue_is_bound_for_and_takes_none_of_it(
    start_bridge: BridgeFactory,
    channel: AbstractChannel,
    http: aiohttp.ClientSession,
    exchange_name: str,
    tmp_path: Path,
) -> None:
    """Plain ``tail`` takes part in routing: an event no other queue is bound for reaches its
    queue alone. ``--unrouted`` watches the ``.unrouted`` fanouts, whose queue gets each event
    all the same: the way to look for events no consumer sees."""
    body = orjson.dumps(sample_event("instant_avatar.success"))
    out = io.StringIO()
    ready = asyncio.Event()
    settings = make_settings(tmp_path, exchange_name)
    async with start_bridge() as bridge:
        watching = asyncio.create_task(
            tail(
                settings,
                [],
                True,
                out,
                max_events=1,
                duration=10,
                on_ready=ready.set,
                unrouted=True,
            )
        )
        await asyncio.wait_for(ready.wait(), 10)
        headers = {"Content-Type": "application/json"}
        async with http.post(bridge.webhook_url, data=body, headers=headers) as response:
            assert response.status == 200
        assert await watching == 1

    assert orjson.loads(out.getvalue())["routing_key"] == "instant_avatar.success"
    unrouted = await channel.declare_queue(f"{exchange_name}.unrouted", passive=True)
    assert [message.body for message in await drain(unrouted, expect=1)] == [body]


async def test_tail_runs_as_the_bridges_broker_user_given_its_private_queues(
    private_broker: PrivateBroker, exchange_name: str, tmp_path: Path
) -> None:
    """The README's broker user, with ``amq.gen-...`` added as it says for ``tail``."""
    names = rf"^{re.escape(exchange_name)}(\.unrouted)?$|^amq\.gen-.*"
    user = f"tail-{uuid.uuid4().hex[:6]}"
    url = private_broker.add_user(user, "pw", configure=names, write=names, read=names)
    settings = make_settings(tmp_path, exchange_name, amqp={"url": url})

    for unrouted in (False, True):
        assert await tail(settings, [], True, io.StringIO(), duration=0.3, unrouted=unrouted) == 0


@dataclass
class _Message:
    """What ``tail`` reads of an incoming message."""

    body: bytes
    exchange: str = "konpro.events"
    routing_key: str = "avatar_video.fail"
    message_id: str | None = "evt-1"
    headers: dict[str, Any] = field(default_factory=dict)
    timestamp: dt.datetime | None = None


_CUT_IN_AN_EMOJI = (
    b'{"event_type": "avatar_video.fail", '
    b'"event_data": {"video_id": "v1", "msg": "Failed: \\u201cMy \\ud83d\\u201d"}}'
)


def test_tail_json_shows_an_event_the_bridge_took_by_the_json_grammar_as_json() -> None:
    """``tail`` reads bodies as the bridge does: one orjson refuses but the JSON grammar
    allows (a title cut in an emoji) is still an object for ``jq``."""
    record = json.loads(format_json(_Message(_CUT_IN_AN_EMOJI)))  # type: ignore[arg-type]

    assert isinstance(record["body"], dict), record["body"]
    assert record["body"]["event_data"]["video_id"] == "v1"


def test_tail_shows_the_event_data_of_an_event_taken_by_the_json_grammar() -> None:
    """The line shows ``event_data`` for such an event too, not the raw envelope."""
    line = format_line(_Message(_CUT_IN_AN_EMOJI))  # type: ignore[arg-type]

    assert '"event_type"' not in line, line
    assert '"video_id"' in line, line


async def test_a_test_event_is_accepted_and_verified_by_a_bridge_with_a_secret(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("video_translate.*")
    async with start_bridge(konpro={"webhook_secret": SECRET}) as bridge:
        settings = bridge.settings.model_copy(
            update={"server": bridge.settings.server.model_copy(update={"port": bridge.port})}
        )
        answer = await send_test_event(settings, "video_translate.success")
        forged = await send_test_event(settings, "video_translate.success", secret="whsec_x")
        samples = await scrape(http, bridge.url + "/metrics")

    assert answer.status == 200
    assert orjson.loads(answer.body)["outcome"] == "published"
    assert forged.status == 401
    [message] = await drain(queue, expect=1)
    SignatureVerifier([SECRET], timestamp_tolerance=60).verify(message.body, message.headers)
    assert message.message_id == message.headers["KonPro-Event-Id"]
    assert uuid.UUID(hex=message.message_id)
    rejected = value(
        samples,
        "konpro_bridge_events_received_total",
        event_type="other",
        outcome="rejected_signature",
    )
    assert rejected == 1
