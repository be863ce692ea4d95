"""An operator can see what the running bridge did (``/metrics``) and why (``/status``).

Real deliveries go through a real bridge to the real broker; the broker link is cut with the
test's own TCP proxy.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import math
import re
from pathlib import Path
from typing import Literal, TextIO

import aiohttp
import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from bridge.app import Bridge
from bridge.config import AmqpSettings, LogSettings, SpoolSettings
from bridge.logs import configure_logging
from bridge.publisher import Publisher
from bridge.samples import sample_body
from bridge.server import BodiesInFlight
from bridge.signatures import sign
from bridge.spool import Spool
from bridge.status import StatusReport
from tests.fake_konpro import FakeKonPro
from tests.support.deliveries import delivery, envelope, post_status
from tests.support.harness import (
    AMQP_URL,
    FULL_AT_ONE,
    BridgeFactory,
    QueueFactory,
    drain,
    proxied_amqp_url,
)
from tests.support.observing import scrape, seen, status, value
from tests.support.process import free_port
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytest_plugins = ("tests.fake_konpro",)

SECRET = "whsec_observed"
RECEIVED = "konpro_bridge_events_received_total"


async def post(
    http: aiohttp.ClientSession,
    bridge: Bridge,
    body: bytes,
    *,
    secret: str | None = SECRET,
    event_id: str | None = None,
) -> int:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["KonPro-Signature"] = sign(body, secret)
    if event_id is not None:
        headers["KonPro-Event-Id"] = event_id
    url = bridge.webhook_url
    async with http.post(url, data=body, headers=headers) as response:
        return response.status


ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")


@pytest.mark.parametrize("stream_kind", ["file", "text"])
def test_json_log_lines_carry_the_level_the_event_and_an_iso_8601_utc_time(
    stream_kind: str, tmp_path: Path
) -> None:
    # A real file is written as bytes (the daemon's path); a text-only stream through the
    # standard library's renderer. Both, and foreign lines too, stamp the same way.
    path = tmp_path / "bridge.log"
    text_only = io.StringIO()
    stream: TextIO = path.open("w") if stream_kind == "file" else text_only
    before = dt.datetime.now(dt.UTC)
    try:
        configure_logging(LogSettings(level="info", format="json"), stream=stream)
        structlog.get_logger("test").info("webhook.accepted", outcome="published")
        logging.getLogger("aiohttp.server").warning("a foreign line")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
        stream.flush()
    text = path.read_text() if stream_kind == "file" else text_only.getvalue()
    stream.close()

    records = [orjson.loads(line) for line in text.splitlines()]
    assert [(r["level"], r["event"]) for r in records] == [
        ("info", "webhook.accepted"),
        ("warning", "a foreign line"),
    ]
    for record in records:
        assert ISO_UTC.fullmatch(record["timestamp"]), record["timestamp"]
        stamped = dt.datetime.fromisoformat(record["timestamp"])
        assert before <= stamped <= dt.datetime.now(dt.UTC)


@pytest.mark.parametrize("level", ["info", "debug"])
def test_the_libraries_own_account_of_a_broker_outage_is_kept_for_the_debug_level(
    level: Literal["info", "debug"],
) -> None:
    # The bridge's amqp.* lines tell an outage once; aiormq says it again on every attempt.
    stream = io.StringIO()
    try:
        configure_logging(LogSettings(level=level, format="json"), stream=stream)
        aiormq_log = logging.getLogger("aiormq.connection")
        aiormq_log.error("error when creating transport: %r", ConnectionRefusedError(111))
        aiormq_log.error("Got frame for closed channel %d: %r", 3, "frame")
        reconnect = logging.getLogger("aio_pika.robust_connection")
        for error in (Exception(), RuntimeError("PRECONDITION_FAILED")):  # a link that ended
            reconnect.error(  # cleanly (aiormq's bare Exception), and a real failure
                "Reconnect attempt failed %s due to %s: %s. Retrying after %r seconds.",
                "amqp://guest:******@127.0.0.1/",
                type(error).__name__,
                error,
                0.2,
            )
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()

    records = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    echoes = [
        ("debug", "error when creating transport: ConnectionRefusedError(111)"),
        (
            "debug",
            "Reconnect attempt failed amqp://guest:******@127.0.0.1/ due to Exception: . "
            "Retrying after 0.2 seconds.",
        ),
    ]
    others = [
        ("error", "Got frame for closed channel 3: 'frame'"),
        (
            "error",
            "Reconnect attempt failed amqp://guest:******@127.0.0.1/ due to RuntimeError: "
            "PRECONDITION_FAILED. Retrying after 0.2 seconds.",
        ),
    ]
    expected = [echoes[0], others[0], echoes[1], others[1]] if level == "debug" else others
    assert [(r["level"], r["event"]) for r in records] == expected


async def test_metrics_count_real_deliveries_by_event_type_and_outcome(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
    exchange_name: str,
) -> None:
    queue = await bind_queue("#")
    async with start_bridge(konpro={"webhook_secret": SECRET}) as bridge:
        success = sample_body("avatar_video.success")
        assert await post(http, bridge, success, event_id="e1") == 200
        assert await post(http, bridge, success, event_id="e1") == 200  # KonPro's retry
        assert await post(http, bridge, sample_body("batch.finished")) == 200
        assert await post(http, bridge, success, secret="whsec_forged") == 401
        assert await post(http, bridge, b'{"event_type": "x"}') == 400
        samples = await scrape(http, bridge.url + "/metrics")

    def received(event_type: str, outcome: str) -> float:
        return value(samples, RECEIVED, event_type=event_type, outcome=outcome)

    assert received("avatar_video.success", "published") == 1
    assert received("avatar_video.success", "duplicate") == 1
    assert received("other", "published") == 1  # not a documented or configured type
    assert received("other", "rejected_signature") == 1
    assert received("other", "invalid") == 1
    published = value(samples, "konpro_bridge_events_published_total", exchange=exchange_name)
    assert published == 2
    assert value(samples, "konpro_bridge_publish_seconds_count") == 2
    assert value(samples, "konpro_bridge_broker_connected") == 1
    assert value(samples, "konpro_bridge_spool_depth") == 0
    assert math.isnan(value(samples, "konpro_bridge_registration_ok"))  # reconciliation is off
    assert len(await drain(queue, expect=2)) == 2


async def test_every_delivery_logs_one_line_saying_what_became_of_it(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    with structlog.testing.capture_logs() as logs:
        async with start_bridge(konpro={"webhook_secret": SECRET}) as bridge:
            assert (
                await post(http, bridge, sample_body("avatar_video.success"), event_id="e1") == 200
            )
            assert await post(http, bridge, sample_body("avatar_video.fail"), secret=None) == 401

    lines = [entry for entry in logs if entry["event"].startswith("webhook.")]
    accepted, rejected = lines
    assert accepted["event"] == "webhook.accepted"
    assert (accepted["event_type"], accepted["message_id"], accepted["outcome"]) == (
        "avatar_video.success",
        "e1",
        "published",
    )
    assert accepted["duration_ms"] >= 0
    assert (rejected["event"], rejected["status"], rejected["error"]) == (
        "webhook.rejected",
        401,
        "unauthorized",
    )
    assert rejected["log_level"] == "warning"


async def test_a_configured_event_type_keeps_its_own_label_in_the_metrics(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    # Labels are bounded to the documented types and konpro.events; any other type is "other".
    async with start_bridge(konpro={"events": ["instant_avatar.success"]}) as bridge:
        for event_type in ("instant_avatar.success", "photo_avatar_generation.success"):
            assert await post(http, bridge, sample_body(event_type), secret=None) == 200
        samples = await scrape(http, bridge.url + "/metrics")

    labelled = value(samples, RECEIVED, event_type="instant_avatar.success", outcome="published")
    assert (labelled, value(samples, RECEIVED, event_type="other", outcome="published")) == (1, 1)


async def test_the_operator_endpoints_answer_head_as_well_as_get(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    async with start_bridge() as bridge:
        for path in ("/healthz", "/readyz", "/status", "/metrics"):
            async with http.head(bridge.url + path) as response:
                assert response.status == 200, path


async def test_metrics_move_to_their_own_port_when_one_is_set(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    async with start_bridge(server={"metrics_port": port}) as bridge:
        samples = await scrape(http, f"http://127.0.0.1:{port}/metrics")
        async with http.get(bridge.url + "/metrics") as response:
            on_main_port = response.status

    assert value(samples, "konpro_bridge_broker_connected") == 1
    assert on_main_port == 405  # the main port answers only OPTIONS there


async def test_a_vhost_the_broker_does_not_have_is_named_in_the_reason(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """aiormq reports RabbitMQ's answer to an unknown vhost as a frame it did not expect:
    ``/readyz`` said ``Expected one of ['Connection.OpenOk'], got <Connection.Close object at
    0x7f...>``, naming neither the vhost nor the cause."""
    url = AMQP_URL.rstrip("/") + "/no-such-vhost%2Fhere"
    async with start_bridge(wait_ready=False, amqp={"url": url}) as bridge:
        reason = ""

        async def first_attempt_failed() -> bool:
            nonlocal reason
            async with http.get(bridge.url + "/readyz") as response:
                reason = str((await response.json())["reason"])
            return reason != "connecting to the broker"

        await eventually(first_attempt_failed)

    assert reason == (
        "cannot connect to the broker: the broker closed the connection as it was opened: most "
        "likely the vhost 'no-such-vhost/here' (the path of amqp.url, / is %2F) does not exist, "
        "or the user may not use it"
    )


async def test_status_follows_the_broker_link_and_the_spool(
    start_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    async with start_bridge(amqp={"url": proxied_amqp_url(broker_proxy)}) as bridge:
        up = await status(http, bridge)

        await broker_proxy.cut()
        await eventually(lambda: not bridge.publisher.is_ready)
        assert await post(http, bridge, sample_body("avatar_video.fail"), secret=None) == 202
        down = await status(http, bridge)
        metrics_down = await scrape(http, bridge.url + "/metrics")

        await broker_proxy.restore()
        await eventually(lambda: bridge.spool.depth == 0)
        again = await status(http, bridge)

    assert up["broker"]["connected"] is True
    assert up["broker"]["reason"] is None
    assert up["spool"] == {
        "depth": 0,
        "parked": 0,
        "bytes": 0,
        "oldest_age": None,
        "refusing": None,
    }
    assert up["registration"]["enabled"] is False
    assert up["version"]

    assert down["broker"]["connected"] is False
    assert "broker" in down["broker"]["reason"]
    assert _when(down["broker"]["since"]) > _when(up["broker"]["since"])
    assert down["spool"]["depth"] == 1
    assert down["spool"]["oldest_age"] >= 0
    assert value(metrics_down, "konpro_bridge_broker_connected") == 0
    assert value(metrics_down, "konpro_bridge_spool_depth") == 1
    assert value(metrics_down, RECEIVED, event_type="avatar_video.fail", outcome="spooled") == 1

    assert again["broker"]["connected"] is True
    assert _when(again["broker"]["since"]) > _when(down["broker"]["since"])  # microseconds
    assert again["spool"]["depth"] == 0


def _when(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso)


async def test_status_and_metrics_report_the_registration_checks(
    start_bridge: BridgeFactory, fake_konpro: FakeKonPro, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    konpro = {
        "api_url": fake_konpro.url,
        "api_key": fake_konpro.api_key,
        "public_url": f"http://127.0.0.1:{port}/webhooks/konpro",
    }
    reconcile = {"enabled": True, "interval": 1.0, "max_backoff": 1.0}
    async with start_bridge(server={"port": port}, konpro=konpro, reconcile=reconcile) as bridge:
        await eventually(lambda: bridge.last_registration() is not None)
        added = await status(http, bridge)
        first_metrics = await scrape(http, bridge.url + "/metrics")
        await eventually(lambda: _result(bridge) == "ok")
        later_metrics = await scrape(http, bridge.url + "/metrics")

    [endpoint_id] = fake_konpro.endpoints
    assert added["registration"]["enabled"] is True
    assert added["registration"]["result"] == "added"
    assert added["registration"]["ok"] is True
    assert added["registration"]["endpoint_id"] == endpoint_id
    assert added["registration"]["error"] is None
    assert _when(added["registration"]["checked_at"]) <= dt.datetime.now(dt.UTC)
    assert value(first_metrics, "konpro_bridge_registration_ok") == 1
    assert value(first_metrics, "konpro_bridge_reconcile_runs_total", result="added") == 1
    assert value(later_metrics, "konpro_bridge_reconcile_runs_total", result="ok") >= 1


async def test_status_says_why_registration_is_not_checked(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    async with start_bridge(reconcile={"enabled": True}) as bridge:
        answer = await status(http, bridge)

    assert answer["registration"] == {"enabled": False, "reason": "konpro.api_key is not set"}


def _result(bridge: Bridge) -> str | None:
    result = bridge.last_registration()
    return None if result is None else result.kind


async def test_a_spooled_event_the_broker_keeps_refusing_is_named_in_the_forwarders_log_line(
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    """One consumer's queue is full and refuses publishes (``x-overflow: reject-publish``):
    the forwarder's failure line names the event and its type, the routing key that leads to
    that queue, and the broker's reason rather than an exception's repr."""
    await bind_queue("avatar_video.fail", arguments=FULL_AT_ONE)
    with capture_logs() as logs:
        async with start_bridge() as bridge:
            assert (
                await post_status(http, bridge.webhook_url, envelope("fills", "avatar_video.fail"))
                == 200
            )
            refused = envelope("refused", "avatar_video.fail")
            assert await post_status(http, bridge.webhook_url, refused) == 202
            await eventually(lambda: bool(seen(logs, "spool.forward_failed")), within=10)
            assert bridge.spool.depth == 1
            (accepted,) = (
                entry for entry in seen(logs, "webhook.accepted") if entry["outcome"] == "spooled"
            )
    (failure, *_) = seen(logs, "spool.forward_failed")
    assert failure.get("message_id") == accepted["message_id"]
    assert failure.get("event_type") == "avatar_video.fail"
    assert failure["error"].startswith("broker refused the message"), failure["error"]


async def test_status_says_why_the_spool_refuses_deliveries(
    start_bridge_cut_off: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """The broker is away and the spool's disk nearly full: every delivery gets 503, and
    ``/status``, the page an operator looks at first, says why."""
    spool = {"min_free_bytes": 2**60}  # more than any disk has free: "nearly full" at once
    async with start_bridge_cut_off(spool=spool) as bridge:
        assert await post_status(http, bridge.webhook_url, envelope("no-room")) == 503
        async with http.get(bridge.url + "/status") as response:
            status = await response.json()
    assert status["broker"]["connected"] is False
    assert status["spool"]["refusing"].startswith("disk nearly full"), status["spool"]


async def test_status_says_whether_this_workers_own_spool_refuses_not_a_left_behind_one(
    tmp_path: Path,
) -> None:
    """`spool.refusing` tells why deliveries are answered 503: only the spool they go to (this
    worker's own, the first) decides that. A left-behind spool being forwarded, full to its
    limit, takes no delivery and refuses none."""
    limits = SpoolSettings(path=tmp_path / "spool", max_events=1)
    async with (
        await Spool.open(limits) as own,
        await Spool.open(limits.at(tmp_path / "spool" / "worker-1")) as left_behind,
    ):
        await left_behind.append(delivery(0))
        assert left_behind.why_full() is not None
        report = StatusReport(
            Publisher(AmqpSettings()), lambda: [own, left_behind], BodiesInFlight(1 << 20)
        )

        spool = (await report.collect())["spool"]
        assert (spool["depth"], spool["refusing"]) == (1, None)

        await own.append(delivery(1))
        spool = (await report.collect())["spool"]
        assert spool["depth"] == 2
        assert spool["refusing"] is not None
        assert spool["refusing"].startswith("spool full")
