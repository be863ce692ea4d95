"""A forged or replayed delivery never reaches the bus; a signed one from KonPro always does."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from bridge.app import Bridge, StartupError
from bridge.replay_mesh import ReplayMesh
from bridge.signatures import sign
from tests.fake_konpro import FakeKonPro
from tests.support.deliveries import JSON, envelope, post_status
from tests.support.harness import (
    BridgeFactory,
    QueueFactory,
    drain,
    make_settings,
    process_sections,
)
from tests.support.observing import seen
from tests.support.process import BridgeProcess, free_port
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytest_plugins = ("tests.fake_konpro",)

SECRET = "whsec_current_3b9f"
OLD_SECRET = "whsec_previous_77aa"
BODY = orjson.dumps({"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}})
OTHER_BODY = orjson.dumps({"event_type": "avatar_video.success", "event_data": {"video_id": "v2"}})


def signed(body: bytes, secret: str = SECRET, header: str = "KonPro-Signature") -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        header: sign(body, secret),
        "KonPro-Timestamp": str(int(time.time())),
        "KonPro-Event-Id": uuid.uuid4().hex,
    }


async def post(
    http: aiohttp.ClientSession, bridge: Bridge, headers: dict[str, str], body: bytes = BODY
) -> tuple[int, dict[str, str]]:
    url = bridge.webhook_url
    async with http.post(url, data=body, headers=headers) as response:
        return response.status, await response.json()


SIGNED = {"konpro": {"webhook_secret": SECRET, "previous_webhook_secrets": [OLD_SECRET]}}


@pytest.mark.parametrize("header", ["KonPro-Signature", "Signature"])
async def test_a_delivery_signed_with_the_secret_is_accepted_under_either_header_name(
    header: str, start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    async with start_bridge(**SIGNED) as bridge:
        assert (await post(http, bridge, signed(BODY, header=header)))[0] == 200
    assert [m.body for m in await drain(queue, expect=1)] == [BODY]


async def test_forgeries_get_a_bare_401_a_log_line_and_never_reach_the_bus(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    other_body = BODY.replace(b"v1", b"v2")
    unsigned = {"Content-Type": "application/json"}
    forgeries = {
        "unsigned": unsigned,
        "wrong secret": signed(BODY, "whsec_guess"),
        "signature of another body": signed(other_body),
        "not hex": {**unsigned, "KonPro-Signature": "z" * 64},
        "stale timestamp": {**signed(BODY), "KonPro-Timestamp": str(int(time.time()) - 3600)},
        "future timestamp": {**signed(BODY), "KonPro-Timestamp": str(int(time.time()) + 3600)},
    }
    async with start_bridge(**SIGNED) as bridge:
        with structlog.testing.capture_logs() as logs:
            answers = {
                name: await post(http, bridge, headers) for name, headers in forgeries.items()
            }

    assert answers == dict.fromkeys(forgeries, (401, {"error": "unauthorized"}))
    reasons = [line["detail"] for line in logs if line["event"] == "webhook.rejected"]
    assert len(reasons) == len(forgeries)
    assert "signature mismatch" in reasons
    assert any(reason.startswith("stale timestamp") for reason in reasons)
    assert await drain(queue, expect=0) == []


async def test_during_a_rotation_both_the_new_and_the_previous_secret_are_accepted(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    async with start_bridge(**SIGNED) as bridge:
        assert (await post(http, bridge, signed(BODY, SECRET)))[0] == 200
        assert (await post(http, bridge, signed(OTHER_BODY, OLD_SECRET), OTHER_BODY))[0] == 200
        assert (await post(http, bridge, signed(BODY, "whsec_retired_long_ago")))[0] == 401
    assert len(await drain(queue, expect=2)) == 2


async def test_a_replayed_event_id_is_answered_2xx_and_published_only_once(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    headers = signed(BODY)
    async with start_bridge(**SIGNED) as bridge:
        first = await post(http, bridge, headers)
        replay = await post(http, bridge, headers)

    assert (first[0], first[1]["outcome"]) == (200, "published")
    assert (replay[0], replay[1]["outcome"]) == (200, "duplicate")
    assert len(await drain(queue, expect=1)) == 1


async def test_a_capture_replayed_with_a_fresh_event_id_and_timestamp_is_not_published_again(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    # The signature covers the body alone: whoever replays a captured delivery can put any
    # KonPro-Event-Id and KonPro-Timestamp beside it, or leave them out.
    queue = await bind_queue("#")
    captured = signed(BODY)
    fresh_id = {**captured, "KonPro-Event-Id": uuid.uuid4().hex}
    no_id = {key: value for key, value in captured.items() if key != "KonPro-Event-Id"}
    async with start_bridge(**SIGNED) as bridge:
        outcomes = [
            (await post(http, bridge, h))[1]["outcome"] for h in (captured, fresh_id, no_id)
        ]

    assert outcomes == ["published", "duplicate", "duplicate"]
    assert len(await drain(queue, expect=1)) == 1


async def test_a_secret_learnt_at_run_time_is_enforced_from_then_on(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    async with start_bridge() as bridge:
        assert (await post(http, bridge, {"Content-Type": "application/json"}))[0] == 200
        bridge.use_webhook_secret(SECRET)
        assert (await post(http, bridge, {"Content-Type": "application/json"}))[0] == 401
        assert (await post(http, bridge, signed(OTHER_BODY), OTHER_BODY))[0] == 200
    assert len(await drain(queue, expect=2)) == 2


async def test_a_secret_kept_by_reconciliation_is_used_at_start(
    tmp_path: Path,
    exchange_name: str,
    start_bridge: BridgeFactory,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "webhook_secret").write_text(SECRET)
    (spool / "webhook_secret").chmod(0o600)
    async with start_bridge() as bridge:
        assert (await post(http, bridge, {"Content-Type": "application/json"}))[0] == 401
        assert (await post(http, bridge, signed(BODY)))[0] == 200
    assert len(await drain(queue, expect=1)) == 1


async def test_require_signature_without_a_secret_refuses_to_start(
    tmp_path: Path, exchange_name: str
) -> None:
    settings = make_settings(tmp_path, exchange_name, konpro={"require_signature": True})
    with pytest.raises(StartupError, match="webhook_secret"):
        await Bridge(settings).start()


async def test_require_signature_with_a_secret_registration_will_learn_refuses_all_until_then(
    start_bridge: BridgeFactory, fake_konpro: FakeKonPro, http: aiohttp.ClientSession
) -> None:
    """A bridge that registers itself learns its secret from ``endpoint.add``; before, with
    ``require_signature`` it refused to start ("no webhook secret is known") and so could never
    learn one: an operator had to choose between the two. Now it starts, refuses every delivery
    401 until it knows the secret, and enforces the secret it learns."""
    port = free_port()
    konpro = {
        "api_url": fake_konpro.url,
        "api_key": fake_konpro.api_key,
        "public_url": f"http://127.0.0.1:{port}/webhooks/konpro",
        "require_signature": True,
    }
    fake_konpro.answer_next(1, 503)  # the first registration fails: no secret for a while
    reconcile = {"enabled": True, "interval": 1.0, "max_backoff": 1.0}
    unsigned = {"Content-Type": "application/json"}
    with structlog.testing.capture_logs() as logs:
        async with start_bridge(server={"port": port}, konpro=konpro, reconcile=reconcile) as b:
            before, _ = await post(http, b, unsigned)
            await eventually(lambda: b.authenticator.enabled)
            after_unsigned, _ = await post(http, b, unsigned)
            learnt = fake_konpro.issued_secrets[-1]
            signed_with_it, _ = await post(http, b, signed(BODY, learnt))

    assert (before, after_unsigned, signed_with_it) == (401, 401, 200)
    assert "bridge.signatures_awaited" in [entry["event"] for entry in logs]


async def test_a_copy_arriving_while_the_first_is_still_being_taken_is_not_taken_again(
    start_proxied_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    async with start_proxied_bridge(amqp={"publish_timeout": 3.0}, **SIGNED) as bridge:
        headers = signed(BODY)
        broker_proxy.hold()  # a confirm that does not come: the first copy is held 3 s
        first = asyncio.create_task(post(http, bridge, headers))
        await asyncio.sleep(0.5)  # overlap either way: the first cannot be done before 3 s
        second = await post(http, bridge, headers)  # a replay, or KonPro retrying
        answers = sorted([await first, second], key=lambda answer: answer[0])
        spooled = bridge.spool.depth  # while still held: the forwarder cannot have drained it
        broker_proxy.release()

    assert [(status, body["outcome"]) for status, body in answers] == [
        (200, "duplicate"),
        (202, "spooled"),
    ]
    assert spooled == 1  # one copy kept, not two


async def test_a_copy_waiting_on_a_first_copy_that_is_refused_is_refused_too(
    start_proxied_bridge: BridgeFactory, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    # Neither broker nor spool takes the first copy (503): the second must not be told it was.
    async with start_proxied_bridge(
        amqp={"publish_timeout": 1.0}, spool={"max_events": 1}, **SIGNED
    ) as bridge:
        broker_proxy.hold()  # confirms stop coming: each publish takes its whole timeout
        assert (await post(http, bridge, signed(OTHER_BODY), OTHER_BODY))[0] == 202  # spool full
        headers = signed(BODY)
        first = asyncio.create_task(post(http, bridge, headers))
        await asyncio.sleep(0.3)  # overlap: the first cannot be done before 1 s
        second = await post(http, bridge, headers)
        answers = [await first, second]
        broker_proxy.release()

    assert [status for status, _ in answers] == [503, 503]


async def test_a_delivery_refused_with_503_is_taken_when_konpro_retries_it(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
) -> None:
    # A 503 promises nothing, so the replay memory must not remember the body: KonPro's retry
    # would otherwise be answered "duplicate", and the event lost.
    queue = await bind_queue("#")
    async with start_proxied_bridge(spool={"max_events": 1}, **SIGNED) as bridge:
        await broker_proxy.cut()
        await eventually(lambda: not bridge.publisher.is_ready)
        assert (await post(http, bridge, signed(OTHER_BODY), OTHER_BODY))[0] == 202
        assert (await post(http, bridge, signed(BODY)))[0] == 503  # the spool is full
        await broker_proxy.restore()
        await eventually(lambda: bridge.publisher.is_ready and bridge.spool.depth == 0)

        status, answer = await post(http, bridge, signed(BODY))  # KonPro's retry

    assert (status, answer["outcome"]) == (200, "published")
    assert sorted(m.body for m in await drain(queue, expect=2)) == sorted([BODY, OTHER_BODY])


@pytest.mark.parametrize("secret", [None, SECRET], ids=["no secret", "a secret"])
async def test_a_bridge_without_a_secret_says_at_start_that_signatures_are_off(
    start_bridge: BridgeFactory, secret: str | None
) -> None:
    konpro = {} if secret is None else {"webhook_secret": secret}
    with structlog.testing.capture_logs() as logs:
        async with start_bridge(konpro=konpro):
            pass

    off = [entry for entry in logs if entry["event"] == "bridge.signatures_off"]
    assert [entry["log_level"] for entry in off] == (["warning"] if secret is None else [])


async def test_the_replay_window_and_memory_size_are_those_configured(
    start_bridge: BridgeFactory, bind_queue: QueueFactory, http: aiohttp.ClientSession
) -> None:
    queue = await bind_queue("#")
    for konpro in ({"replay_window": 0}, {"replay_cache_size": 0}):  # either turns it off
        async with start_bridge(konpro=konpro) as bridge:
            unsigned = {"Content-Type": "application/json"}
            outcomes = [(await post(http, bridge, unsigned))[1]["outcome"] for _ in range(2)]
        assert outcomes == ["published", "published"], konpro
    assert len(await drain(queue, expect=4)) == 4


async def test_the_timestamp_tolerance_is_the_one_configured(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    konpro = {**SIGNED["konpro"], "timestamp_tolerance": 5.0}
    async with start_bridge(konpro=konpro) as bridge:
        ten_seconds_old = {**signed(BODY), "KonPro-Timestamp": str(int(time.time()) - 10)}
        status, _ = await post(http, bridge, ten_seconds_old)  # within the default 300 s

    assert status == 401


def lines_of(log: str, event: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [entry for entry in entries if entry.get("event") == event]


async def test_a_capture_replayed_to_another_worker_is_not_published_again(
    tmp_path: Path, exchange_name: str, bind_queue: QueueFactory
) -> None:
    """With ``server.workers = 2`` the kernel hands each connection to either worker; each
    tells the other what it took, so a replay is a duplicate wherever it lands."""
    queue = await bind_queue("#")
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp={"reconnect_interval": 0.2},
        server={"workers": 2},
        konpro=SIGNED["konpro"],
    )
    outcomes = []
    async with BridgeProcess(tmp_path, sections) as bridge:
        await eventually(lambda: len(lines_of(bridge.log(), "bridge.listening")) == 2)
        connector = aiohttp.TCPConnector(force_close=True)  # a connection each: both workers
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(40):  # until the kernel has handed copies to both workers
                headers = signed(BODY)  # a fresh event id and timestamp each time
                async with http.post(bridge.webhook_url, data=BODY, headers=headers) as response:
                    outcomes.append((response.status, (await response.json())["outcome"]))
                await asyncio.sleep(0.02)  # the answer's log line written
                accepted = lines_of(bridge.log(), "webhook.accepted")
                if {entry["worker"] for entry in accepted} == {0, 1}:
                    break

    assert {entry["worker"] for entry in accepted} == {0, 1}, "both workers answered"
    assert outcomes[0] == (200, "published")
    assert set(outcomes[1:]) == {(200, "duplicate")}
    assert len(await drain(queue, expect=1)) == 1


async def test_workers_hear_each_others_keys_and_one_that_is_not_listening_holds_up_none() -> None:
    """A worker being started again reads nothing for a while: its siblings go on, and only
    the keys sent meanwhile miss it (at most a duplicate published, never a delivery held)."""
    mesh = ReplayMesh(3)
    links = [mesh.link(index) for index in range(3)]
    heard: list[list[str]] = [[], [], []]
    try:
        for index in (0, 1):  # worker 2 is not listening
            links[index].listen(heard[index].append)
        keys = [f"{n:064x}" for n in range(5_000)]  # more than worker 2's inbox holds
        for turn in range(0, len(keys), 100):  # 100 deliveries taken in each loop turn
            for key in keys[turn : turn + 100]:
                links[0].tell(key)
            await asyncio.sleep(0.001)
        await eventually(lambda: len(heard[1]) == len(keys))
    finally:
        for link in links:
            link.close()
        mesh.close()

    assert heard[1] == keys
    assert heard[0] == []  # a worker is not told its own keys
    assert links[0].missed > 0


async def test_require_signature_with_a_reconciler_in_verify_mode_refuses_to_start(
    tmp_path: Path, exchange_name: str, fake_konpro: FakeKonPro
) -> None:
    """Verify mode stores no secret: the bridge could never learn one, and would refuse every
    delivery for ever."""
    konpro = {
        "api_url": fake_konpro.url,
        "api_key": fake_konpro.api_key,
        "public_url": "https://hooks.example.com/webhooks/konpro",
        "require_signature": True,
    }
    reconcile = {"enabled": True, "mode": "verify"}
    settings = make_settings(tmp_path, exchange_name, konpro=konpro, reconcile=reconcile)
    with pytest.raises(StartupError, match="webhook_secret"):
        await Bridge(settings).start()


async def test_a_delivery_refused_401_can_be_matched_with_the_one_konpro_reports(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """The refusal's line carries the event id the delivery came with: not signed, it proves
    nothing, but it matches the refusal with KonPro's list of failed deliveries."""
    body = envelope("rotated")
    headers = {
        **JSON,
        "KonPro-Event-Id": "evt_hunt_obs_401",
        "KonPro-Signature": sign(body, "whsec_the_old_secret_nobody_configured_0000"),
    }
    with capture_logs() as logs:
        async with start_bridge(konpro={"webhook_secret": SECRET}) as bridge:
            assert await post_status(http, bridge.webhook_url, body, headers) == 401
    (line,) = seen(logs, "webhook.rejected")
    assert line["detail"] == "signature mismatch"
    assert "evt_hunt_obs_401" in line.values(), f"nothing names the refused delivery: {line}"


async def test_with_a_secret_an_unsigned_body_is_refused_401_before_it_is_read_as_json(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """With a webhook secret, the signature is checked first: an unsigned body gets the bare 401
    whatever it holds, so that a stranger learns nothing of the envelope check from the answer,
    and cannot make the bridge read bodies the slow way (the standard library's parser, for one
    that msgspec refuses or that may name a key twice: "with a webhook secret, only signed
    ones")."""
    bodies = [
        b"not json",
        b'{"event_type": "a.fail", "event_type": "a.success", "event_data": {}}',
        b'{"event_type": "a.b", "event_data": {"title": "\\ud83d"}, "x": '
        + b"[" * 500
        + b"]" * 500
        + b"}",
    ]
    answers = []
    with capture_logs() as logs:
        async with start_bridge(konpro={"webhook_secret": SECRET}) as bridge:
            for body in bodies:
                async with http.post(bridge.webhook_url, data=body, headers=JSON) as response:
                    answers.append((response.status, await response.json()))
    assert answers == [(401, {"error": "unauthorized"})] * len(bodies)
    assert [line["detail"] for line in seen(logs, "webhook.rejected")] == [
        "missing signature"
    ] * len(bodies)
