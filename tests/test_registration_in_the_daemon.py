"""The running bridge keeps itself registered with KonPro, and KonPro's API never gets in the way.

Each bridge here is registered under its own address, so the fake KonPro's OPTIONS check goes to
the real bridge: a registration only succeeds while the bridge is listening.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from bridge.app import Bridge
from bridge.config import MASK
from bridge.konpro import KonProClient
from bridge.logs import redactor
from bridge.reconcile import Reconciler, ReconcileResult
from bridge.secret_file import load_stored_secret
from bridge.signatures import sign
from tests.fake_konpro import FakeKonPro
from tests.support.harness import (
    BridgeFactory,
    QueueFactory,
    drain,
    make_settings,
    proxied_amqp_url,
)
from tests.support.observing import seen, shown
from tests.support.process import free_port
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytest_plugins = ("tests.fake_konpro",)

INTERVAL = 1.0  # the shortest interval the settings allow
Starter = Callable[..., AbstractAsyncContextManager[Bridge]]
JSON = {"Content-Type": "application/json"}
EVENT = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'


def registration(fake: FakeKonPro, *, api_key: str | None = None) -> dict[str, dict[str, Any]]:
    """Settings sections for a bridge that registers its own address with ``fake``."""
    port = free_port()
    return {
        "server": {"port": port},
        "konpro": {
            "api_url": fake.url,
            "api_key": api_key or fake.api_key,
            "public_url": f"http://127.0.0.1:{port}/webhooks/konpro",
            "request_timeout": 5.0,
        },
        "reconcile": {"enabled": True, "interval": INTERVAL, "max_backoff": INTERVAL},
    }


def result_of(bridge: Bridge) -> ReconcileResult | None:
    assert bridge.reconciler is not None
    return bridge.reconciler.last_result


async def until(condition: Callable[[], object], within: float = 10.0) -> None:
    """Wait for ``condition`` to hold; the bound only turns a hang into a failure."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the fake and the bridge expose state, not events
            await asyncio.sleep(0.02)


async def post_event(http: aiohttp.ClientSession, bridge: Bridge, body: bytes = EVENT) -> int:
    headers = {"Content-Type": "application/json"}
    async with http.post(bridge.webhook_url, data=body, headers=headers) as response:
        return response.status


@pytest.fixture
def start(start_bridge: BridgeFactory, fake_konpro: FakeKonPro) -> Starter:
    """Starts a bridge that registers its own address with the fake KonPro."""

    def start(*, api_key: str | None = None) -> AbstractAsyncContextManager[Bridge]:
        return start_bridge(**registration(fake_konpro, api_key=api_key))

    return start


async def test_a_started_bridge_registers_its_url_once_after_it_listens(
    start: Starter, fake_konpro: FakeKonPro
) -> None:
    async with start() as bridge:
        public_url = bridge.settings.konpro.public_url
        await until(lambda: result_of(bridge) is not None)
        first = result_of(bridge)
        await until(lambda: result_of(bridge) is not first)  # a second run has seen it

        assert first is not None
        assert first.kind == "added"
        assert fake_konpro.verified_urls == [public_url]  # the first OPTIONS check passed
        [registered] = fake_konpro.endpoints.values()
        assert (registered["url"], registered["endpoint_id"]) == (public_url, first.endpoint_id)
        assert [call.name for call in fake_konpro.writes] == ["endpoint.add"]
        latest = result_of(bridge)
        assert latest is not None
        assert (latest.kind, latest.endpoint_id) == ("ok", first.endpoint_id)


async def test_an_endpoint_deleted_elsewhere_is_registered_again(
    start: Starter, fake_konpro: FakeKonPro
) -> None:
    async with start() as bridge:
        await until(lambda: fake_konpro.endpoints)
        [first_id] = fake_konpro.endpoints
        fake_konpro.delete(first_id)

        await until(lambda: fake_konpro.endpoints)

        [again] = fake_konpro.endpoints.values()
        assert again["endpoint_id"] != first_id
        assert again["url"] == bridge.settings.konpro.public_url
        assert fake_konpro.count("endpoint.add") == 2


async def test_a_learnt_signing_secret_is_kept_masked_and_enforced_at_once(
    tmp_path: Path, exchange_name: str, fake_konpro: FakeKonPro, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path, exchange_name, **registration(fake_konpro))
    async with Bridge(settings) as bridge:
        await asyncio.wait_for(bridge.publisher.until_ready(), 10)
        await until(lambda: bridge.authenticator.enabled)
        [registered] = fake_konpro.endpoints.values()
        url = bridge.webhook_url
        unsigned = {"Content-Type": "application/json"}
        async with http.post(url, data=EVENT, headers=unsigned) as response:
            assert response.status == 401
        signed = {**unsigned, "KonPro-Signature": sign(EVENT, registered["secret"])}
        async with http.post(url, data=EVENT, headers=signed) as response:
            assert response.status == 200

    secret_file = settings.spool.path / "webhook_secret"
    assert secret_file.read_text().strip() == registered["secret"]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert redactor(f"signed with {registered['secret']}") == f"signed with {MASK}"


async def test_a_learnt_secret_replaced_by_a_new_registration_no_longer_passes(
    tmp_path: Path, exchange_name: str, fake_konpro: FakeKonPro, http: aiohttp.ClientSession
) -> None:
    """The endpoint deleted in the dashboard (its secret leaked, say) and registered again:
    KonPro issues a new secret, and a delivery signed with the old one is forged."""
    settings = make_settings(tmp_path, exchange_name, **registration(fake_konpro))
    async with Bridge(settings) as bridge:
        await asyncio.wait_for(bridge.publisher.until_ready(), 10)
        await until(lambda: bridge.authenticator.enabled)
        [(first_id, first)] = fake_konpro.endpoints.items()
        fake_konpro.delete(first_id)
        await until(lambda: fake_konpro.endpoints)
        [second] = fake_konpro.endpoints.values()
        assert second["secret"] != first["secret"]
        ran = result_of(bridge)
        await until(lambda: result_of(bridge) is not ran)  # a run after the one that stored it

        statuses = []
        for secret, video in ((first["secret"], "v1"), (second["secret"], "v2")):
            body = EVENT.replace(b'"v1"', f'"{video}"'.encode())
            headers = {"Content-Type": "application/json", "KonPro-Signature": sign(body, secret)}
            async with http.post(bridge.webhook_url, data=body, headers=headers) as response:
                statuses.append(response.status)

    assert statuses == [401, 200]


async def test_a_secret_an_operator_registered_meanwhile_is_enforced_at_the_next_run(
    tmp_path: Path, exchange_name: str, fake_konpro: FakeKonPro, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(tmp_path, exchange_name, **registration(fake_konpro))
    async with Bridge(settings) as bridge:
        await until(lambda: bridge.authenticator.enabled)
        ran = result_of(bridge)
        await until(lambda: result_of(bridge) is not ran)  # the next run is an interval away
        fake_konpro.endpoints.clear()  # deleted in the dashboard, and registered again by
        # what `konpro-bridge reconcile --once` does, beside the running daemon:
        async with KonProClient(fake_konpro.url, settings.konpro.api_key) as client:
            operators_run = await Reconciler.from_settings(client, settings).run_once()
        assert (operators_run.kind, operators_run.secret_stored) == ("added", True)
        [registered] = fake_konpro.endpoints.values()
        ran = result_of(bridge)
        await until(lambda: result_of(bridge) is not ran)

        signed = {"KonPro-Signature": sign(EVENT, registered["secret"])}
        async with http.post(bridge.webhook_url, data=EVENT, headers=signed) as response:
            assert response.status == 200
        assert [call.name for call in fake_konpro.writes] == ["endpoint.add"] * 2


@pytest.mark.parametrize("failure", ["HTTP 500", "no answer"])
async def test_webhooks_are_accepted_while_the_konpro_api_fails(
    start: Starter,
    fake_konpro: FakeKonPro,
    bind_queue: QueueFactory,
    http: aiohttp.ClientSession,
    failure: str,
) -> None:
    queue = await bind_queue("#")
    if failure == "HTTP 500":
        fake_konpro.answer_next(1000, 500)
    else:
        fake_konpro.hang_next(1000)

    async with start() as bridge:
        await until(lambda: fake_konpro.calls)  # reconciliation is under way, and failing
        events = [EVENT.replace(b'"v1"', b'"v%d"' % n) for n in range(3)]
        statuses = [await post_event(http, bridge, event) for event in events]

    assert statuses == [200] * 3
    assert [message.body for message in await drain(queue, expect=3)] == events
    assert fake_konpro.endpoints == {}


async def test_a_refused_api_key_is_one_clear_log_line_and_no_hot_loop(
    start: Starter,
    fake_konpro: FakeKonPro,
    http: aiohttp.ClientSession,
) -> None:
    with capture_logs() as logs:
        async with start(api_key="revoked-key-4411") as bridge:
            await until(lambda: result_of(bridge) is not None)
            await asyncio.sleep(2 * INTERVAL)  # a window with room for about three runs
            calls_in_window = len(fake_konpro.calls)
            status = await post_event(http, bridge)

    assert calls_in_window <= 3  # one call per run, runs an interval apart: never retried early
    refusals = [entry for entry in logs if entry["event"] == "reconcile.authentication_failed"]
    assert len(refusals) == 1
    assert "API key" in refusals[0]["error"]
    assert "revoked-key-4411" not in repr(logs)
    assert status == 200


async def test_the_start_log_says_why_reconciliation_is_off(
    start_bridge: BridgeFactory,
) -> None:
    with capture_logs() as logs:
        async with start_bridge() as bridge:
            assert bridge.reconciler is None

    [off] = [entry for entry in logs if entry["event"] == "reconcile.off"]
    assert off["reason"] == "reconcile.enabled is false"


async def test_a_stop_while_konpro_registers_the_url_keeps_the_secret_it_answers(
    start_bridge: BridgeFactory,
    fake_konpro: FakeKonPro,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop soon after start (a rollout aborted) can meet the first registration after
    KonPro checked the URL. The answer is the only time KonPro tells the endpoint's secret
    (``endpoint.list`` may answer ``null``), and KonPro keeps the endpoint: thrown away, nobody
    could check signatures again. The stop waits for that answer, and stores the secret."""
    fake_konpro.list_secrets = False
    fake_konpro.registration_delay = 1.0  # KonPro writing it, after the check
    async with start_bridge(**registration(fake_konpro)):
        await until(lambda: fake_konpro.verified_urls)
        await asyncio.sleep(0.2)  # the OPTIONS check has passed; the registration is in flight

    assert fake_konpro.registered
    endpoint = fake_konpro.endpoints[fake_konpro.registered[0]]
    assert load_stored_secret(tmp_path / "spool") == endpoint["secret"]


async def test_a_registration_let_finish_at_a_stop_leaves_the_deliveries_their_grace(
    *,
    tmp_path: Path,
    exchange_name: str,
    bind_queue: QueueFactory,
    broker_proxy: TcpProxy,
    fake_konpro: FakeKonPro,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stop first waits for a registration in flight; the deliveries' grace starts only
    when the site closes, so one whose confirm is a second or two away is still published."""
    queue = await bind_queue("#")
    fake_konpro.registration_delay = 4.5  # KonPro writing it, after the check
    sections = registration(fake_konpro)
    sections["server"]["shutdown_timeout"] = 3.0
    sections["amqp"] = {"url": proxied_amqp_url(broker_proxy)}
    bridge = Bridge(make_settings(tmp_path, exchange_name, **sections))
    await bridge.start()
    stopping: asyncio.Task[None] | None = None
    try:
        await asyncio.wait_for(bridge.publisher.until_ready(), 10)
        await until(lambda: fake_konpro.verified_urls)
        await asyncio.sleep(0.2)  # the registration is in flight for 4.3 s more
        url = bridge.webhook_url
        with capture_logs() as logs:
            stopping = asyncio.create_task(bridge.stop())
            await asyncio.sleep(3.5)  # past the grace: the stop still waits for KonPro
            broker_proxy.delay = 1.0  # this delivery's confirm comes some 2 s after it
            body = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "late"}}'
            async with http.post(url, data=body, headers=JSON) as response:
                status = response.status
            await asyncio.wait_for(stopping, 20)
    finally:
        if stopping is None:
            await bridge.stop()
        broker_proxy.delay = 0.0

    abandoned = [entry for entry in logs if entry["event"] == "bridge.confirms_abandoned"]
    assert (status, abandoned) == (200, [])
    assert [m.body for m in await drain(queue, expect=1)] == [body]


async def test_a_secret_answered_during_a_stop_that_cannot_be_stored_is_logged(
    start_bridge: BridgeFactory, fake_konpro: FakeKonPro, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the stop waited for fails (a full disk): said as any run says it, not dropped."""
    fake_konpro.list_secrets = False
    fake_konpro.registration_delay = 1.0  # KonPro writing it, after the check

    def disk_full(*_: object) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("bridge.reconcile.store_secret", disk_full)
    with capture_logs() as logs:
        async with start_bridge(**registration(fake_konpro)):
            await until(lambda: fake_konpro.verified_urls)
            await asyncio.sleep(0.2)  # the registration is in flight: the stop begins

    assert fake_konpro.registered  # KonPro answered, with the secret
    events = [entry["event"] for entry in logs]
    assert "reconcile.secret_store_failed" in events, events


@pytest.mark.parametrize("status", [503, 401])
async def test_a_registration_check_that_works_again_after_failures_says_so(
    start_bridge: BridgeFactory, fake_konpro: FakeKonPro, status: int
) -> None:
    """After failed checks (a 503 at each call, or a refused key) the run that finds the
    registration right again says so, at the level the failures were told at: else the log
    ends on the failure, and nothing tells that it is over."""
    port = free_port()
    public_url = f"http://127.0.0.1:{port}/webhooks/konpro"
    endpoint_id = fake_konpro.add(public_url, ["avatar_video.success", "avatar_video.fail"])
    secret = fake_konpro.endpoints[endpoint_id]["secret"]
    sections: dict[str, Any] = {
        "server": {"port": port},
        "konpro": {
            "api_url": fake_konpro.url,
            "api_key": fake_konpro.api_key,
            "public_url": public_url,
            "webhook_secret": secret,
            "request_timeout": 5.0,
        },
        "reconcile": {"enabled": True, "interval": 1.0, "max_backoff": 1.0},
    }
    results: list[ReconcileResult] = []
    with capture_logs() as logs:
        # a few runs' worth, with the client's own retries (a refused key is not retried)
        fake_konpro.answer_next(12 if status == 503 else 2, status)
        async with start_bridge(**sections) as bridge:
            assert bridge.reconciler is not None

            def ok_after_failing() -> bool:
                result = bridge.reconciler.last_result if bridge.reconciler else None
                if result is not None and (not results or results[-1] is not result):
                    results.append(result)
                return bool(results) and results[-1].kind == "ok"

            await eventually(ok_after_failing, within=30)
    assert "error" in [result.kind for result in results]  # it did fail first
    failure_line = {503: "reconcile.failed", 401: "reconcile.authentication_failed"}[status]
    failed = seen(logs, failure_line)
    assert failed
    assert all(shown(entry) for entry in failed)
    last_failure = max(i for i, entry in enumerate(logs) if entry["event"] == failure_line)
    after = logs[last_failure + 1 :]
    announced = [
        entry for entry in after if entry["event"].startswith("reconcile.") and shown(entry)
    ]
    logged = [(e["event"], e["log_level"]) for e in after if e["event"].startswith("reconcile")]
    assert announced, (
        f"after {failure_line}, the run that found the registration right again logged {logged}"
    )
