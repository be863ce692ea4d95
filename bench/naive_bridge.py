"""The bridge a competent engineer writes first: aiohttp in, aio-pika out, confirm, then 200.

Configured by the environment: BENCH_PORT, BENCH_AMQP_URL, BENCH_EXCHANGE.
"""

import json
import os

import aio_pika
from aiohttp import web


async def connect(app: web.Application) -> None:
    connection = await aio_pika.connect_robust(os.environ["BENCH_AMQP_URL"])
    channel = await connection.channel(publisher_confirms=True)
    app["exchange"] = await channel.declare_exchange(
        os.environ["BENCH_EXCHANGE"], aio_pika.ExchangeType.TOPIC, durable=True
    )
    app["connection"] = connection


async def disconnect(app: web.Application) -> None:
    await app["connection"].close()


async def webhook(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        event_type = json.loads(body)["event_type"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "bad event"}, status=400)
    message = aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=request.headers.get("KonPro-Event-Id"),
    )
    await request.app["exchange"].publish(message, routing_key=event_type)  # awaits the confirm
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    app = web.Application()
    app.on_startup.append(connect)
    app.on_cleanup.append(disconnect)
    app.add_routes([web.post("/webhooks/konpro", webhook), web.get("/readyz", readyz)])
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), print=None)


if __name__ == "__main__":
    main()
