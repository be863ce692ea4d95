"""The operator's KonPro commands: tables for people, ``--json`` for scripts, one line on errors.

Every command runs as ``python -m bridge ...`` in a subprocess, as an operator runs it, against
the fake KonPro (which runs in this test's event loop, so the subprocess is awaited, not waited).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fake_konpro import EVENT_TYPES, FakeKonPro, WebhookReceiver
from tests.support.process import Ran, run_command, write_toml

pytest_plugins = ("tests.fake_konpro",)

EVENTS = ["avatar_video.success", "avatar_video.fail"]


Cli = Callable[..., Awaitable[Ran]]


@pytest.fixture
def settings(tmp_path: Path, fake_konpro: FakeKonPro) -> dict[str, dict[str, Any]]:
    """Settings sections the ``cli`` fixture writes to a config file; tests may edit them first."""
    return {
        "konpro": {"api_url": fake_konpro.url, "api_key": fake_konpro.api_key},
        "spool": {"path": str(tmp_path / "spool")},
        "log": {"format": "json"},
    }


@pytest.fixture
def cli(tmp_path: Path, settings: dict[str, dict[str, Any]]) -> Cli:
    """Runs ``konpro-bridge ARGS... --config <file>``, the settings file after the command."""

    async def run(*args: str, env: dict[str, str] | None = None) -> Ran:
        config = write_toml(tmp_path / "bridge.toml", settings)
        return await run_command(*args, "--config", config, env=env, cwd=tmp_path)

    return run


def lines(text: str) -> list[str]:
    return text.strip().splitlines()


# -- reading the account ----------------------------------------------------------------------


async def test_events_lists_what_konpro_can_deliver(cli: Cli) -> None:
    human, script = await cli("events"), await cli("events", "--json")

    assert (human.code, lines(human.stdout)) == (0, list(EVENT_TYPES))
    assert (script.code, script.json()) == (0, list(EVENT_TYPES))


async def test_endpoints_list_shows_a_table_without_secrets(
    cli: Cli, fake_konpro: FakeKonPro
) -> None:
    some = fake_konpro.add("https://a.example.com/hook", EVENTS, created_at=1_700_000_000)
    every = fake_konpro.add("https://b.example.com/hook", None, status="disabled")

    ran = await cli("endpoints", "list")

    header, *rows = lines(ran.stdout)
    assert header.split() == ["ENDPOINT", "ID", "STATUS", "CREATED", "EVENTS", "URL"]
    assert rows[0].split() == [
        some,
        "enabled",
        "2023-11-14T22:13:20+00:00",
        "avatar_video.success,avatar_video.fail",
        "https://a.example.com/hook",
    ]
    assert rows[1].split()[:2] == [every, "disabled"]
    assert rows[1].split()[3] == "all"
    assert_no_secret(ran, fake_konpro)


async def test_endpoints_list_json_is_one_document_with_secrets_masked(
    cli: Cli, fake_konpro: FakeKonPro
) -> None:
    endpoint_id = fake_konpro.add("https://a.example.com/hook", None)

    ran = await cli("endpoints", "list", "--json")

    [listed] = ran.json()
    assert (listed["endpoint_id"], listed["events"], listed["secret"]) == (endpoint_id, None, "***")
    assert_no_secret(ran, fake_konpro)


async def test_an_empty_account_lists_only_the_header(cli: Cli) -> None:
    human, script = await cli("endpoints", "list"), await cli("endpoints", "list", "--json")

    assert len(lines(human.stdout)) == 1
    assert script.json() == []


# -- changing the account ---------------------------------------------------------------------


async def test_endpoints_add_without_event_subscribes_to_all_events(
    cli: Cli, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    ran = await cli("endpoints", "add", webhook_receiver.url, "--json")

    [added] = fake_konpro.endpoints.values()
    assert ran.code == 0
    assert fake_konpro.writes[0].json == {"url": webhook_receiver.url, "events": None}
    assert ran.json()["endpoint_id"] == added["endpoint_id"]
    assert webhook_receiver.options_seen == 1
    assert_no_secret(ran, fake_konpro)


async def test_endpoints_add_with_events_prints_the_new_endpoint(
    cli: Cli, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    ran = await cli(
        "endpoints", "add", webhook_receiver.url, "--event", EVENTS[0], "--event", EVENTS[1]
    )

    [added] = fake_konpro.endpoints.values()
    assert added["events"] == EVENTS
    assert ran.code == 0
    assert lines(ran.stdout)[1].split()[0] == added["endpoint_id"]


async def test_a_url_that_fails_konpros_check_is_one_line_and_exit_1(
    cli: Cli, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.options_status = 404

    ran = await cli("endpoints", "add", webhook_receiver.url)

    assert (ran.code, ran.stdout) == (1, "")
    [line] = lines(ran.stderr)
    assert line.startswith("konpro-bridge: endpoint.add: ")
    assert "OPTIONS answered HTTP 404" in line
    assert fake_konpro.endpoints == {}


async def test_endpoints_update_changes_only_what_it_is_given(
    cli: Cli, fake_konpro: FakeKonPro, webhook_receiver: WebhookReceiver
) -> None:
    endpoint_id = fake_konpro.add("https://old.example.com/hook", EVENTS)

    moved = await cli("endpoints", "update", endpoint_id, "--url", webhook_receiver.url)
    narrowed = await cli("endpoints", "update", endpoint_id, "--event", EVENTS[0], "--json")
    widened = await cli("endpoints", "update", endpoint_id, "--all-events", "--json")

    assert (moved.code, narrowed.code, widened.code) == (0, 0, 0)
    assert [call.json for call in fake_konpro.writes] == [
        {"endpoint_id": endpoint_id, "url": webhook_receiver.url, "events": EVENTS},
        {"endpoint_id": endpoint_id, "events": [EVENTS[0]]},
        {"endpoint_id": endpoint_id, "events": None},
    ]
    assert narrowed.json()["events"] == [EVENTS[0]]
    assert widened.json()["events"] is None
    assert list(fake_konpro.endpoints) == [endpoint_id]
    assert fake_konpro.endpoints[endpoint_id]["url"] == webhook_receiver.url


async def test_endpoints_update_needs_something_to_change(cli: Cli) -> None:
    ran = await cli("endpoints", "update", "some-id")

    assert ran.code == 2
    assert "give --url, --event or --all-events" in ran.stderr


async def test_endpoints_delete_removes_only_that_endpoint(
    cli: Cli, fake_konpro: FakeKonPro
) -> None:
    doomed = fake_konpro.add("https://a.example.com/hook")
    kept = fake_konpro.add("https://b.example.com/hook")

    human = await cli("endpoints", "delete", doomed)

    assert (human.code, human.stdout.strip()) == (0, f"deleted {doomed}")
    assert list(fake_konpro.endpoints) == [kept]
    script = await cli("endpoints", "delete", kept, "--json")
    assert script.json() == {"deleted": kept}


@pytest.mark.parametrize(
    "args",
    [("delete", "0" * 32), ("update", "0" * 32, "--url", "https://x.example.com/h")],
)
async def test_an_unknown_endpoint_id_is_one_line_and_exit_1(
    cli: Cli, args: tuple[str, ...]
) -> None:
    ran = await cli("endpoints", *args)

    assert (ran.code, ran.stdout) == (1, "")
    [line] = lines(ran.stderr)
    assert line.startswith("konpro-bridge: ")
    assert "0" * 32 in line or "not found" in line.lower()


# -- reconcile --once -------------------------------------------------------------------------


async def test_a_dry_run_prints_the_plan_and_writes_nothing(
    cli: Cli, settings: dict[str, dict[str, Any]], fake_konpro: FakeKonPro
) -> None:
    settings["konpro"]["public_url"] = "https://hooks.example.com/webhooks/konpro"
    duplicate = fake_konpro.add("https://hooks.example.com/webhooks/konpro/", EVENTS)
    fake_konpro.add("https://hooks.example.com/webhooks/konpro", EVENTS, created_at=1)

    human = await cli("reconcile", "--once", "--dry-run")
    script = await cli("reconcile", "--once", "--dry-run", "--json")

    assert human.code == script.code == 0
    assert lines(human.stdout) == [
        "result: drift (verify mode: nothing was changed)",
        f"endpoint: {script.json()['endpoint_id']}",
        "planned actions:",
        f"  delete {duplicate} (https://hooks.example.com/webhooks/konpro/)",
    ]
    assert (script.json()["mode"], script.json()["result"]) == ("verify", "drift")
    assert fake_konpro.writes == []
    assert not (Path(settings["spool"]["path"]) / "webhook_secret").exists()


async def test_reconcile_once_registers_the_public_url_and_keeps_its_secret(
    cli: Cli,
    settings: dict[str, dict[str, Any]],
    fake_konpro: FakeKonPro,
    webhook_receiver: WebhookReceiver,
) -> None:
    settings["konpro"]["public_url"] = webhook_receiver.url
    settings["reconcile"] = {"enabled": False}  # the daemon's switch: an operator's run is asked

    first = await cli("reconcile", "--once", "--json")
    second = await cli("reconcile", "--once")

    [added] = fake_konpro.endpoints.values()
    assert first.code == 0
    assert {key: first.json()[key] for key in ("mode", "result", "endpoint_id")} == {
        "mode": "repair",
        "result": "added",
        "endpoint_id": added["endpoint_id"],
    }
    assert first.json()["secret_stored"] is True
    secret_file = Path(settings["spool"]["path"]) / "webhook_secret"
    assert secret_file.read_text().strip() == added["secret"]
    assert lines(second.stdout) == [
        "result: ok",
        f"endpoint: {added['endpoint_id']}",
        "actions taken: none",
    ]
    assert_no_secret(first, fake_konpro)


async def test_reconcile_needs_once_and_a_public_url(cli: Cli) -> None:
    without_once = await cli("reconcile")
    without_url = await cli("reconcile", "--once")

    assert without_once.code == 2
    assert "--once" in without_once.stderr
    assert without_url.code == 2
    assert "konpro-bridge: konpro.public_url is not set" in without_url.stderr


# -- what goes wrong --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [("events",), ("endpoints", "list", "--json"), ("endpoints", "delete", "x")],
)
async def test_a_refused_key_is_one_line_naming_the_setting_never_the_key(
    cli: Cli, settings: dict[str, dict[str, Any]], fake_konpro: FakeKonPro, args: tuple[str, ...]
) -> None:
    settings["konpro"]["api_key"] = "revoked-key-7d31"

    ran = await cli(*args)

    assert (ran.code, ran.stdout) == (1, "")
    [line] = lines(ran.stderr)
    assert line.startswith("konpro-bridge: KonPro refused the API key (konpro.api_key): ")
    assert "401" in line
    assert "revoked-key-7d31" not in ran.stderr
    assert len(fake_konpro.calls) == 1  # a refused key is not retried


async def test_a_failed_reconcile_run_reports_and_exits_1(
    cli: Cli, settings: dict[str, dict[str, Any]], fake_konpro: FakeKonPro
) -> None:
    settings["konpro"].update(public_url="https://hooks.example.com/k", api_key="revoked-7d31")

    ran = await cli("reconcile", "--once", "--json")

    assert ran.code == 1
    assert ran.json()["result"] == "error"
    assert lines(ran.stderr)[-1].startswith("konpro-bridge: KonPro refused the API key")
    assert "revoked-7d31" not in ran.stdout + ran.stderr


async def test_a_missing_api_key_exits_2_before_calling_konpro(
    cli: Cli, settings: dict[str, dict[str, Any]], fake_konpro: FakeKonPro
) -> None:
    del settings["konpro"]["api_key"]

    ran = await cli("endpoints", "list")

    assert ran.code == 2
    assert lines(ran.stderr) == [
        "konpro-bridge: konpro.api_key is not set (config file or KONPRO_BRIDGE_KONPRO__API_KEY)"
    ]
    assert fake_konpro.calls == []


async def test_the_api_key_can_come_from_the_environment(
    cli: Cli, settings: dict[str, dict[str, Any]], fake_konpro: FakeKonPro
) -> None:
    del settings["konpro"]["api_key"]

    ran = await cli("events", env={"KONPRO_BRIDGE_KONPRO__API_KEY": fake_konpro.api_key})

    assert (ran.code, lines(ran.stdout)) == (0, list(EVENT_TYPES))


async def test_konpro_errors_go_to_the_one_line_after_retries(
    cli: Cli, fake_konpro: FakeKonPro
) -> None:
    fake_konpro.answer_next(100, 503)

    ran = await cli("endpoints", "list")

    assert ran.code == 1
    assert lines(ran.stderr)[-1].startswith("konpro-bridge: endpoint.list: ")
    assert fake_konpro.count("endpoint.list") > 1


def assert_no_secret(ran: Ran, fake: FakeKonPro) -> None:
    for endpoint in fake.endpoints.values():
        assert endpoint["secret"] not in ran.stdout + ran.stderr
    assert fake.api_key not in ran.stdout + ran.stderr


@pytest.mark.parametrize("args", [("events",), ("endpoints", "list"), ("reconcile", "--once")])
async def test_an_api_that_keeps_failing_is_one_line_after_the_retries(
    cli: Cli, settings: dict[str, dict[str, Any]], fake_konpro: FakeKonPro, args: tuple[str, ...]
) -> None:
    settings["konpro"]["public_url"] = "https://hooks.example.com/k"
    fake_konpro.answer_next(4, 503)  # every attempt the client makes

    ran = await cli(*args)

    assert ran.code == 1
    [line] = lines(ran.stderr)  # the retries are logged only with log.level = "debug"
    assert line.startswith("konpro-bridge: ")
    assert "503" in line
