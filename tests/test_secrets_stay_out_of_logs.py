"""No secret ever reaches a log line: not the AMQP password, the API key or a webhook secret."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import aiohttp
import structlog

from bridge.config import LogSettings
from bridge.logs import configure_logging, redactor
from tests.conftest import QueueFactory, drain
from tests.support.process import BridgeProcess

AMQP_PASSWORD = "amqp-Pa55-7f3e"
API_KEY = "konpro-api-key-91c2"
WEBHOOK_SECRET = "whsec_b6a1e0c4d9"
OLD_SECRET = "whsec_retired_5521"
SECRETS = (AMQP_PASSWORD, API_KEY, WEBHOOK_SECRET, OLD_SECRET)


async def test_a_full_run_with_every_secret_set_logs_none_of_them(
    tmp_path: Path, exchange_name: str, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    # The broker refuses this password, so the connection error paths are logged as well.
    bad_login = f"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/"
    sections: dict[str, dict[str, object]] = {
        "amqp": {"url": bad_login, "exchange": exchange_name, "reconnect_interval": 0.2},
        "konpro": {
            "api_key": API_KEY,
            "webhook_secret": WEBHOOK_SECRET,
            "previous_webhook_secrets": [OLD_SECRET],
        },
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
        "log": {"level": "debug", "format": "json"},
    }
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start(wait_ready=False)
    url = bridge.url + "/webhooks/konpro"
    async with http.post(url, data=b"{}", headers={"Content-Type": "application/json"}) as r:
        assert r.status in {400, 401}
    assert await bridge.stop() == 0

    log = bridge.log()
    assert "amqp.connect_failed" in log
    for secret in SECRETS:
        assert secret not in log
    assert await drain(queue, expect=0) == []


def test_a_secret_inside_an_exception_or_a_foreign_log_line_is_masked() -> None:
    stream = io.StringIO()
    configure_logging(LogSettings(level="info", format="json"), [API_KEY], stream=stream)
    try:
        try:
            raise RuntimeError(f"request failed with key {API_KEY}")
        except RuntimeError:
            structlog.get_logger("test").exception("call.failed", header=f"x-api-key: {API_KEY}")
        logging.getLogger("aiohttp.client").warning("retrying with %s", API_KEY)
        redactor.add(WEBHOOK_SECRET)  # learnt at run time, e.g. from endpoint.add
        structlog.get_logger("test").info("secret.learnt", detail=WEBHOOK_SECRET)
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()

    output = stream.getvalue()
    assert output.count("***") >= 4
    assert API_KEY not in output
    assert WEBHOOK_SECRET not in output
    assert "call.failed" in output
    assert "retrying with" in output
