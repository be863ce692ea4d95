"""KonProClient against the fake KonPro: calls, envelopes, errors, retries, and key hygiene."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
import pytest
from aiohttp import web
from pydantic import SecretStr
from structlog.testing import capture_logs

from bridge.konpro import (
    AuthenticationError,
    Endpoint,
    KonProClient,
    KonProError,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    UnexpectedAnswer,
    ValidationFailed,
    format_endpoints,
    parse_retry_after,
)
from tests.fake_konpro import EVENT_TYPES, FakeKonPro, WebhookReceiver
from tests.support.serving import serving

pytest_plugins = ("tests.fake_konpro",)


def client_for(fake: FakeKonPro, **options: float) -> KonProClient:
    settings: dict[str, float] = {"timeout": 2.0, "backoff_base": 0.01, "backoff_max": 0.5}
    settings.update(options)
    return KonProClient(
        fake.url,
        SecretStr(fake.api_key),
        timeout=settings["timeout"],
        max_attempts=int(settings.get("max_attempts", 3)),
        backoff_base=settings["backoff_base"],
        backoff_max=settings["backoff_max"],
    )


@pytest.fixture
async def client(fake_konpro: FakeKonPro) -> AsyncIterator[KonProClient]:
    async with client_for(fake_konpro) as client:
        yield client


# -- the five calls ---------------------------------------------------------------------------


async def test_list_event_types_returns_the_vendor_list(client: KonProClient) -> None:
    assert await client.list_event_types() == list(EVENT_TYPES)


async def test_add_endpoint_sends_url_and_events_and_returns_the_secret(
    client: KonProClient, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    endpoint = await client.add_endpoint(webhook_receiver.url, ["avatar_video.success"])

    assert fake_konpro.calls[-1].json == {
        "url": webhook_receiver.url,
        "events": ["avatar_video.success"],
    }
    assert webhook_receiver.options_seen == 1
    assert endpoint.endpoint_id in fake_konpro.endpoints
    assert endpoint.url == webhook_receiver.url
    assert endpoint.events == ["avatar_video.success"]
    assert endpoint.enabled
    assert endpoint.secret is not None
    assert endpoint.secret.get_secret_value().startswith("whsec_")


async def test_add_endpoint_with_no_events_subscribes_to_all(
    client: KonProClient, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    endpoint = await client.add_endpoint(webhook_receiver.url, None)

    assert fake_konpro.calls[-1].json == {"url": webhook_receiver.url, "events": None}
    assert endpoint.events is None


@pytest.mark.parametrize("shape", ["array", "object"])
async def test_list_endpoints_accepts_both_shapes_of_data(
    client: KonProClient, fake_konpro: FakeKonPro, shape: str
) -> None:
    fake_konpro.list_shape = shape
    first = fake_konpro.add("https://a.example/hook")
    second = fake_konpro.add("https://b.example/hook", ["avatar_video.fail"])

    endpoints = await client.list_endpoints()

    assert [(e.endpoint_id, e.url, e.events) for e in endpoints] == [
        (first, "https://a.example/hook", None),
        (second, "https://b.example/hook", ["avatar_video.fail"]),
    ]


async def test_list_endpoints_reads_null_data_as_an_empty_account(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.answer_next(1, 200, body=b'{"code": 100, "data": null, "message": "Success"}')

    assert await client.list_endpoints() == []


async def test_list_endpoints_refuses_a_wrapper_it_does_not_know(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    # Read as an empty account, it would have the reconciler add an endpoint on every run.
    fake_konpro.add("https://a.example/hook")
    fake_konpro.answer_next(
        1, 200, body=b'{"code": 100, "data": {"items": [], "total": 1}, "message": "Success"}'
    )

    with pytest.raises(UnexpectedAnswer, match="expected a list of endpoints"):
        await client.list_endpoints()


async def test_list_endpoints_reads_created_at_as_epoch_seconds_or_iso_text(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.add("https://a.example/hook", created_at=1_712_345_678)
    fake_konpro.add("https://b.example/hook", created_at="2024-04-05T19:34:38Z")
    fake_konpro.add("https://c.example/hook", created_at="2024-04-05T19:34:38")

    created = [e.created_at for e in await client.list_endpoints()]

    assert created == [datetime(2024, 4, 5, 19, 34, 38, tzinfo=UTC)] * 3


async def test_list_endpoints_tolerates_a_null_secret(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.list_secrets = False
    fake_konpro.add("https://a.example/hook")

    [endpoint] = await client.list_endpoints()

    assert endpoint.secret is None


async def test_update_endpoint_replaces_the_events_and_keeps_the_id(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add("https://a.example/hook", ["avatar_video.success"])

    updated = await client.update_endpoint(endpoint_id, events=["avatar_video.fail"])

    assert fake_konpro.calls[-1].method == "PATCH"
    assert fake_konpro.calls[-1].json == {
        "endpoint_id": endpoint_id,
        "events": ["avatar_video.fail"],
    }
    assert updated is not None
    assert updated.endpoint_id == endpoint_id
    assert updated.events == ["avatar_video.fail"]
    assert fake_konpro.endpoints[endpoint_id]["events"] == ["avatar_video.fail"]


async def test_update_endpoint_with_null_events_subscribes_to_all(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add("https://a.example/hook", ["avatar_video.success"])

    updated = await client.update_endpoint(endpoint_id, events=None)

    assert fake_konpro.calls[-1].json == {"endpoint_id": endpoint_id, "events": None}
    assert updated is not None
    assert updated.events is None


async def test_delete_endpoint_passes_the_id_as_a_query_parameter_without_a_body(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add("https://a.example/hook")

    await client.delete_endpoint(endpoint_id)

    call = fake_konpro.calls[-1]
    assert (call.method, call.query, call.json) == ("DELETE", {"endpoint_id": endpoint_id}, None)
    assert fake_konpro.endpoints == {}


# -- the endpoint model -----------------------------------------------------------------------


def test_endpoint_tolerates_unknown_status_and_extra_fields() -> None:
    endpoint = Endpoint.model_validate(
        {"endpoint_id": "e1", "url": "https://a.example", "status": "paused", "entity_id": "x"}
    )

    assert endpoint.status == "paused"
    assert not endpoint.enabled


def test_endpoint_renderings_mask_the_secret() -> None:
    endpoint = Endpoint(
        endpoint_id="e1", url="https://a.example/hook", secret=SecretStr("whsec_topsecret")
    )

    assert endpoint.model_dump(mode="json")["secret"] == "***"
    assert "whsec_topsecret" not in repr(endpoint)
    assert "whsec_topsecret" not in format_endpoints([endpoint])
    assert "https://a.example/hook" in format_endpoints([endpoint])


# -- errors -----------------------------------------------------------------------------------


async def test_a_refused_key_is_an_authentication_error_and_not_retried(
    fake_konpro: FakeKonPro,
) -> None:
    async with KonProClient(fake_konpro.url, SecretStr("wrong-key"), backoff_base=0.01) as client:
        with pytest.raises(AuthenticationError) as caught:
            await client.list_endpoints()

    assert (caught.value.status, caught.value.code) == (401, 400112)
    assert fake_konpro.count("endpoint.list") == 1


async def test_unknown_endpoint_ids_are_not_found(client: KonProClient) -> None:
    with pytest.raises(NotFound):
        await client.update_endpoint("0" * 32, events=None)
    with pytest.raises(NotFound):
        await client.delete_endpoint("0" * 32)


async def test_a_url_that_fails_the_options_check_is_a_validation_failure(
    client: KonProClient, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.options_status = 405

    with pytest.raises(ValidationFailed) as caught:
        await client.add_endpoint(webhook_receiver.url, None)

    assert caught.value.code == 400175
    assert "could not be verified" in str(caught.value)
    assert fake_konpro.endpoints == {}
    assert fake_konpro.count("endpoint.add") == 1


async def test_rejected_parameters_are_a_validation_failure(
    client: KonProClient, webhook_receiver: WebhookReceiver
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await client.add_endpoint(webhook_receiver.url, ["no_such.event"])

    assert caught.value.code == 400175


async def test_an_answer_that_is_not_json_is_a_transport_error(
    fake_konpro: FakeKonPro,
) -> None:
    fake_konpro.answer_next(3, 200, body=b"<html>maintenance</html>")

    async with client_for(fake_konpro, max_attempts=3) as client:
        with pytest.raises(TransportError, match="not a KonPro envelope"):
            await client.list_event_types()

    assert fake_konpro.count("webhook.list") == 3


async def test_an_envelope_without_a_code_is_a_transport_error(fake_konpro: FakeKonPro) -> None:
    fake_konpro.answer_next(1, 200, body=b'{"data": []}')

    async with client_for(fake_konpro, max_attempts=1) as client:
        with pytest.raises(TransportError):
            await client.list_endpoints()


async def test_a_refused_connection_is_a_transport_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused

        async with KonProClient(
            f"http://127.0.0.1:{port}", SecretStr("k"), max_attempts=2, backoff_base=0.01
        ) as client:
            with pytest.raises(TransportError):
                await client.list_endpoints()


async def test_every_error_is_a_konpro_error() -> None:
    for error in (
        AuthenticationError,
        NotFound,
        ValidationFailed,
        RateLimited,
        ServerError,
        TransportError,
    ):
        assert issubclass(error, KonProError)


# -- retries ----------------------------------------------------------------------------------


async def test_rate_limiting_is_retried_after_the_requested_pause(
    fake_konpro: FakeKonPro,
) -> None:
    fake_konpro.answer_next(1, 429, retry_after="1")

    with capture_logs() as logs:
        async with client_for(fake_konpro, backoff_max=2.0) as client:
            assert await client.list_event_types() == list(EVENT_TYPES)

    assert fake_konpro.count("webhook.list") == 2
    [retry] = [entry for entry in logs if entry["event"] == "konpro.retry"]
    assert retry["delay"] >= 1.0


async def test_rate_limiting_that_outlasts_the_attempts_raises_with_retry_after(
    fake_konpro: FakeKonPro,
) -> None:
    fake_konpro.answer_next(3, 429, retry_after="0")

    async with client_for(fake_konpro, max_attempts=3) as client:
        with pytest.raises(RateLimited) as caught:
            await client.list_endpoints()

    assert caught.value.retry_after == 0.0
    assert fake_konpro.count("endpoint.list") == 3


async def test_a_pause_longer_than_the_back_off_cap_is_left_to_the_caller(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.answer_next(1, 429, retry_after="120")

    with pytest.raises(RateLimited) as caught:
        await client.list_endpoints()

    assert caught.value.retry_after == 120.0
    assert fake_konpro.count("endpoint.list") == 1


async def test_server_errors_are_retried_with_back_off_until_success(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.answer_next(1, 500)
    fake_konpro.answer_next(1, 503)

    with capture_logs() as logs:
        assert await client.list_endpoints() == []

    assert fake_konpro.count("endpoint.list") == 3
    assert [entry["attempt"] for entry in logs if entry["event"] == "konpro.retry"] == [1, 2]


async def test_server_errors_that_outlast_the_attempts_raise(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.answer_next(3, 503)

    with pytest.raises(ServerError) as caught:
        await client.list_endpoints()

    assert caught.value.status == 503
    assert fake_konpro.count("endpoint.list") == 3


async def test_a_hanging_call_is_a_transport_error_after_the_timeout(
    fake_konpro: FakeKonPro,
) -> None:
    fake_konpro.hang_next(2)

    async with client_for(fake_konpro, timeout=0.2, max_attempts=2) as client:
        with pytest.raises(TransportError, match="timeout"):
            await client.list_endpoints()

    assert fake_konpro.count("endpoint.list") == 2


@pytest.mark.parametrize("lost", ["gateway error", "timeout"])
async def test_an_add_that_may_have_taken_effect_is_not_repeated(
    fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver, lost: str
) -> None:
    # Repeating it could register the URL twice, each endpoint with its own signing secret.
    if lost == "gateway error":
        fake_konpro.serve_then_fail_next(1, 504)
    else:
        fake_konpro.hang_next(1)

    async with client_for(fake_konpro, timeout=0.5) as client:
        with pytest.raises(ServerError if lost == "gateway error" else TransportError):
            await client.add_endpoint(webhook_receiver.url, None)

    assert fake_konpro.count("endpoint.add") == 1


async def test_an_add_that_konpro_refused_for_now_is_retried(
    client: KonProClient, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    fake_konpro.answer_next(1, 429, retry_after="0")

    added = await client.add_endpoint(webhook_receiver.url, None)

    assert [call.name for call in fake_konpro.writes] == ["endpoint.add", "endpoint.add"]
    assert list(fake_konpro.endpoints) == [added.endpoint_id]


async def test_an_add_that_could_not_connect_is_retried() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: nothing reaches KonPro

        async with KonProClient(
            f"http://127.0.0.1:{port}", SecretStr("k"), max_attempts=2, backoff_base=0.01
        ) as client:
            with capture_logs() as logs, pytest.raises(TransportError):
                await client.add_endpoint("https://bridge.example/hook", None)

    assert [entry["call"] for entry in logs if entry["event"] == "konpro.retry"] == ["endpoint.add"]


async def test_a_delete_retried_after_it_took_effect_succeeds(
    client: KonProClient, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add("https://bridge.example/hook")
    fake_konpro.serve_then_fail_next(1, 504)  # deleted, but the answer was lost

    await client.delete_endpoint(endpoint_id)  # the retry finds it gone: done, as asked

    assert fake_konpro.count("endpoint.delete") == 2
    assert fake_konpro.endpoints == {}


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(None) == 0.0
    assert parse_retry_after("soon") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


# -- the API key stays secret -----------------------------------------------------------------


async def test_the_api_key_never_appears_in_repr_errors_or_logs(
    fake_konpro: FakeKonPro,
) -> None:
    key = fake_konpro.api_key
    echo = json.dumps({"code": 40009, "message": f"invalid credentials: {key}"}).encode()
    fake_konpro.answer_next(1, 500)
    fake_konpro.answer_next(1, 400, body=echo)
    errors: list[KonProError] = []

    with capture_logs() as logs:
        async with client_for(fake_konpro, max_attempts=2) as client:
            for _ in range(2):
                try:
                    await client.list_endpoints()
                except KonProError as exc:
                    errors.append(exc)
            assert key not in repr(client)
            assert key not in str(client)

    assert [type(error) for error in errors] == [AuthenticationError]
    for error in errors:
        for text in (str(error), repr(error), repr(error.args), error.message):
            assert key not in text
    assert "***" in str(errors[0])
    assert logs
    assert key not in repr(logs)


async def test_an_endpoint_konpro_says_is_not_found_under_a_400_is_not_found(
    fake_konpro: FakeKonPro,
) -> None:
    """KonPro's answer for an id it does not have is not documented: a 404, or a 400 whose
    message says "not found". Either is NotFound, so that a delete retried after it took
    effect (its answer lost at a gateway) is done, as asked, rather than a failed run."""
    not_found = orjson.dumps({"code": 40004, "message": "Endpoint not found"})
    endpoint_id = fake_konpro.add("https://bridge.example/hook")
    async with client_for(fake_konpro, max_attempts=3, backoff_max=0.1) as client:
        fake_konpro.answer_next(1, 400, body=not_found)
        with pytest.raises(NotFound):
            await client.update_endpoint(endpoint_id, events=None)

        fake_konpro.serve_then_fail_next(1, 504)  # deleted, but the answer was lost
        fake_konpro.answer_next(1, 400, body=not_found)
        await client.delete_endpoint(endpoint_id)

    assert fake_konpro.endpoints == {}


async def test_a_redirect_from_the_api_does_not_take_the_api_key_to_another_host() -> None:
    """The API key goes in a header of its own (x-api-key), which aiohttp does not strip when
    it follows a redirect to another host: a redirect (a misconfigured proxy, a hijacked DNS
    name) must be an error, and the key must never reach the host it points to."""
    key = "test-api-key-" + "k" * 20
    seen_elsewhere: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen_elsewhere.append(dict(request.headers))
        return web.json_response({"code": 100, "data": [], "message": "ok"})

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    async with serving(other) as other_url:

        async def redirect(request: web.Request) -> web.Response:
            raise web.HTTPTemporaryRedirect(other_url + request.path)

        api = web.Application()
        api.router.add_route("*", "/{tail:.*}", redirect)
        async with (
            serving(api) as api_url,
            KonProClient(api_url, SecretStr(key), timeout=2.0, max_attempts=1) as client,
        ):
            with pytest.raises(KonProError):
                await client.list_endpoints()

    assert not [headers for headers in seen_elsewhere if key in headers.values()]


async def test_a_delete_that_took_effect_stays_done_whatever_failures_come_after(
    fake_konpro: FakeKonPro,
) -> None:
    """A delete whose answer a gateway lost (504) may have deleted the endpoint; a rate limit
    on the retry does not undo that: the NotFound at the next attempt means done, as asked, not
    a failed reconciliation run."""
    endpoint_id = fake_konpro.add("https://bridge.example/hook")
    fake_konpro.serve_then_fail_next(1, 504, call="endpoint.delete")  # deleted, answer lost
    fake_konpro.answer_next(1, 429, retry_after="0", call="endpoint.delete")

    async with client_for(fake_konpro, max_attempts=4, backoff_max=0.1) as client:
        await client.delete_endpoint(endpoint_id)

    assert fake_konpro.count("endpoint.delete") == 3
    assert fake_konpro.endpoints == {}


async def test_a_long_error_message_from_konpro_is_cut_short(fake_konpro: FakeKonPro) -> None:
    """KonPro's error text goes into log lines and /status: a page of HTML or a stack trace
    in it is cut to 300 characters, not copied whole into every line."""
    long = orjson.dumps({"code": 40001, "message": "missing parameter " + "x" * 5000})
    fake_konpro.answer_next(1, 400, body=long)

    async with client_for(fake_konpro, max_attempts=4, backoff_max=0.1) as client:
        with pytest.raises(ValidationFailed) as caught:
            await client.list_endpoints()

    assert caught.value.message.startswith("missing parameter x")
    assert len(caught.value.message) == 300
