"""No secret ever reaches a log line: not the AMQP password, the API key or a webhook secret."""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path

import aiohttp
import orjson
import structlog
from pydantic import SecretStr
from structlog.testing import capture_logs

from bridge.config import LogSettings
from bridge.konpro import KonProClient, KonProError
from bridge.logs import configure_logging, redactor
from bridge.signatures import sign
from tests.fake_konpro import FakeKonPro
from tests.support.harness import BridgeFactory, process_sections
from tests.support.private_broker import PrivateBroker
from tests.support.process import BridgeProcess, free_port
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytest_plugins = ("tests.fake_konpro",)

AMQP_PASSWORD = "amqp-Pa55-7f3e"
API_KEY = "konpro-api-key-91c2"
WEBHOOK_SECRET = "whsec_b6a1e0c4d9"
OLD_SECRET = "whsec_retired_5521"
SECRETS = (AMQP_PASSWORD, API_KEY, WEBHOOK_SECRET, OLD_SECRET)
EVENT = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'


async def test_a_full_run_with_every_secret_set_logs_none_of_them(
    tmp_path: Path, exchange_name: str, private_broker: PrivateBroker, http: aiohttp.ClientSession
) -> None:
    """Registration, signed and forged deliveries, a broken and restored broker link, debug on."""
    amqp_url = private_broker.add_user(f"bridge-{uuid.uuid4().hex[:6]}", AMQP_PASSWORD)
    konpro = FakeKonPro(api_key=API_KEY)
    await konpro.start()
    proxy = TcpProxy("127.0.0.1", private_broker.port)
    await proxy.start()
    port = free_port()
    sections: dict[str, dict[str, object]] = {
        "server": {"port": port},
        "amqp": {
            "url": amqp_url.replace(f":{private_broker.port}/", f":{proxy.port}/"),
            "exchange": exchange_name,
            "reconnect_interval": 0.2,
        },
        "konpro": {
            "api_url": konpro.url,
            "api_key": API_KEY,
            "public_url": f"http://127.0.0.1:{port}/webhooks/konpro",
            "webhook_secret": WEBHOOK_SECRET,
            "previous_webhook_secrets": [OLD_SECRET],
        },
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": True, "interval": 1.0},
        "log": {"level": "debug", "format": "json"},
    }
    bridge = BridgeProcess(tmp_path, sections)
    try:
        await bridge.start()
        await eventually(lambda: bool(konpro.endpoints))
        url = bridge.webhook_url
        for n, secret in enumerate((WEBHOOK_SECRET, OLD_SECRET, "whsec_forged")):
            event = numbered_event(n)
            async with http.post(url, data=event, headers=signed_headers(event, secret)) as answer:
                assert answer.status == (401 if secret == "whsec_forged" else 200)
        await proxy.cut()
        spooled = numbered_event(3)
        async with http.post(url, data=spooled, headers=signed_headers(spooled)) as answer:
            assert answer.status == 202
        await proxy.restore()
        await eventually(lambda: "spool.drained" in bridge.log())
        assert await bridge.stop() == 0
    finally:
        await bridge.stop()
        await proxy.close()
        await konpro.close()

    log = bridge.log()
    assert "reconcile.endpoint_added" in log
    assert "amqp.connection_lost" in log
    for secret in SECRETS:
        assert secret not in log


async def test_a_broker_that_refuses_the_password_logs_the_failure_but_not_the_password(
    tmp_path: Path, exchange_name: str, http: aiohttp.ClientSession
) -> None:
    bad_login = f"amqp://guest:{AMQP_PASSWORD}@127.0.0.1:5672/"
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp_url=bad_login,
        amqp={"reconnect_interval": 0.2},
        log={"level": "debug"},
    )
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start(wait_ready=False)
    await eventually(lambda: "ACCESS_REFUSED" in bridge.log())
    assert await bridge.stop() == 0
    assert AMQP_PASSWORD not in bridge.log()


def numbered_event(n: int) -> bytes:
    """Distinct events: the same body twice would be a replay, and published once."""
    return EVENT.replace(b'"v1"', b'"v%d"' % n)


def signed_headers(body: bytes, secret: str = WEBHOOK_SECRET) -> dict[str, str]:
    return {"Content-Type": "application/json", "KonPro-Signature": sign(body, secret)}


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


def test_a_logged_traceback_names_its_frames_but_not_their_variables() -> None:
    """A frame's variables would put request bodies in the log, and a secret cut short by the
    traceback's length limit is one the redactor can no longer recognise."""
    stream = io.StringIO()
    configure_logging(LogSettings(level="info", format="json"), [API_KEY], stream=stream)
    try:
        try:
            fail_while_holding("x" * 70 + API_KEY, EVENT)
        except RuntimeError:
            structlog.get_logger("test").exception("call.failed")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()

    line = orjson.loads(stream.getvalue())
    frames = line["exception"][0]["frames"]
    assert [frame["name"] for frame in frames][-1] == "fail_while_holding"
    assert all("locals" not in frame for frame in frames)
    assert API_KEY[:8] not in stream.getvalue()
    assert "video_id" not in stream.getvalue()


def fail_while_holding(credential: str, body: bytes) -> None:
    raise RuntimeError("the call failed")


async def test_a_secret_in_a_reason_is_masked_in_readyz_and_status_too(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    # A password that the broker's error text happens to contain: whatever a reason holds,
    # the HTTP answers pass the same redactor as the log lines.
    amqp = {"url": f"amqp://guest:call%20failed@127.0.0.1:{free_port()}/"}
    async with start_bridge(wait_ready=False, amqp=amqp) as bridge:
        await eventually(lambda: "Connect call" in (bridge.publisher.not_ready_reason() or ""))
        for path in ("/readyz", "/status"):
            async with http.get(bridge.url + path) as response:
                answer = await response.text()
            assert "cannot connect to the broker: [Errno 111] Connect ***" in answer, path


async def test_a_short_password_is_masked_in_urls_and_leaves_the_bridges_words_whole(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """The compose file's broker user is ``konpro``/``konpro``: masked anywhere, the password
    masked the bridge's own words (``/status``: ``***.api_key is not set``; the log:
    ``/webhooks/***``). Shorter than 8 characters, it is masked where a URL carries it."""
    amqp = {"url": "amqp://konpro:konpro@127.0.0.1:9/"}
    async with (
        start_bridge(wait_ready=False, amqp=amqp, reconcile={"enabled": True}) as bridge,
        http.get(bridge.url + "/status") as response,
    ):
        status = await response.json()
    stream = io.StringIO()
    configure_logging(LogSettings(format="json"), ["konpro"], stream=stream)
    try:
        structlog.get_logger("test").warning(
            "konpro.retry", detail="set konpro.api_key", url="amqp://konpro:konpro@rabbitmq/"
        )
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()

    assert status["registration"]["reason"] == "konpro.api_key is not set"
    line = orjson.loads(stream.getvalue())
    assert (line["event"], line["detail"]) == ("konpro.retry", "set konpro.api_key")
    assert line["url"] == "amqp://konpro:***@rabbitmq/"


async def test_an_api_error_echoing_the_key_where_the_message_is_cut_shows_none_of_it(
    fake_konpro: FakeKonPro,
) -> None:
    """The client keeps 300 characters of an error message. It masks the key first: cut first,
    a key across the cut would not be whole any more, and its first part would reach the error,
    the ``konpro.retry`` line and, through reconciliation, ``/status``."""
    key = fake_konpro.api_key
    prefix = key[:20]
    message = "invalid credentials for key " + "." * (300 - 28 - 20) + key
    assert message[:300].endswith(prefix)
    echo = json.dumps({"code": 400175, "message": message}).encode()
    fake_konpro.answer_next(1, 400, body=echo)
    fake_konpro.answer_next(1, 503, body=echo)
    fake_konpro.answer_next(1, 400, body=echo)
    errors: list[KonProError] = []
    with capture_logs() as logs:
        client = KonProClient(
            fake_konpro.url, SecretStr(key), timeout=2.0, max_attempts=2, backoff_base=0.01
        )
        async with client:
            for _ in range(2):
                try:
                    await client.list_endpoints()
                except KonProError as exc:
                    errors.append(exc)

    assert len(errors) == 2
    assert all(prefix not in str(error) and "***" in str(error) for error in errors)
    assert prefix not in repr(logs)
