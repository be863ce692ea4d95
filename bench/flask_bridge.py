"""The tutorial path: Flask + pika under gunicorn (sync workers), one BlockingConnection per worker.

Run as ``gunicorn -w 4 bench.flask_bridge:app``; without ``--preload`` every worker imports this
module and so opens its own connection. Configured by BENCH_AMQP_URL and BENCH_EXCHANGE.
"""

import os

import pika  # type: ignore[import-untyped]
from flask import Flask, Response, jsonify, request

app = Flask(__name__)

connection = pika.BlockingConnection(pika.URLParameters(os.environ["BENCH_AMQP_URL"]))
channel = connection.channel()
channel.confirm_delivery()
channel.exchange_declare(exchange=os.environ["BENCH_EXCHANGE"], exchange_type="topic", durable=True)


@app.post("/webhooks/konpro")
def webhook() -> tuple[Response, int]:
    event = request.get_json(silent=True)
    if not isinstance(event, dict) or "event_type" not in event:
        return jsonify(error="bad event"), 400
    # With confirm_delivery(), basic_publish blocks until the broker confirms (or raises).
    channel.basic_publish(
        exchange=os.environ["BENCH_EXCHANGE"],
        routing_key=str(event["event_type"]),
        body=request.get_data(),
        properties=pika.BasicProperties(
            content_type="application/json",
            delivery_mode=pika.DeliveryMode.Persistent,
            message_id=request.headers.get("KonPro-Event-Id"),
        ),
    )
    return jsonify(status="ok"), 200


@app.get("/readyz")
def readyz() -> str:
    return "ok"
