"""Publish ceiling: confirmed persistent publishes, one aio-pika process, many in flight, no HTTP.

BENCH_INFLIGHT coroutines each publish and await the broker's confirm in a loop for
BENCH_DURATION seconds on one channel with publisher confirms. Prints one ``BENCH_JSON {...}``
line in the same shape as post_events.lua's summary. Configured by BENCH_AMQP_URL,
BENCH_EXCHANGE, BENCH_INFLIGHT, BENCH_DURATION and BENCH_RUN_ID.

BENCH_LEAN=1 publishes the way konpro-bridge does instead: through the aiormq channel under
aio-pika's (no ``Message``/``Exchange`` layer, the socket write not awaited), on uvloop. That is
the tightest ceiling for a bridge built on these libraries.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from typing import cast

import aio_pika
import aiormq

from bench.events import make_event

Publish = Callable[[str, bytes, str], Awaitable[object]]


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


async def main() -> None:
    url = os.environ["BENCH_AMQP_URL"]
    inflight = int(os.environ.get("BENCH_INFLIGHT", "256"))
    duration = float(os.environ.get("BENCH_DURATION", "10"))
    run_id = os.environ.get("BENCH_RUN_ID", str(time.time_ns()))
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            os.environ["BENCH_EXCHANGE"], aio_pika.ExchangeType.TOPIC, durable=True
        )
        publish = (
            _lean_publisher(
                cast(aiormq.Channel, await channel.get_underlay_channel()), exchange.name
            )
            if os.environ.get("BENCH_LEAN")
            else _aio_pika_publisher(exchange)
        )
        latencies: list[float] = []
        failures = 0
        start, cpu_start = time.perf_counter(), time.process_time()
        deadline = start + duration

        async def worker(wid: int) -> None:
            nonlocal failures
            counter = 0
            while time.perf_counter() < deadline:
                counter += 1
                event_type, body, event_id = make_event(run_id, wid, counter)
                t0 = time.perf_counter()
                try:
                    await publish(event_type, body, event_id)
                except aiormq.exceptions.AMQPError:
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(i) for i in range(inflight)))
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
    finally:
        await connection.close()
    latencies.sort()
    us = [x * 1e6 for x in latencies]
    summary = {
        "requests": len(us) + failures,
        "ok": len(us),
        "non2xx": failures,
        "duration_us": int(elapsed * 1e6),
        "cpu_s": round(cpu, 3),
        "errors": {"connect": 0, "read": 0, "write": 0, "status": failures, "timeout": 0},
        "latency_us": {
            "p50": int(percentile(us, 50)),
            "p90": int(percentile(us, 90)),
            "p99": int(percentile(us, 99)),
            "max": int(us[-1]) if us else 0,
            "mean": round(sum(us) / len(us), 1) if us else 0.0,
        },
    }
    print("BENCH_JSON " + json.dumps(summary), flush=True)


def _aio_pika_publisher(exchange: aio_pika.abc.AbstractExchange) -> Publish:
    async def publish(event_type: str, body: bytes, event_id: str) -> object:
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event_id,
        )
        return await exchange.publish(message, routing_key=event_type)

    return publish


def _lean_publisher(channel: aiormq.Channel, exchange: str) -> Publish:
    async def publish(event_type: str, body: bytes, event_id: str) -> object:
        properties = aiormq.spec.Basic.Properties(
            content_type="application/json", delivery_mode=2, message_id=event_id
        )
        return await channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=event_type,
            properties=properties,
            mandatory=True,
            wait=False,
        )

    return publish


if __name__ == "__main__":
    if os.environ.get("BENCH_LEAN"):
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
