"""Reconciliation (issue #3): the plan as a pure function, then whole runs against the fake."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import orjson
import pytest
from pydantic import SecretStr
from structlog.testing import capture_logs

from bridge.config import KonProSettings, ReconcileSettings, Settings, why_not_reconcile
from bridge.konpro import Endpoint, KonProClient
from bridge.reconcile import (
    Action,
    ActionKind,
    Desired,
    Reconciler,
    ReconcileResult,
    ResultKind,
    next_delay,
    normalize_url,
    plan,
    same_events,
)
from bridge.secret_file import (
    ENDPOINT_FILE_NAME,
    SECRET_FILE_NAME,
    load_stored_endpoint,
    load_stored_secret,
    store_secret,
)
from bridge.status import registration_ok
from bridge.tasks import cancel_and_wait
from tests.fake_konpro import FakeKonPro, WebhookReceiver
from tests.support.small_disk import fill_disk, small_disk

pytest_plugins = ("tests.fake_konpro",)

EVENTS = ("avatar_video.success", "avatar_video.fail")
ELSEWHERE = "https://bridge.example.com/webhooks/konpro"  # a public URL no test needs to serve
OTHER = "https://other-service.example.net/konpro"


def endpoint(
    endpoint_id: str,
    url: str = ELSEWHERE,
    *,
    events: list[str] | None = None,
    status: str = "enabled",
    created_at: int = 1_700_000_000,
) -> Endpoint:
    return Endpoint.model_validate(
        {
            "endpoint_id": endpoint_id,
            "url": url,
            "events": list(EVENTS) if events is None else events,
            "status": status,
            "created_at": created_at,
        }
    )


DESIRED = Desired(ELSEWHERE, EVENTS)


# -- plan: the pure decision ------------------------------------------------------------------


def test_an_empty_account_gets_the_endpoint_added() -> None:
    assert plan([], DESIRED) == [Action(ActionKind.ADD, ELSEWHERE, events=EVENTS)]


def test_no_configured_events_means_subscribing_to_all() -> None:
    konpro = KonProSettings(public_url=ELSEWHERE, events=())

    assert Desired.from_settings(konpro).events is None
    assert plan([], Desired(ELSEWHERE, None)) == [Action(ActionKind.ADD, ELSEWHERE)]


def test_a_matching_endpoint_needs_nothing_whatever_the_order_of_events() -> None:
    assert plan([endpoint("a", events=list(reversed(EVENTS)))], DESIRED) == []


def test_different_events_update_the_same_endpoint() -> None:
    actions = plan([endpoint("a", events=["avatar_video.success"])], DESIRED)

    assert actions == [Action(ActionKind.UPDATE, ELSEWHERE, "a", events=EVENTS)]


def test_duplicates_keep_the_oldest_whatever_the_spelling_of_the_url() -> None:
    endpoints = [
        endpoint("new", ELSEWHERE, created_at=1_700_000_300),
        endpoint("old", "HTTPS://Bridge.Example.COM:443/webhooks/konpro", created_at=1_700_000_100),
        endpoint("mid", ELSEWHERE + "/", created_at=1_700_000_200),
    ]

    actions = plan(endpoints, DESIRED)

    assert [(a.kind, a.endpoint_id) for a in actions] == [
        (ActionKind.DELETE, "mid"),
        (ActionKind.DELETE, "new"),
    ]


def test_an_endpoint_whose_path_differs_by_a_trailing_slash_is_moved_to_the_public_url() -> None:
    # The bridge serves its webhook path exactly: KonPro's deliveries to "<path>/" get 405.
    actions = plan([endpoint("a", ELSEWHERE + "/")], DESIRED)

    assert actions == [
        Action(ActionKind.UPDATE, ELSEWHERE + "/", "a", events=EVENTS, new_url=ELSEWHERE)
    ]


def test_duplicates_created_in_the_same_second_keep_the_smallest_id() -> None:
    endpoints = [endpoint("b"), endpoint("c"), endpoint("a")]

    assert [a.endpoint_id for a in plan(endpoints, DESIRED)] == ["b", "c"]


def test_an_enabled_duplicate_is_kept_over_an_older_disabled_one() -> None:
    endpoints = [
        endpoint("old", status="disabled", created_at=1_600_000_000),
        endpoint("new", created_at=1_700_000_000),
    ]

    assert plan(endpoints, DESIRED) == [Action(ActionKind.DELETE, ELSEWHERE, "old")]


def test_a_disabled_endpoint_is_reported_not_replaced() -> None:
    actions = plan([endpoint("a", status="disabled")], DESIRED)

    assert actions == [Action(ActionKind.REPORT_DISABLED, ELSEWHERE, "a")]


def test_endpoints_for_other_urls_are_never_in_a_plan() -> None:
    others = [endpoint("x", OTHER), endpoint("y", ELSEWHERE + "/v2", status="disabled")]

    actions = plan([*others, endpoint("a")], DESIRED)

    assert actions == []
    assert plan(others, DESIRED) == [Action(ActionKind.ADD, ELSEWHERE, events=EVENTS)]


@pytest.mark.parametrize(
    ("variant", "same"),
    [
        ("https://BRIDGE.example.com/webhooks/konpro", True),
        ("HTTPS://bridge.example.com:443/webhooks/konpro/", True),
        ("https://bridge.example.com/webhooks/konpro?x=1", False),
        ("http://bridge.example.com/webhooks/konpro", False),
        ("https://bridge.example.com:8443/webhooks/konpro", False),
        ("https://bridge.example.com/webhooks/KonPro", False),
    ],
)
def test_urls_compare_after_normalising_case_default_port_and_trailing_slash(
    variant: str, same: bool
) -> None:
    assert (normalize_url(variant) == normalize_url(ELSEWHERE)) is same


def test_an_empty_event_list_reads_as_all_events() -> None:
    assert same_events([], None)
    assert same_events(None, None)
    assert not same_events(["avatar_video.fail"], None)
    assert same_events(["b", "a", "a"], ["a", "b"])


def test_healthy_runs_are_an_interval_apart_give_or_take_ten_percent() -> None:
    delays = [next_delay(300, 300, 0) for _ in range(200)]

    assert all(270 <= delay <= 330 for delay in delays)


def test_failed_runs_back_off_up_to_the_bound() -> None:
    delays = [next_delay(300, 120, failures) for failures in range(1, 10)]

    assert delays[0] <= 5.5
    assert all(delay <= 120 for delay in delays)
    assert delays[-1] >= 108


def test_failing_for_days_keeps_backing_off_at_the_bound() -> None:
    # 1,025 failures in a row is 3.5 days at the defaults: 2**1024 overflowed a float once.
    assert all(270 <= next_delay(300, 300, failures) <= 300 for failures in (1_025, 10**6))


def test_a_refused_key_is_retried_at_the_normal_interval_only() -> None:
    assert all(270 <= next_delay(300, 3600, 7, retry_cannot_help=True) <= 330 for _ in range(50))


def test_a_rate_limit_pause_is_respected_within_the_bound() -> None:
    assert next_delay(300, 120, 1, retry_after=60) >= 60
    assert next_delay(300, 120, 1, retry_after=600) == 120


def test_reconciliation_needs_to_be_enabled_with_a_key_and_a_public_url() -> None:
    ready = {"api_key": "k", "public_url": ELSEWHERE}

    assert why_not_reconcile(Settings(konpro=KonProSettings.model_validate(ready))) is None
    assert why_not_reconcile(Settings(konpro=KonProSettings(public_url=ELSEWHERE)))
    assert why_not_reconcile(Settings(konpro=KonProSettings(api_key=SecretStr("k"))))
    assert why_not_reconcile(
        Settings(
            konpro=KonProSettings.model_validate(ready),
            reconcile=ReconcileSettings(enabled=False),
        )
    )


@pytest.mark.parametrize(
    ("enabled", "konpro", "reason"),
    [
        (False, {"api_key": "k", "public_url": ELSEWHERE}, "reconcile.enabled is false"),
        (True, {"public_url": ELSEWHERE}, "konpro.api_key is not set"),
        (True, {"api_key": "k"}, "konpro.public_url is not set"),
        (True, {"api_key": "k", "public_url": ELSEWHERE}, None),
    ],
)
def test_the_reason_reconciliation_is_off_names_the_missing_setting(
    enabled: bool, konpro: dict[str, str], reason: str | None
) -> None:
    settings = Settings(
        konpro=KonProSettings.model_validate(konpro), reconcile=ReconcileSettings(enabled=enabled)
    )

    assert why_not_reconcile(settings) == reason


# -- runs against the fake --------------------------------------------------------------------


class Reconcilers:
    """Builds reconcilers talking to the fake with test-sized timings; closes their clients."""

    def __init__(self, fake: FakeKonPro, spool: Path) -> None:
        self.fake = fake
        self.spool = spool
        self._clients: list[KonProClient] = []

    def make(
        self,
        public_url: str,
        *,
        events: tuple[str, ...] = EVENTS,
        mode: Literal["repair", "verify"] = "repair",
        webhook_secret: str = "",
        previous_webhook_secrets: tuple[str, ...] = (),
        api_key: str | None = None,
        max_attempts: int = 3,
        spool: Path | None = None,
    ) -> Reconciler:
        client = KonProClient(
            self.fake.url,
            SecretStr(api_key or self.fake.api_key),
            timeout=2.0,
            max_attempts=max_attempts,
            backoff_base=0.01,
            backoff_max=0.1,
        )
        self._clients.append(client)
        konpro = KonProSettings(
            api_url=self.fake.url,
            api_key=SecretStr(api_key or self.fake.api_key),
            public_url=public_url,
            events=events,
            webhook_secret=SecretStr(webhook_secret),
            previous_webhook_secrets=tuple(map(SecretStr, previous_webhook_secrets)),
        )
        # model_construct: the settings model rightly refuses sub-second intervals.
        schedule = ReconcileSettings.model_construct(interval=0.1, max_backoff=0.3, mode=mode)
        return Reconciler(client, konpro, schedule, spool or self.spool)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()


@pytest.fixture
async def reconcilers(fake_konpro: FakeKonPro, tmp_path: Path) -> AsyncIterator[Reconcilers]:
    factory = Reconcilers(fake_konpro, tmp_path / "spool")
    try:
        yield factory
    finally:
        await factory.close()


async def run_for(reconciler: Reconciler, seconds: float) -> list[ReconcileResult]:
    """Let ``run_forever`` run for a bounded time, then cancel it; it must end cleanly."""
    results: list[ReconcileResult] = []
    task = asyncio.create_task(reconciler.run_forever(results.append))
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return results


async def test_a_fresh_account_gets_the_public_url_registered_once(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    reconciler = reconcilers.make(webhook_receiver.url)

    first = await reconciler.run_once()
    second = await reconciler.run_once()

    [registered] = fake_konpro.endpoints.values()
    assert (registered["url"], registered["events"]) == (webhook_receiver.url, list(EVENTS))
    assert webhook_receiver.options_seen == 1
    assert (first.kind, first.endpoint_id) == ("added", registered["endpoint_id"])
    assert [a.kind for a in first.actions] == [ActionKind.ADD]
    assert (second.kind, second.actions) == ("ok", ())
    assert reconciler.last_result is second
    assert [call.name for call in fake_konpro.writes] == ["endpoint.add"]


async def test_a_url_that_does_not_answer_options_is_a_clear_error(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.options_status = 404
    reconciler = reconcilers.make(webhook_receiver.url)

    result = await reconciler.run_once()

    assert result.kind == "error"
    assert result.error is not None
    assert webhook_receiver.url in result.error
    assert "could not be verified" in result.error
    assert "answers OPTIONS" in result.error
    assert fake_konpro.endpoints == {}


async def test_an_endpoint_deleted_elsewhere_is_added_again_by_the_next_run(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    reconciler = reconcilers.make(webhook_receiver.url)
    first = await reconciler.run_once()
    assert first.endpoint_id is not None
    fake_konpro.delete(first.endpoint_id)

    again = await reconciler.run_once()

    assert again.kind == "added"
    assert list(fake_konpro.endpoints) == [again.endpoint_id]
    assert again.endpoint_id != first.endpoint_id


async def test_events_edited_elsewhere_are_updated_on_the_same_endpoint(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add(ELSEWHERE, ["personalized_video"])

    result = await reconcilers.make(ELSEWHERE).run_once()

    assert (result.kind, result.endpoint_id) == ("updated", endpoint_id)
    assert list(fake_konpro.endpoints) == [endpoint_id]
    assert fake_konpro.endpoints[endpoint_id]["events"] == list(EVENTS)
    assert [call.name for call in fake_konpro.writes] == ["endpoint.update"]


async def test_subscribing_to_all_events_sends_null(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add(ELSEWHERE, ["personalized_video"])

    await reconcilers.make(ELSEWHERE, events=()).run_once()

    assert fake_konpro.writes[0].json == {"endpoint_id": endpoint_id, "events": None}
    assert fake_konpro.endpoints[endpoint_id]["events"] is None


async def test_duplicates_are_deleted_leaving_the_oldest_and_other_urls_untouched(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    oldest = fake_konpro.add(
        "https://BRIDGE.example.com:443/webhooks/konpro", list(EVENTS), created_at=1_700_000_000
    )
    fake_konpro.add(ELSEWHERE, list(EVENTS), created_at="2024-01-01T00:00:00Z")
    fake_konpro.add(ELSEWHERE + "/", None, created_at=1_800_000_000)
    other = fake_konpro.add(OTHER, None, created_at=1_600_000_000)
    disabled_other = fake_konpro.add(OTHER + "/v2", ["avatar_video.fail"], status="disabled")
    untouched = {key: dict(fake_konpro.endpoints[key]) for key in (other, disabled_other)}

    first = await reconcilers.make(ELSEWHERE).run_once()
    second = await reconcilers.make(ELSEWHERE).run_once()

    assert (first.kind, first.endpoint_id) == ("deduplicated", oldest)
    assert second.kind == "ok"
    assert set(fake_konpro.endpoints) == {oldest, other, disabled_other}
    assert {key: fake_konpro.endpoints[key] for key in untouched} == untouched
    touched = {call.json and call.json.get("endpoint_id") for call in fake_konpro.writes}
    touched |= {call.query.get("endpoint_id") for call in fake_konpro.writes}
    assert not touched & {other, disabled_other}


async def test_a_disabled_endpoint_is_reported_loudly_and_left_alone(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add(ELSEWHERE, list(EVENTS), status="disabled")

    with capture_logs() as logs:
        result = await reconcilers.make(ELSEWHERE).run_once()

    assert (result.kind, result.endpoint_id) == ("disabled", endpoint_id)
    [report] = [entry for entry in logs if entry["event"] == "reconcile.endpoint_disabled"]
    assert report["log_level"] == "error"
    assert report["endpoint_id"] == endpoint_id
    assert fake_konpro.writes == []


@pytest.mark.parametrize("account", ["empty", "wrong events", "duplicates", "disabled"])
async def test_verify_mode_reports_differences_and_never_writes(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, account: str
) -> None:
    kept = None
    if account == "wrong events":
        kept = fake_konpro.add(ELSEWHERE, ["personalized_video"])
    elif account == "duplicates":
        kept = fake_konpro.add(ELSEWHERE, list(EVENTS), created_at=1)
        fake_konpro.add(ELSEWHERE + "/", list(EVENTS), created_at=2)
    elif account == "disabled":
        kept = fake_konpro.add(ELSEWHERE, list(EVENTS), status="disabled")
    # Configured, as a verify-mode bridge's secret must be: verify mode stores none.
    secret = fake_konpro.endpoints[kept]["secret"] if kept else ""

    with capture_logs() as logs:
        result = await reconcilers.make(ELSEWHERE, mode="verify", webhook_secret=secret).run_once()

    assert result.kind == ("disabled" if account == "disabled" else "drift")
    assert result.actions
    assert fake_konpro.writes == []
    expected = "reconcile.endpoint_disabled" if account == "disabled" else "reconcile.drift"
    assert expected in {entry["event"] for entry in logs if entry["log_level"] != "debug"}
    assert registration_ok(result) is False  # /status ok false, the registration_ok gauge 0


@pytest.mark.parametrize(
    ("kind", "ok"),
    [
        ("ok", True),
        ("added", True),
        ("updated", True),
        ("deduplicated", True),
        ("disabled", False),
        ("drift", False),
        ("error", False),
    ],
)
def test_only_a_registration_left_as_configured_counts_as_ok(kind: ResultKind, ok: bool) -> None:
    assert registration_ok(ReconcileResult(datetime.now(UTC), kind)) is ok


async def test_a_rate_limit_pause_holds_back_the_next_run(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.answer_next(1, 429, retry_after="1")
    reconciler = reconcilers.make(ELSEWHERE, max_attempts=1)  # interval 0.1 s, back-off 0.3 s

    assert (await reconciler.run_once()).kind == "error"

    assert reconciler.next_run_in(failures=1) >= 0.3  # KonPro's 1 s, within max_backoff


async def test_verify_mode_on_a_matching_account_is_ok(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add(ELSEWHERE, list(EVENTS))
    secret = fake_konpro.endpoints[endpoint_id]["secret"]

    result = await reconcilers.make(ELSEWHERE, mode="verify", webhook_secret=secret).run_once()

    assert (result.kind, result.endpoint_id, result.actions) == ("ok", endpoint_id, ())


async def test_verify_mode_reports_a_secret_it_stores_nowhere(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    """Verify mode writes nothing, the secret file included: a bridge that neither holds nor
    stores the endpoint's secret checks no signature, and the run says so."""
    fake_konpro.add(ELSEWHERE, list(EVENTS))

    result = await reconcilers.make(ELSEWHERE, mode="verify").run_once()

    assert result.kind == "error"
    assert result.error is not None
    assert "verify mode stores nothing" in result.error


async def test_a_refused_key_is_logged_once_and_retried_only_at_the_interval(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    reconciler = reconcilers.make(ELSEWHERE, api_key="revoked-key")

    with capture_logs() as logs:
        results = await run_for(reconciler, 0.55)

    # interval 0.1 +/- 10%: at most 7 runs fit in 0.55 s, each one call (never retried).
    assert 2 <= len(fake_konpro.calls) <= 7
    assert len(results) == len(fake_konpro.calls)
    assert {result.kind for result in results} == {"error"}
    [error] = [entry for entry in logs if entry["log_level"] == "error"]
    assert error["event"] == "reconcile.authentication_failed"
    assert "API key" in error["error"]
    assert "revoked-key" not in repr(logs)


async def test_a_refused_key_is_one_line_until_a_run_gets_through_whatever_comes_between(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    reconciler = reconcilers.make(ELSEWHERE, max_attempts=1)
    with capture_logs() as logs:
        for status in (401, 503, 401):
            fake_konpro.answer_next(1, status)
            assert (await reconciler.run_once()).kind == "error"

    refused = [entry for entry in logs if entry["event"] == "reconcile.authentication_failed"]
    assert len(refused) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_rate_limits_and_server_errors_back_off_then_succeed(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, status: int
) -> None:
    fake_konpro.add(ELSEWHERE, ["personalized_video"])
    fake_konpro.answer_next(2, status, retry_after="0")
    reconciler = reconcilers.make(ELSEWHERE, max_attempts=1)
    settled = asyncio.Event()

    def on_result(result: ReconcileResult) -> None:
        results.append(result)
        if result.kind != "error":
            settled.set()

    results: list[ReconcileResult] = []
    with capture_logs() as logs:
        task = asyncio.create_task(reconciler.run_forever(on_result))
        async with asyncio.timeout(5):
            await settled.wait()
        await cancel_and_wait(task)

    assert [result.kind for result in results] == ["error", "error", "updated"]
    sleeps = [entry["failures"] for entry in logs if entry["event"] == "reconcile.sleeping"]
    assert sleeps[:3] == [1, 2, 0]


async def test_an_unknown_configured_event_type_is_a_warning_not_fatal(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    events = ("avatar_video.success", "instant_avatar.success")
    fake_konpro.add(ELSEWHERE, list(events))

    with capture_logs() as logs:
        result = await reconcilers.make(ELSEWHERE, events=events).run_once()

    assert result.kind == "ok"
    [warning] = [entry for entry in logs if entry["event"] == "reconcile.unknown_event_types"]
    assert warning["unknown"] == ["instant_avatar.success"]
    assert fake_konpro.count("webhook.list") == 1


@pytest.mark.parametrize(
    "answer",
    [
        {"status": 404},
        {"status": 200, "body": b'{"code": 100, "data": {"events": []}, "message": "Success"}'},
    ],
    ids=["refused", "in a shape the client does not know"],
)
async def test_an_event_type_list_that_fails_does_not_hold_up_the_registration(
    answer: dict[str, Any], reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    # The list only feeds a warning about the configured event types: warned about once.
    fake_konpro.add(ELSEWHERE, ["personalized_video"])
    fake_konpro.answer_next(10, answer["status"], body=answer.get("body"), call="webhook.list")

    with capture_logs() as logs:
        reconciler = reconcilers.make(ELSEWHERE)
        first = await reconciler.run_once()
        second = await reconciler.run_once()

    assert (first.kind, second.kind) == ("updated", "ok")
    [warning] = [entry for entry in logs if entry["event"] == "reconcile.event_types_unchecked"]
    assert warning["error"].startswith("webhook.list: ")
    assert fake_konpro.count("webhook.list") == 1


def racing_replicas(
    reconcilers: Reconcilers, receiver: WebhookReceiver, tmp_path: Path, count: int
) -> list[Reconciler]:
    """``count`` replicas of one URL, each with a spool of its own; their first adds are all in
    flight before any completes."""
    receiver.hold_until = count
    return [reconcilers.make(receiver.url, spool=tmp_path / f"replica{n}") for n in range(count)]


async def run_each(replicas: list[Reconciler]) -> list[ReconcileResult]:
    """One run of every replica, at once."""
    return list(await asyncio.gather(*(replica.run_once() for replica in replicas)))


async def test_three_replicas_at_once_converge_on_one_registration(
    reconcilers: Reconcilers,
    fake_konpro: FakeKonPro,
    webhook_receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    replicas = racing_replicas(reconcilers, webhook_receiver, tmp_path, 3)

    racing = await run_each(replicas)
    assert [result.kind for result in racing] == ["added"] * 3
    assert len(fake_konpro.endpoints) == 3
    await run_each(replicas)
    settled = await run_each(replicas)

    [survivor] = fake_konpro.endpoints.values()
    assert {(result.kind, result.endpoint_id) for result in settled} == {
        ("ok", survivor["endpoint_id"])
    }
    stored = {load_stored_secret(tmp_path / f"replica{n}") for n in range(3)}
    assert stored == {survivor["secret"]}


async def test_replicas_that_cannot_learn_the_kept_endpoints_secret_say_so(
    reconcilers: Reconcilers,
    fake_konpro: FakeKonPro,
    webhook_receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    # endpoint.list may answer "secret": null: a replica whose own endpoint was deleted as a
    # duplicate holds a secret nobody signs with any more, and cannot learn the kept one's.
    fake_konpro.list_secrets = False
    replicas = racing_replicas(reconcilers, webhook_receiver, tmp_path, 3)
    await run_each(replicas)
    added = {
        replica: load_stored_secret(tmp_path / f"replica{n}") for n, replica in enumerate(replicas)
    }

    with capture_logs() as logs:
        for _ in range(2):
            settled = await run_each(replicas)

    [survivor] = fake_konpro.endpoints.values()
    outcomes = {
        added[replica] == survivor["secret"]: r.kind
        for replica, r in zip(replicas, settled, strict=True)
    }
    assert sorted(r.kind for r in settled) == ["error", "error", "ok"]
    assert outcomes == {True: "ok", False: "error"}
    errors = [r.error or "" for r in settled if r.kind == "error"]
    assert all("konpro.webhook_secret" in error for error in errors)
    # Whose secret is stored, and whose is needed: the kept endpoint may only have moved.
    assert all(f"not the kept endpoint {survivor['endpoint_id']}'s" in error for error in errors)
    mismatches = [entry for entry in logs if entry["event"] == "reconcile.secret_mismatch"]
    assert len(mismatches) == 2  # once per replica, not once per run


async def test_a_restarted_replica_still_knows_whose_secret_it_holds(
    reconcilers: Reconcilers,
    fake_konpro: FakeKonPro,
    webhook_receiver: WebhookReceiver,
    tmp_path: Path,
) -> None:
    fake_konpro.list_secrets = False
    replicas = racing_replicas(reconcilers, webhook_receiver, tmp_path, 2)
    await run_each(replicas)
    await run_each(replicas)  # one endpoint is left

    restarted = [
        await reconcilers.make(webhook_receiver.url, spool=tmp_path / f"replica{n}").run_once()
        for n in range(2)
    ]

    assert sorted(result.kind for result in restarted) == ["error", "ok"]


async def test_a_secret_another_run_stored_meanwhile_is_not_called_outdated(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    # The daemon registered; the endpoint was deleted in the dashboard; an operator's
    # `reconcile --once` registered it again and stored the new secret, which the daemon uses.
    fake_konpro.list_secrets = False
    daemon = reconcilers.make(webhook_receiver.url)
    await daemon.run_once()
    fake_konpro.endpoints.clear()
    assert (await reconcilers.make(webhook_receiver.url).run_once()).kind == "added"

    with capture_logs() as logs:
        result = await daemon.run_once()

    assert (result.kind, result.error) == ("ok", None)
    assert not [entry for entry in logs if entry["event"] == "reconcile.secret_mismatch"]


async def test_the_secret_of_an_added_endpoint_is_stored_0600_when_none_is_configured(
    reconcilers: Reconcilers,
    fake_konpro: FakeKonPro,
    webhook_receiver: WebhookReceiver,
) -> None:
    with capture_logs() as logs:
        result = await reconcilers.make(webhook_receiver.url).run_once()

    [registered] = fake_konpro.endpoints.values()
    secret_file = reconcilers.spool / "webhook_secret"
    assert result.secret_stored
    assert load_stored_secret(reconcilers.spool) == registered["secret"]
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert sorted(path.name for path in reconcilers.spool.iterdir()) == [
        "webhook_secret",
        "webhook_secret.endpoint",  # whose secret it is
    ]
    endpoint_file = reconcilers.spool / "webhook_secret.endpoint"
    assert endpoint_file.read_text().split()[0] == registered["endpoint_id"]
    assert load_stored_endpoint(reconcilers.spool) == registered["endpoint_id"]
    assert stat.S_IMODE(endpoint_file.stat().st_mode) == 0o600
    [warning] = [entry for entry in logs if entry["event"] == "reconcile.secret_stored"]
    assert "konpro.webhook_secret" in warning["hint"]
    assert registered["secret"] not in repr(logs)


async def test_an_endpoint_still_signing_with_the_previous_secret_is_verifiable(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    # Mid-rotation: the new secret is configured, the endpoint's is in previous_webhook_secrets.
    endpoint_id = fake_konpro.add(webhook_receiver.url, list(EVENTS))
    previous = fake_konpro.endpoints[endpoint_id]["secret"]
    reconciler = reconcilers.make(
        webhook_receiver.url, webhook_secret="whsec_new", previous_webhook_secrets=(previous,)
    )

    result = await reconciler.run_once()

    assert (result.kind, result.error) == ("ok", None)


async def test_a_configured_secret_means_nothing_is_stored(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    endpoint_id = fake_konpro.add(webhook_receiver.url, list(EVENTS))
    configured = fake_konpro.endpoints[endpoint_id]["secret"]
    reconciler = reconcilers.make(webhook_receiver.url, webhook_secret=configured)

    result = await reconciler.run_once()

    assert (result.kind, result.secret_stored) == ("ok", False)
    assert load_stored_secret(reconcilers.spool) is None


async def test_an_endpoint_registered_again_under_a_configured_secret_is_reported_unverifiable(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    # Deleted in the dashboard and added again: KonPro signs with the new endpoint's secret.
    reconciler = reconcilers.make(webhook_receiver.url, webhook_secret="whsec_configured")

    with capture_logs() as logs:
        results = [await reconciler.run_once() for _ in range(2)]

    [registered] = fake_konpro.endpoints.values()
    assert [(r.kind, r.endpoint_id) for r in results] == [("error", registered["endpoint_id"])] * 2
    assert "401" in (results[0].error or "")
    assert not registration_ok(results[-1])
    # An operator has to act: asked again every interval, not at a failure's back-off.
    assert all(reconciler.next_run_in(failures=3) <= 0.11 for _ in range(20))  # interval 0.1
    [mismatch] = [entry for entry in logs if entry["event"] == "reconcile.secret_mismatch"]
    assert mismatch["log_level"] == "error"
    assert registered["secret"] not in repr(logs)
    assert load_stored_secret(reconcilers.spool) is None


def test_a_result_renders_as_json_without_secrets() -> None:
    result = ReconcileResult(
        time=datetime(2024, 1, 1, tzinfo=UTC),
        kind="updated",
        endpoint_id="a",
        actions=(Action(ActionKind.UPDATE, ELSEWHERE, "a", events=None),),
    )

    assert result.to_dict() == {
        "time": "2024-01-01T00:00:00+00:00",
        "result": "updated",
        "endpoint_id": "a",
        "error": None,
        "actions": [f"update a ({ELSEWHERE}) events=all"],
        "secret_stored": False,
    }


def konpro_envelope(code: int, data: object, message: str) -> bytes:
    return orjson.dumps({"code": code, "data": data, "message": message})


@pytest.mark.parametrize("data", [None, {}, True], ids=["null", "empty object", "true"])
async def test_an_update_whose_answer_describes_no_endpoint_counts_as_done(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, data: object
) -> None:
    """The notes only infer that ``endpoint.update`` answers the endpoint object ("the client
    must tolerate variations"). Before, any other answer to an update KonPro had made was a
    retryable error: the PATCH went out three times and the run ended in ``error``."""
    endpoint_id = fake_konpro.add(ELSEWHERE, ["personalized_video"])
    success = konpro_envelope(100, data, "Success")
    fake_konpro.serve_then_answer_next(5, 200, body=success, call="endpoint.update")

    result = await reconcilers.make(ELSEWHERE).run_once()

    assert fake_konpro.endpoints[endpoint_id]["events"] == list(EVENTS)
    assert (result.kind, result.error) == ("updated", None)
    assert fake_konpro.count("endpoint.update") == 1


async def test_verify_mode_reports_a_configured_secret_that_is_not_the_endpoints(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    """Verify mode writes nothing, but checks the secret as repair does: before, it answered
    ``ok`` (``/status`` and the gauge said all was well) while every delivery got 401."""
    fake_konpro.add(ELSEWHERE, list(EVENTS))

    with capture_logs() as logs:
        result = await reconcilers.make(
            ELSEWHERE, mode="verify", webhook_secret="whsec_configured"
        ).run_once()

    assert result.kind == "error"
    assert registration_ok(result) is False
    assert "reconcile.secret_mismatch" in {entry["event"] for entry in logs}
    assert fake_konpro.writes == []


@pytest.mark.parametrize("stored", ["another endpoint's", "none"])
async def test_verify_mode_reports_a_secret_it_cannot_know(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, stored: str
) -> None:
    """Where ``endpoint.list`` hides secrets, as repair mode does."""
    fake_konpro.list_secrets = False
    fake_konpro.add(ELSEWHERE, list(EVENTS))
    if stored != "none":
        store_secret(reconcilers.spool, "whsec_of_a_deleted_duplicate", "0" * 32)

    result = await reconcilers.make(ELSEWHERE, mode="verify").run_once()

    assert result.kind == "error"
    assert registration_ok(result) is False


async def test_a_duplicate_deleted_first_by_another_replica_is_done_whatever_konpro_answers(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    """What KonPro answers for an id it no longer has is not documented: the 400 of an invalid
    parameter as well as a 404. A refused delete of an endpoint no longer listed is done;
    before, only a 404 was, and the losing replica's run ended in ``error``."""
    fake_konpro.add(ELSEWHERE, list(EVENTS), created_at=1)
    duplicate = fake_konpro.add(ELSEWHERE + "/", list(EVENTS), created_at=2)
    unknown_id = konpro_envelope(400175, None, "Invalid parameter: endpoint_id")
    fake_konpro.serve_then_answer_next(1, 400, body=unknown_id, call="endpoint.delete")

    result = await reconcilers.make(ELSEWHERE).run_once()

    assert duplicate not in fake_konpro.endpoints
    assert (result.kind, result.error) == ("deduplicated", None)


async def test_a_delete_refused_while_the_endpoint_is_still_listed_is_an_error(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.add(ELSEWHERE, list(EVENTS), created_at=1)
    duplicate = fake_konpro.add(ELSEWHERE + "/", list(EVENTS), created_at=2)
    refused = konpro_envelope(400175, None, "Invalid parameter: endpoint_id")
    fake_konpro.answer_next(1, 400, body=refused, call="endpoint.delete")

    result = await reconcilers.make(ELSEWHERE).run_once()

    assert duplicate in fake_konpro.endpoints
    assert result.kind == "error"


async def test_an_unreadable_created_at_on_another_services_endpoint_stops_nothing(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    """ISO-8601's basic format (``20250302T094107Z``) is not read: ``created_at`` only ranks
    duplicates, so it is unknown. Before, one such endpoint of another service made every
    ``endpoint.list`` a retried error, and no run ever got to the bridge's own endpoint."""
    fake_konpro.add(OTHER, None, created_at="20250302T094107Z")
    fake_konpro.add(ELSEWHERE, list(EVENTS))

    result = await reconcilers.make(ELSEWHERE).run_once()

    assert (result.kind, result.error) == ("ok", None)
    assert fake_konpro.count("endpoint.list") == 1


async def test_the_kept_endpoints_secret_is_kept_even_when_a_repair_step_fails(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    """Before, it was stored only once every step had succeeded: with an update KonPro kept
    refusing, a bridge on a new volume never stored the secret KonPro signed with, and checked
    no signature (or refused all, with ``require_signature``)."""
    kept = fake_konpro.add(ELSEWHERE, ["personalized_video"])
    refused = konpro_envelope(400175, None, "Invalid parameter: events")
    fake_konpro.answer_next(10, 400, body=refused, call="endpoint.update")

    results = [await reconcilers.make(ELSEWHERE).run_once() for _ in range(2)]

    assert [result.kind for result in results] == ["error", "error"]
    assert load_stored_secret(reconcilers.spool) == fake_konpro.endpoints[kept]["secret"]


async def test_a_run_that_stored_the_secret_and_then_failed_says_it_stored_it(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    """The secret is stored before the repair steps, so a run that fails after still stored
    it: ``secret_stored`` says so, or ``reconcile --once`` would never tell."""
    kept = fake_konpro.add(ELSEWHERE, list(EVENTS), created_at=1)
    fake_konpro.add(ELSEWHERE + "/", list(EVENTS), created_at=2)  # a duplicate to delete
    fake_konpro.answer_next(1, 503, call="endpoint.delete")

    result = await reconcilers.make(ELSEWHERE, max_attempts=1).run_once()

    assert result.kind == "error"
    assert load_stored_secret(reconcilers.spool) == fake_konpro.endpoints[kept]["secret"]
    assert result.secret_stored is True


async def test_a_secret_that_cannot_be_stored_does_not_hold_up_the_repairs(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro, tmp_path: Path
) -> None:
    """A full disk or a read-only volume: the registration is repaired all the same, and the
    run ends in ``error`` for the secret it could not store."""
    fake_konpro.add(ELSEWHERE, list(EVENTS), created_at=1)
    duplicate = fake_konpro.add(ELSEWHERE + "/", list(EVENTS), created_at=2)
    with small_disk(tmp_path / "disk", 2**20) as disk:
        spool = disk / "spool"
        spool.mkdir()
        filler = fill_disk(disk)
        try:
            result = await reconcilers.make(ELSEWHERE, max_attempts=1, spool=spool).run_once()
        finally:
            filler.unlink()

    assert result.kind == "error"
    assert result.error is not None
    assert "storing the signing secret failed" in result.error
    assert duplicate not in fake_konpro.endpoints


async def test_a_verify_run_that_cannot_read_the_secret_file_says_so(
    reconcilers: Reconcilers, fake_konpro: FakeKonPro
) -> None:
    """Not "storing failed": verify mode writes nothing."""
    fake_konpro.add(ELSEWHERE, list(EVENTS))
    reconcilers.spool.mkdir(parents=True)
    (reconcilers.spool / "webhook_secret").write_bytes(b"\xff\xfe not text")

    result = await reconcilers.make(ELSEWHERE, mode="verify").run_once()

    assert result.kind == "error"
    assert result.error is not None
    assert result.error.startswith("the stored signing secret cannot be read: ")


async def test_a_rate_limit_pause_does_not_outlast_the_run_that_asked_for_it(
    fake_konpro: FakeKonPro, reconcilers: Reconcilers, tmp_path: Path
) -> None:
    """After a 429 that asked for a long pause, a run that fails otherwise (a 503) backs off
    as a 503 calls for: the pause was the 429's answer, not the next failure's."""
    reconcile = reconcilers.make(ELSEWHERE, max_attempts=1)
    fake_konpro.answer_next(1, 429, retry_after="60")
    assert (await reconcile.run_once()).kind == "error"
    assert reconcile.next_run_in(failures=1) >= 0.3  # the pause, within max_backoff (0.3 s)
    fake_konpro.answer_next(1, 503)

    assert (await reconcile.run_once()).kind == "error"

    # The back-off of two failures: 0.1 s doubled, +/-10%; not the 429's pause.
    assert reconcile.next_run_in(failures=2) < 0.3


async def test_a_stored_secret_without_its_endpoint_id_gets_it_back_from_the_next_run(
    fake_konpro: FakeKonPro, reconcilers: Reconcilers, tmp_path: Path
) -> None:
    """A secret file whose endpoint id is missing (an older version's, or a kill between the
    two writes) is completed by the next run that sees KonPro tell the same secret. Without
    that, once the endpoint is deleted as a duplicate and KonPro tells no secret, the replica
    could not tell that the secret it holds is not the kept endpoint's, and would report ok
    while every delivery is refused (401)."""
    spool = tmp_path / "spool"
    ours = fake_konpro.add(ELSEWHERE, list(EVENTS), created_at=2_000_000_000)
    spool.mkdir(mode=0o700)
    (spool / SECRET_FILE_NAME).write_text(fake_konpro.endpoints[ours]["secret"] + "\n")
    assert not (spool / ENDPOINT_FILE_NAME).exists()
    reconcile = reconcilers.make(ELSEWHERE, max_attempts=1, spool=spool)

    assert (await reconcile.run_once()).kind == "ok"

    assert load_stored_endpoint(spool) == ours
    # Later another replica's older registration wins, and KonPro stops telling secrets.
    kept = fake_konpro.add(ELSEWHERE, list(EVENTS), created_at=1_000_000_000)
    fake_konpro.list_secrets = False
    result = await reconcile.run_once()
    assert result.kind == "error"
    assert f"not the kept endpoint {kept}'s" in (result.error or "")


async def test_a_run_that_reached_konpro_but_could_not_store_the_secret_ends_a_refused_key_spell(
    fake_konpro: FakeKonPro, reconcilers: Reconcilers, tmp_path: Path
) -> None:
    """A refused key is said once until a run gets through. A run KonPro answered gets through,
    even if the disk then refused the secret: a key refused again afterwards (revoked anew) is
    news, and gets its line; were it not, the reconciler would also keep retrying a storage
    failure at the slow interval of a refused key instead of backing off."""
    fake_konpro.add(ELSEWHERE, list(EVENTS))
    not_a_directory = tmp_path / "spool"
    not_a_directory.write_text("")  # the secret cannot be stored under it
    reconcile = reconcilers.make(ELSEWHERE, max_attempts=1, spool=not_a_directory)

    with capture_logs() as logs:
        fake_konpro.answer_next(1, 401)
        assert (await reconcile.run_once()).kind == "error"
        stored = await reconcile.run_once()
        assert stored.kind == "error"
        assert "storing the signing secret failed" in (stored.error or "")
        fake_konpro.answer_next(1, 401)
        assert (await reconcile.run_once()).kind == "error"

    refused = [entry for entry in logs if entry["event"] == "reconcile.authentication_failed"]
    assert len(refused) == 2


async def test_unknown_configured_event_types_are_warned_about_once(
    fake_konpro: FakeKonPro, reconcilers: Reconcilers, tmp_path: Path
) -> None:
    """The event types are checked once a process: an unknown one is one warning, not one per
    run (every 5 minutes, for ever), and KonPro's list is not asked for at every run."""
    events = (*EVENTS, "avatar_video.brand_new")
    reconcile = reconcilers.make(ELSEWHERE, events=events, mode="verify", max_attempts=1)

    with capture_logs() as logs:
        for _ in range(3):
            await reconcile.run_once()

    warned = [entry for entry in logs if entry["event"] == "reconcile.unknown_event_types"]
    assert len(warned) == 1
    assert fake_konpro.count("webhook.list") == 1
