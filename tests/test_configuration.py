"""Settings come from one TOML file, environment variables override it, and mistakes are named."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import BaseModel, SecretStr
from structlog.testing import capture_logs

from bridge.config import ConfigError, Settings, load_settings
from tests.support.deliveries import envelope, post_status
from tests.support.harness import BridgeFactory
from tests.support.observing import seen

ROOT = Path(__file__).resolve().parent.parent


def defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the settings model with its default, as plain TOML-like values."""
    flat: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            flat.update(defaults(annotation, f"{prefix}{name}."))
        else:
            flat[prefix + name] = _plain(field.default)
    return flat


def _plain(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def run_cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        check=False,
        timeout=60,
    )


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No stray KONPRO_BRIDGE_* variable or ./config.toml may leak into these tests."""
    for name in list(__import__("os").environ):
        if name.startswith("KONPRO_BRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_without_any_file_the_defaults_apply() -> None:
    settings = load_settings()
    assert settings.server.port == 8080
    assert settings.amqp.exchange == "konpro.events"
    assert settings.konpro.events == ("avatar_video.success", "avatar_video.fail")


def test_a_toml_file_sets_values_and_routes(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[server]\nport = 9000\n[amqp]\nexchange = "acme.konpro"\n'
        '[[amqp.routes]]\nmatch = "video_translate.*"\nexchange = "acme.translations"\n'
    )
    settings = load_settings(config)
    assert settings.server.port == 9000
    assert settings.amqp.exchanges == ("acme.konpro", "acme.translations")


def test_environment_variables_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[amqp]\nexchange = "from.file"\npublish_timeout = 3.0\n')
    monkeypatch.setenv("KONPRO_BRIDGE_AMQP__EXCHANGE", "from.env")
    monkeypatch.setenv("KONPRO_BRIDGE_KONPRO__EVENTS", '["video_translate.success"]')
    settings = load_settings(config)
    assert settings.amqp.exchange == "from.env"
    assert settings.amqp.publish_timeout == 3.0
    assert settings.konpro.events == ("video_translate.success",)


def test_the_file_is_found_through_the_environment_then_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.toml").write_text("[server]\nport = 8100\n")
    assert load_settings().server.port == 8100
    named = tmp_path / "named.toml"
    named.write_text("[server]\nport = 8200\n")
    monkeypatch.setenv("KONPRO_BRIDGE_CONFIG", str(named))
    assert load_settings().server.port == 8200


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*missing\.toml"):
        load_settings(tmp_path / "missing.toml")


def test_each_bad_key_gets_one_line_naming_it_and_no_secret_is_echoed(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(
        '[server]\nport = "eighty"\n'
        '[amqp]\nurl = "http://guest:hunter2-secret@localhost/"\n'
        '[reconcile]\nmode = "fix-it"\n'
        "[log]\nunknown_key = 1\n"
    )
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()[1:]
    assert sorted(line.split(": ")[1] for line in lines) == [
        "amqp.url",
        "log.unknown_key",
        "reconcile.mode",
        "server.port",
    ]
    assert all(line.startswith(f"{config}: ") for line in lines)
    assert "hunter2-secret" not in result.stderr + result.stdout


def test_a_bad_key_set_in_the_environment_is_blamed_on_the_variable_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "good.toml"
    config.write_text("[server]\nport = 9300\n")
    monkeypatch.setenv("KONPRO_BRIDGE_SERVER__PROT", "1")
    monkeypatch.setenv("KONPRO_BRIDGE_AMQP__PUBLISH_TIMEOUT", "soon")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert sorted(str(caught.value).splitlines()) == [
        "KONPRO_BRIDGE_AMQP__PUBLISH_TIMEOUT (environment): amqp.publish_timeout: "
        "Input should be a valid number, unable to parse string as a number",
        "KONPRO_BRIDGE_SERVER__PROT (environment): server.prot: Extra inputs are not permitted",
    ]


def test_a_rule_between_keys_broken_by_a_variable_is_blamed_on_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\n')
    monkeypatch.setenv("KONPRO_BRIDGE_SERVER__MAX_BYTES_IN_FLIGHT", "2048")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value).startswith(
        "KONPRO_BRIDGE_SERVER__MAX_BYTES_IN_FLIGHT (environment): server: Value error, "
        "max_bytes_in_flight (2048) must be at least"
    )


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("KONPRO_BRIDGE_AMQP_URL", "KONPRO_BRIDGE_AMQP__URL"),
        ("KONPRO_BRIDGE_KONPRO_WEBHOOK_SECRET", "KONPRO_BRIDGE_KONPRO__WEBHOOK_SECRET"),
    ],
)
def test_a_variable_with_one_underscore_for_two_is_an_error_not_ignored(
    monkeypatch: pytest.MonkeyPatch, variable: str, meant: str
) -> None:
    """pydantic-settings passes it over without a word: the bridge would run against the
    default broker, or with signatures off. Variables of other names are not the bridge's
    business (the tests' own ``KONPRO_BRIDGE_TEST_AMQP_URL``, say)."""
    monkeypatch.setenv(variable, "amqp://bridge:s3cret@rabbitmq.internal:5672/")
    monkeypatch.setenv("KONPRO_BRIDGE_TEST_AMQP_URL", "amqp://elsewhere/")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(caught.value) == (
        f"{variable} (environment): not a setting: the section and the key are joined by two "
        f"underscores ({meant})"
    )


@pytest.mark.parametrize("path", ["/hooks/{", "/hooks/{id}", "hooks", "/hooks?x=1"])
def test_a_webhook_path_the_router_would_not_take_as_it_is_is_refused(
    tmp_path: Path, path: str
) -> None:
    """Braces make an aiohttp route pattern: ``/hooks/{`` stopped ``run`` with a traceback, and
    ``/hooks/{id}`` took deliveries on every ``/hooks/...`` path."""
    config = tmp_path / "path.toml"
    config.write_text(f'[server]\nwebhook_path = "{path}"\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value) == (
        f"{config}: server.webhook_path: Value error, must start with / and hold no whitespace, "
        "?, #, { or }"
    )


def test_secrets_and_urls_as_a_file_gives_them_lose_their_trailing_newline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Kubernetes Secret made from a file (``echo whsec_... > f``) ends in a newline: kept, it
    keyed every signature check wrongly (KonPro's deliveries all 401, while ``send-test-event``,
    signing with the same newline, passed), and an API key with it was refused as an HTTP
    header with a traceback."""
    monkeypatch.setenv("KONPRO_BRIDGE_KONPRO__WEBHOOK_SECRET", "whsec_current\n")
    monkeypatch.setenv("KONPRO_BRIDGE_KONPRO__PREVIOUS_WEBHOOK_SECRETS", '["whsec_old\\n"]')
    monkeypatch.setenv("KONPRO_BRIDGE_KONPRO__API_KEY", " key-123\r\n")
    monkeypatch.setenv("KONPRO_BRIDGE_AMQP__URL", "amqp://u:p@broker:5672/\n")

    settings = load_settings()

    assert settings.konpro.webhook_secrets == ("whsec_current", "whsec_old")
    assert settings.konpro.api_key.get_secret_value() == "key-123"
    assert settings.amqp.url.get_secret_value() == "amqp://u:p@broker:5672/"


@pytest.mark.parametrize("variable", ["WEBHOOK_SECRET", "API_KEY"])
def test_a_secret_given_as_whitespace_alone_is_an_error_not_no_secret(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """A file holding only its newline (an empty Secret key, a template that rendered
    nothing): taken as empty, a blank webhook secret would turn signature checks off."""
    monkeypatch.setenv(f"KONPRO_BRIDGE_KONPRO__{variable}", "\n")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(caught.value) == (
        f"KONPRO_BRIDGE_KONPRO__{variable} (environment): konpro.{variable.lower()}: "
        "Value error, is blank: only whitespace (an empty file?)"
    )


@pytest.mark.parametrize(
    "variable",
    ["KONPRO_BRIDGE_AMPQ__URL", "KONPRO_BRIDGE_WEBHOOK__SECRET", "KONPRO_BRIDGE_SEVRER__PORT"],
)
def test_a_variable_for_a_section_that_does_not_exist_is_an_error_not_ignored(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """The same mistake in the file (``[ampq]``) is refused; passed over, the bridge would run
    against the default broker, or with signatures off."""
    monkeypatch.setenv(variable, "whsec_0123456789abcdef")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    section = variable.removeprefix("KONPRO_BRIDGE_").partition("__")[0].lower()
    assert str(caught.value) == (
        f"{variable} (environment): not a setting: there is no section {section!r} "
        "(the sections: server, amqp, konpro, reconcile, spool, log)"
    )


def test_the_variables_kubernetes_sets_for_a_service_are_not_taken_for_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Service named ``konpro-bridge`` or ``konpro-bridge-amqp`` gives every pod of its
    namespace variables that start like the bridge's own; they must not stop it."""
    for name, value in {
        "KONPRO_BRIDGE_SERVICE_HOST": "10.0.0.1",
        "KONPRO_BRIDGE_PORT": "tcp://10.0.0.1:8080",
        "KONPRO_BRIDGE_AMQP_SERVICE_HOST": "10.0.0.2",
        "KONPRO_BRIDGE_AMQP_SERVICE_PORT": "5672",
        "KONPRO_BRIDGE_AMQP_SERVICE_PORT_AMQP": "5672",
        "KONPRO_BRIDGE_AMQP_PORT": "tcp://10.0.0.2:5672",
        "KONPRO_BRIDGE_AMQP_PORT_5672_TCP": "tcp://10.0.0.2:5672",
        "KONPRO_BRIDGE_AMQP_PORT_5672_TCP_ADDR": "10.0.0.2",
    }.items():
        monkeypatch.setenv(name, value)

    assert load_settings() == Settings()


def test_a_variable_that_sets_a_whole_section_must_be_a_json_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KONPRO_BRIDGE_AMQP", "amqp://bridge:s3cret@rabbitmq.internal:5672/")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(caught.value) == (
        "KONPRO_BRIDGE_AMQP (environment): sets the whole section, and must be a JSON table; "
        "to set one key, use KONPRO_BRIDGE_AMQP__<KEY>"
    )


def test_a_route_set_key_by_key_in_the_environment_is_blamed_on_its_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Routes are a list of tables, set as one JSON list; the spelling that works for a table
    must not leave an operator with an error that names no variable and no file."""
    monkeypatch.setenv("KONPRO_BRIDGE_AMQP__ROUTES__0__MATCH", "video_translate.*")
    monkeypatch.setenv("KONPRO_BRIDGE_AMQP__ROUTES__0__EXCHANGE", "konpro.translations")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(caught.value).startswith(
        "KONPRO_BRIDGE_AMQP__ROUTES__0__EXCHANGE, KONPRO_BRIDGE_AMQP__ROUTES__0__MATCH "
        "(environment): amqp.routes: "
    )


def test_a_broker_url_the_parser_refuses_is_refused_without_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full-width solidus in a generated password makes ``urllib`` refuse the URL with a
    message that quotes it, password and all."""
    monkeypatch.setenv("KONPRO_BRIDGE_AMQP__URL", "amqp://bridge:Zq7sKp0w\uff0fXv3@rabbitmq/")

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(caught.value) == (
        "KONPRO_BRIDGE_AMQP__URL (environment): amqp.url: Value error, is not a valid URL "
        "(check the characters of each part)"
    )


def test_previous_secrets_without_a_current_one_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "rotation.toml"
    config.write_text('[konpro]\nprevious_webhook_secrets = ["whsec_old"]\n')

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value) == (
        f"{config}: konpro: Value error, previous_webhook_secrets is set without "
        "webhook_secret: during a rotation the new secret goes in webhook_secret, the old ones "
        "in previous_webhook_secrets"
    )
    assert "whsec_old" not in str(caught.value)


def test_a_spool_too_small_for_the_largest_delivery_is_refused(tmp_path: Path) -> None:
    """While the broker is away, a delivery larger than the spool would get 503 however empty
    the spool is, and KonPro would retry it for a day in vain."""
    config = tmp_path / "spool.toml"
    config.write_text("[server]\nmax_body_bytes = 1048576\n[spool]\nmax_bytes = 65536\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value) == (
        f"{config}: Value error, spool.max_bytes (65536) must be at least server.max_body_bytes "
        "(1048576), or a delivery that size can never be spooled while the broker is away"
    )


def test_a_bound_on_bytes_in_flight_without_room_for_the_largest_delivery_is_refused(
    tmp_path: Path,
) -> None:
    config = tmp_path / "bound.toml"
    config.write_text("[server]\nmax_body_bytes = 50000\nmax_bytes_in_flight = 40000\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value) == f"{config}: " + (
        "server: Value error, max_bytes_in_flight (40000) must be at least "
        "max_body_bytes (50000) + 16384, or the largest delivery never fits with its header fields"
    )


@pytest.mark.parametrize(
    ("server", "error"),
    [
        (
            "max_body_bytes = 16777217",
            "server.max_body_bytes: Input should be less than or equal to 16777216",
        ),
        (
            "port = 0\nworkers = 2",
            "server: Value error, port 0 (a free port) cannot be shared by 2 workers: set a port",
        ),
        (
            "port = 9000\nmetrics_port = 9000",
            "server: Value error, metrics_port (9000) must differ from port; "
            "0 serves /metrics on the main port",
        ),
    ],
    ids=["a body larger than RabbitMQ takes", "workers on port 0", "metrics on the webhook port"],
)
def test_server_settings_the_bridge_could_not_keep_are_refused(
    server: str, error: str, tmp_path: Path
) -> None:
    config = tmp_path / "server.toml"
    config.write_text(f"[server]\n{server}\n")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value) == f"{config}: {error}"


@pytest.mark.parametrize("events", ["[not json", "avatar_video.success"])
def test_a_list_variable_that_is_not_json_is_named_not_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, events: str
) -> None:
    """pydantic-settings names only the section (``konpro``): with the API key, the secret and
    the events all set as ``KONPRO_BRIDGE_KONPRO__*``, the operator could not tell which."""
    config = tmp_path / "good.toml"
    config.write_text("[server]\nport = 9300\n")
    monkeypatch.setenv("KONPRO_BRIDGE_KONPRO__API_KEY", "key-123")
    monkeypatch.setenv("KONPRO_BRIDGE_KONPRO__EVENTS", events)

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value) == (
        'KONPRO_BRIDGE_KONPRO__EVENTS (environment): must be JSON, e.g. ["a", "b"]'
    )


@pytest.mark.parametrize("before_the_command", [True, False])
def test_config_may_be_given_before_or_after_the_command(
    tmp_path: Path, before_the_command: bool
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("[server]\nport = 9300\n")
    option = ("--config", str(config))
    args = (*option, "check-config") if before_the_command else ("check-config", *option)

    result = run_cli(*args, cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["server"]["port"] == 9300


def test_a_toml_syntax_error_is_reported_with_the_file_name(tmp_path: Path) -> None:
    config = tmp_path / "broken.toml"
    config.write_text("[server\nport = 1\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(config)


def test_check_config_prints_effective_settings_with_secrets_masked(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[amqp]\nurl = "amqp://bridge:amqp-pass-123@rabbit:5672/prod"\n'
        '[konpro]\napi_key = "key-abc-123"\nwebhook_secret = "whsec_signing-123"\n'
        'previous_webhook_secrets = ["whsec_old-456"]\n'
    )
    env = {"PATH": "/usr/bin:/bin", "KONPRO_BRIDGE_SERVER__PORT": "9100"}
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["server"]["port"] == 9100
    assert shown["amqp"]["url"] == "amqp://bridge:***@rabbit:5672/prod"
    for secret in ("amqp-pass-123", "key-abc-123", "whsec_signing-123", "whsec_old-456"):
        assert secret not in result.stdout + result.stderr


def test_a_publish_timeout_longer_than_konpro_waits_is_valid_but_warned_about(
    tmp_path: Path,
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("[amqp]\npublish_timeout = 12.0\n")
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        "warning: amqp.publish_timeout (12 s) is not under the 10 s KonPro waits for an answer"
    )
    assert Settings().doubts() == []
    at_the_deadline = Settings.model_validate({"amqp": {"publish_timeout": 10.0}})
    just_under = Settings.model_validate({"amqp": {"publish_timeout": 9.9}})
    assert (len(at_the_deadline.doubts()), just_under.doubts()) == (1, [])  # "10 s or more"


def test_require_signature_with_no_way_to_a_secret_is_warned_about(tmp_path: Path) -> None:
    """``run`` refuses to start so (unless ``reconcile --once`` stored a secret): check-config
    said nothing."""
    config = tmp_path / "bridge.toml"
    config.write_text("[konpro]\nrequire_signature = true\n")
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(
        "warning: konpro.require_signature is set, but no konpro.webhook_secret, and "
        "reconciliation cannot learn one"
    )
    learns = {"api_key": "key", "public_url": "https://hooks.example.com/webhooks/konpro"}
    for konpro in ({"webhook_secret": "whsec_x"}, learns):
        settings = Settings.model_validate({"konpro": {"require_signature": True, **konpro}})
        assert settings.doubts() == []


def test_a_public_url_whose_path_the_bridge_does_not_serve_is_warned_about(tmp_path: Path) -> None:
    """KonPro would deliver where the bridge answers 404 (or 405, with a trailing slash)."""
    config = tmp_path / "bridge.toml"
    config.write_text('[konpro]\npublic_url = "https://hooks.example.com/konpro"\n')
    result = run_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        "warning: the path of konpro.public_url (/konpro) is not server.webhook_path "
        "(/webhooks/konpro): KonPro's deliveries get 405 unless a proxy in front of the bridge "
        "rewrites the path\n"
    )
    served = {"public_url": "https://hooks.example.com/webhooks/konpro"}
    assert Settings.model_validate({"konpro": served}).doubts() == []


def test_a_config_path_that_is_a_directory_says_so(tmp_path: Path) -> None:
    """A ConfigMap mounted without ``subPath``: "not found" sent the operator looking for a file
    that is there."""
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)
    assert str(caught.value) == f"config file {tmp_path} is a directory; name the file in it"


def test_the_example_file_documents_every_key_with_its_default() -> None:
    example = tomllib.loads((ROOT / "config.example.toml").read_text())
    assert flatten(example) == defaults(Settings)


def test_the_readme_settings_table_lists_every_key_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| `([^`]*)` \|", readme, flags=re.MULTILINE)
    documented = {key: json.loads(default) for key, default in rows}
    assert documented == defaults(Settings)


def test_the_example_file_is_a_valid_configuration() -> None:
    settings = load_settings(ROOT / "config.example.toml")
    assert settings == Settings.model_validate({})


def test_require_signature_with_a_reconciler_in_verify_mode_is_warned_about() -> None:
    """Verify mode stores no secret: such a bridge can never learn one."""
    konpro = {
        "api_key": "key",
        "public_url": "https://hooks.example.com/webhooks/konpro",
        "require_signature": True,
    }
    settings = Settings.model_validate({"konpro": konpro, "reconcile": {"mode": "verify"}})
    assert any("require_signature" in doubt for doubt in settings.doubts())


def test_a_default_config_toml_that_is_a_directory_is_an_error(tmp_path: Path) -> None:
    """A ConfigMap mounted at ``./config.toml`` without ``subPath``: skipped, the bridge ran
    on the defaults without a word."""
    (tmp_path / "config.toml").mkdir()

    with pytest.raises(ConfigError) as caught:
        load_settings()

    assert str(caught.value) == "config file config.toml is a directory; name the file in it"


def test_a_route_written_as_an_amqp_pattern_is_warned_about() -> None:
    """Routes match event types with shell-style globs; ``#`` is AMQP's, and matches nothing."""
    routes = [{"match": "video_translate.#", "exchange": "translations"}]

    [doubt] = Settings.model_validate({"amqp": {"routes": routes}}).doubts()

    assert doubt.startswith("amqp.routes match 'video_translate.#' holds '#'")
    glob = [{"match": "video_translate.*", "exchange": "translations"}]
    assert Settings.model_validate({"amqp": {"routes": glob}}).doubts() == []


def test_a_rule_between_keys_broken_in_the_file_is_not_blamed_on_other_variables_of_its_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A section's variables are not all to blame for a rule between its keys broken in the
    file (``server.host`` set in a Kubernetes manifest, say): the file is named."""
    config = tmp_path / "bridge.toml"
    config.write_text("[server]\nmax_bytes_in_flight = 2048\n")
    monkeypatch.setenv("KONPRO_BRIDGE_SERVER__HOST", "127.0.0.1")

    with pytest.raises(ConfigError) as caught:
        load_settings(config)

    assert str(caught.value).startswith(
        f"{config}: server: Value error, max_bytes_in_flight (2048) must be at least"
    ), str(caught.value)


async def test_the_warning_about_a_public_url_path_names_the_answer_deliveries_really_get(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """Every path answers OPTIONS (KonPro's check), so a delivery to another path gets 405:
    the warning names what the bridge really answers."""
    public_url = "https://hooks.example.com/konpro"
    with capture_logs() as logs:
        async with start_bridge(konpro={"public_url": public_url}) as bridge:
            answered = await post_status(http, bridge.url + "/konpro", envelope("astray"))
    (doubt,) = [entry["detail"] for entry in seen(logs, "bridge.setting_doubtful")]
    assert "public_url" in doubt
    assert f"get {answered}" in doubt, f"deliveries get {answered}; the warning says: {doubt}"


@pytest.mark.parametrize(
    ("toml", "refused"),
    [
        ("[server]\nmax_body_bytes = 50000\nmax_bytes_in_flight = 60000\n", True),
        ("[server]\nmax_body_bytes = 50000\nmax_bytes_in_flight = 66383\n", True),
        ("[server]\nmax_body_bytes = 50000\nmax_bytes_in_flight = 66384\n", False),
        ("[server]\nmax_body_bytes = 50000\n[spool]\nmax_bytes = 49999\n", True),
        ("[server]\nmax_body_bytes = 50000\n[spool]\nmax_bytes = 50000\n", False),
    ],
    ids=[
        "in flight: one body, no room for its header fields",
        "in flight: one byte short of the allowance",
        "in flight: exactly one body and the allowance",
        "spool: one byte short of one body",
        "spool: exactly one body",
    ],
)
def test_the_bounds_that_must_hold_one_delivery_are_exact(
    tmp_path: Path, toml: str, refused: bool
) -> None:
    """max_bytes_in_flight must hold the largest body plus 16384 bytes of header fields, and
    spool.max_bytes the largest body, as the refusals say: a bound below that would answer 503
    to (or never spool) a delivery the bridge claims to take."""
    config = tmp_path / "bounds.toml"
    config.write_text(toml)

    if refused:
        with pytest.raises(ConfigError, match="must be at least"):
            load_settings(config)
    else:
        load_settings(config)
