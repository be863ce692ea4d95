"""Operator tools behind ``konpro-bridge tail`` and ``konpro-bridge send-test-event``.

``tail`` watches what the bridge publishes without taking anything away from real consumers: it
binds a private, exclusive, auto-deleted queue that the broker removes when ``tail`` goes away.
``send_test_event`` posts a realistic delivery signed exactly as KonPro signs one, which checks
the path from KonPro's side of the bridge to the bus end to end.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, TextIO

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from bridge.config import Settings
from bridge.events import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER
from bridge.publisher import CONNECT_TIMEOUT, unrouted_name
from bridge.samples import sample_body
from bridge.signatures import sign

_MAX_DATA_CHARS: Final = 200
_TAIL_QUEUE_LIMIT: Final = 10_000  # a slow terminal must not make the broker hoard messages


class Answer(NamedTuple):
    """The bridge's answer to a test delivery."""

    status: int
    body: str


async def tail(
    settings: Settings,
    patterns: Sequence[str],
    as_json: bool,
    out: TextIO,
    *,
    max_events: int | None = None,
    duration: float | None = None,
    on_ready: Callable[[], object] | None = None,
    unrouted: bool = False,
) -> int:
    """Print events published to the bridge's exchanges whose routing key matches ``patterns``;
    with ``unrouted``, those no queue is bound for instead (``patterns`` unused).

    Runs until cancelled, or until ``max_events`` were printed or ``duration`` seconds passed;
    returns how many were printed. ``on_ready`` is called once the queue is bound.

    Watching the exchanges takes part in routing: while ``tail`` runs, an event no other queue
    is bound for reaches its queue alone, not ``<exchange>.unrouted``, and is gone when it
    exits. Watching the ``.unrouted`` exchanges takes nothing from anyone: they are fanouts, and
    their queues get each event all the same.
    """
    # As the daemon does: a link that takes the connection and answers nothing ends, and says so.
    connection = await aio_pika.connect(
        settings.amqp.url.get_secret_value(), timeout=CONNECT_TIMEOUT
    )
    async with connection:
        channel = await connection.channel()
        exchanges = settings.amqp.exchanges
        if unrouted:
            queue = await _bind_to_unrouted(channel, exchanges)
        else:
            queue = await _bind_private_queue(channel, exchanges, patterns or ["#"])
        if on_ready is not None:
            on_ready()
        printed = 0
        try:
            async with asyncio.timeout(duration), queue.iterator(no_ack=True) as messages:
                async for message in messages:
                    out.write(format_json(message) if as_json else format_line(message))
                    out.write("\n")
                    out.flush()
                    printed += 1
                    if max_events is not None and printed >= max_events:
                        break
        except TimeoutError:
            pass
        return printed


async def _private_queue(channel: AbstractChannel) -> aio_pika.abc.AbstractQueue:
    return await channel.declare_queue(
        exclusive=True,
        auto_delete=True,
        arguments={"x-max-length": _TAIL_QUEUE_LIMIT, "x-overflow": "drop-head"},
    )


async def _bind_to_unrouted(
    channel: AbstractChannel, exchanges: Sequence[str]
) -> aio_pika.abc.AbstractQueue:
    queue = await _private_queue(channel)
    for name in exchanges:
        # Declared as the bridge declares it, so that tail may be started before the bridge.
        unrouted = await channel.declare_exchange(
            unrouted_name(name), aio_pika.ExchangeType.FANOUT, durable=True
        )
        await queue.bind(unrouted)
    return queue


async def _bind_private_queue(
    channel: AbstractChannel, exchanges: Sequence[str], patterns: Sequence[str]
) -> aio_pika.abc.AbstractQueue:
    queue = await _private_queue(channel)
    for name in exchanges:
        # Declared as the bridge declares it, so that tail may be started before the bridge.
        exchange = await channel.declare_exchange(
            name,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": unrouted_name(name)},
        )
        for pattern in patterns:
            await queue.bind(exchange, routing_key=pattern)
    return queue


def format_line(message: AbstractIncomingMessage) -> str:
    """``time exchange routing_key message_id event_data``, with the data compact and clipped."""
    body = _parse(message.body)
    data = body.get("event_data", body) if isinstance(body, dict) else body
    text = data if isinstance(data, str) else _dumps(data)
    if len(text) > _MAX_DATA_CHARS:
        text = text[: _MAX_DATA_CHARS - 1] + "…"
    when = _timestamp(message) or "-"
    return f"{when} {message.exchange} {message.routing_key} {message.message_id or '-'} {text}"


def format_json(message: AbstractIncomingMessage) -> str:
    """One JSON object per message, for ``jq`` and scripts."""
    record = {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "message_id": message.message_id,
        "headers": dict(message.headers),
        "timestamp": _timestamp(message),
        "body": _parse(message.body),
    }
    return _dumps(record)


def _parse(body: bytes) -> Any:
    """The body, parsed as leniently as the bridge accepts it: by orjson, else by the standard
    library's parser (an unpaired surrogate escape, which the JSON grammar allows); else as
    text."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        return body.decode(errors="replace")


def _dumps(value: Any) -> str:
    """Compact JSON; what orjson cannot write (an unpaired surrogate) written escaped."""
    try:
        return orjson.dumps(value, default=_jsonable).decode()
    except (TypeError, orjson.JSONEncodeError):
        return json.dumps(value, default=_jsonable, separators=(",", ":"))


def _timestamp(message: AbstractIncomingMessage) -> str | None:
    if message.timestamp is None:
        return None
    when = message.timestamp
    if when.tzinfo is None:  # AMQP timestamps are UTC seconds
        when = when.replace(tzinfo=dt.UTC)
    return when.isoformat().replace("+00:00", "Z")


def _jsonable(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


async def send_test_event(
    settings: Settings, event_type: str, url: str | None = None, secret: str | None = None
) -> Answer:
    """POST a sample ``event_type`` delivery, signed as KonPro signs, and return the answer.

    The secret is ``secret``, else ``konpro.webhook_secret``; with neither the delivery goes
    unsigned, as deliveries to a one-off callback URL do. The URL defaults to this bridge.
    """
    body = sample_body(event_type)
    headers = {
        "Content-Type": "application/json",
        EVENT_ID_HEADER: uuid.uuid4().hex,
        TIMESTAMP_HEADER: str(int(time.time())),
    }
    key = settings.konpro.webhook_secret.get_secret_value() if secret is None else secret
    if key:
        headers[SIGNATURE_HEADER] = sign(body, key)
    timeout = aiohttp.ClientTimeout(total=settings.konpro.request_timeout)
    # Another host is reached as every tool reaches it (HTTPS_PROXY...); this host's bridge,
    # directly.
    async with (
        aiohttp.ClientSession(timeout=timeout, trust_env=url is not None) as session,
        session.post(url or local_webhook_url(settings), data=body, headers=headers) as response,
    ):
        return Answer(response.status, await response.text())


def local_webhook_url(settings: Settings) -> str:
    """Where this host's bridge listens for deliveries, as reached from the same host."""
    return settings.server.local_url(settings.server.webhook_path)
