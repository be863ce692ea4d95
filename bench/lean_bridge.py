"""The minimal bridge with konpro-bridge's publishing layer: a diagnostic, not a target.

Like naive_bridge.py (parse the JSON, publish persistent, await the confirm, answer 200) but with
konpro-bridge's choices underneath: published through the aiormq channel under aio-pika's robust
one without awaiting the socket write, on uvloop, the JSON parsed by orjson. Set beside the naive
bridge, it prices those choices; set beside konpro-bridge, it prices what the bridge does on top
(validation, replay memory, the message contract's properties, the log line, metrics, the publish
deadline).

Configured by the environment: BENCH_PORT, BENCH_AMQP_URL, BENCH_EXCHANGE. Only what differs from
the naive bridge is here.
"""

import os
from typing import cast

import aio_pika
import aiormq
import orjson
import uvloop
from aiohttp import web

from bench.naive_bridge import disconnect, readyz

PERSISTENT = 2


async def connect(app: web.Application) -> None:
    connection = await aio_pika.connect_robust(os.environ["BENCH_AMQP_URL"])
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(
        os.environ["BENCH_EXCHANGE"], aio_pika.ExchangeType.TOPIC, durable=True
    )
    app["exchange_name"] = exchange.name
    app["channel"] = cast(aiormq.Channel, await channel.get_underlay_channel())
    app["connection"] = connection


async def webhook(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        event_type = orjson.loads(body)["event_type"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "bad event"}, status=400)
    properties = aiormq.spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=PERSISTENT,
        message_id=request.headers.get("KonPro-Event-Id"),
    )
    channel: aiormq.Channel = request.app["channel"]
    await channel.basic_publish(  # returns once the broker confirms
        body,
        exchange=request.app["exchange_name"],
        routing_key=event_type,
        properties=properties,
        mandatory=True,
        wait=False,
    )
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def main() -> None:
    app = web.Application()
    app.on_startup.append(connect)
    app.on_cleanup.append(disconnect)
    app.add_routes([web.post("/webhooks/konpro", webhook), web.get("/readyz", readyz)])
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(os.environ["BENCH_PORT"]),
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
