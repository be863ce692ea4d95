"""HTTP ceiling: aiohttp answering the same POSTs (read body, parse JSON) without publishing.

Configured by the environment: BENCH_PORT.
"""

import json
import os

from aiohttp import web


async def webhook(request: web.Request) -> web.Response:
    body = await request.read()
    try:
        json.loads(body)["event_type"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": "bad event"}, status=400)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    app = web.Application()
    app.add_routes([web.post("/webhooks/konpro", webhook), web.get("/readyz", readyz)])
    web.run_app(app, host="127.0.0.1", port=int(os.environ["BENCH_PORT"]), print=None)


if __name__ == "__main__":
    main()
