"""The one settings model: a TOML file, overridden by ``KONPRO_BRIDGE_*`` environment variables.

Key names are a contract: deployment tooling writes them. Every key has a default that is safe to
run with, and every secret is a ``SecretStr`` so that it cannot reach a log line or ``repr`` by
accident.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Final, Literal, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)
from yarl import URL

KONPRO_ANSWER_DEADLINE = 10.0
"""Seconds KonPro waits for a 2xx before it counts a delivery as failed and sends it again."""
ENV_PREFIX = "KONPRO_BRIDGE_"
CONFIG_ENV_VAR = f"{ENV_PREFIX}CONFIG"
DEFAULT_CONFIG_FILE = Path("config.toml")
MASK = "***"


AMQP_URL_PARAMETERS: Final = frozenset(
    {
        "cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl",  # TLS (aiormq)
        "heartbeat", "timeout", "name", "auth",  # aiormq
        "reconnect_interval", "fail_fast", "interleave", "happy_eyeballs_delay",  # aio-pika
    }
)  # fmt: skip
"""The query parameters of ``amqp.url`` that aiormq and aio-pika read; any other is ignored."""

HEADER_FIELDS_ALLOWANCE = 16_384
"""Room beside the largest body in ``server.max_bytes_in_flight`` for a delivery's header fields,
which count too (KonPro's take about half a kilobyte)."""


class ConfigError(Exception):
    """The configuration cannot be used; the message is fit to show an operator as it is."""


def _parsed_url(value: str) -> URL:
    """``value`` as a URL, or an error that does not quote it: a URL may carry a password."""
    try:
        return URL(value)
    except ValueError:
        raise ValueError("is not a valid URL (check the characters of each part)") from None


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True, frozen=True)


def _without_surrounding_whitespace(value: Any) -> Any:
    """A secret or URL as a file gives it has a newline at its end (``kubectl create secret
    --from-file``); no KonPro secret, API key or broker URL has whitespace around it. Kept, the
    newline would key every signature check wrongly, or be refused in an HTTP header. A value
    of whitespace alone is refused: taken as empty, a blank secret would turn signatures off."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str):
        if value and not value.strip():
            raise ValueError("is blank: only whitespace (an empty file?)")
        return value.strip()
    if isinstance(value, list | tuple):
        return [_without_surrounding_whitespace(item) for item in value]
    return value


class ServerSettings(_Section):
    host: str = "0.0.0.0"  # noqa: S104 - a sidecar listens on the pod's interfaces
    port: int = Field(default=8080, ge=0, le=65535)
    webhook_path: str = "/webhooks/konpro"
    # At most 16 MiB: RabbitMQ 4 refuses larger messages unless max_message_size is raised.
    max_body_bytes: int = Field(default=1_048_576, ge=1024, le=16_777_216)
    max_header_bytes: int = Field(default=8190, ge=1024)
    max_bytes_in_flight: int = Field(default=67_108_864, ge=1024)
    body_timeout: float = Field(default=10.0, gt=0)
    keepalive_timeout: float = Field(default=15.0, gt=0)
    shutdown_timeout: float = Field(default=10.0, gt=0)
    workers: int = Field(default=1, ge=1, le=64)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    readiness: Literal["broker", "accepting"] = "broker"

    @field_validator("webhook_path")
    @classmethod
    def _plain_path(cls, value: str) -> str:
        # Braces would make it an aiohttp route pattern, matching other paths (or none).
        if not re.fullmatch(r"/[^\s?#{}]*", value):
            raise ValueError("must start with / and hold no whitespace, ?, #, { or }")
        return value

    @model_validator(mode="after")
    def _room_for_one_body(self) -> ServerSettings:
        if self.max_bytes_in_flight < self.max_body_bytes + HEADER_FIELDS_ALLOWANCE:
            raise ValueError(
                f"max_bytes_in_flight ({self.max_bytes_in_flight}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}) + {HEADER_FIELDS_ALLOWANCE}, "
                "or the largest delivery never fits with its header fields"
            )
        return self

    @model_validator(mode="after")
    def _one_port_for_all_workers(self) -> ServerSettings:
        # Port 0 is picked by each worker as it listens: each would get a port of its own.
        if self.workers > 1 and self.port == 0:
            raise ValueError(
                f"port 0 (a free port) cannot be shared by {self.workers} workers: set a port"
            )
        return self

    @model_validator(mode="after")
    def _metrics_on_a_port_of_their_own(self) -> ServerSettings:
        # With workers sharing the port, the kernel would hand deliveries to the metrics site.
        if self.metrics_port and self.metrics_port == self.port:
            raise ValueError(
                f"metrics_port ({self.metrics_port}) must differ from port; "
                "0 serves /metrics on the main port"
            )
        return self

    def local_url(self, path: str = "", *, port: int | None = None) -> str:
        """``path`` on this bridge as reached from the same host: a wildcard address over
        loopback. ``port`` replaces the configured one (say, the port actually bound)."""
        host = self.host
        if host in {"0.0.0.0", ""}:  # noqa: S104 - a wildcard is reached over loopback
            host = "127.0.0.1"
        elif host == "::":  # IPv6 alone: asyncio sets IPV6_V6ONLY on the socket
            host = "[::1]"
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port if port is None else port}{path}"


class Route(_Section):
    match: str = Field(min_length=1)
    exchange: str = Field(min_length=1, max_length=200)


class AmqpSettings(_Section):
    url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672/")
    exchange: str = Field(default="konpro.events", min_length=1, max_length=200)
    publish_timeout: float = Field(default=5.0, gt=0)
    reconnect_interval: float = Field(default=2.0, gt=0)
    routes: tuple[Route, ...] = ()

    _strip_url = field_validator("url", mode="before")(_without_surrounding_whitespace)

    @field_validator("url")
    @classmethod
    def _amqp_scheme(cls, value: SecretStr) -> SecretStr:
        url = _parsed_url(value.get_secret_value())
        if url.scheme not in {"amqp", "amqps"} or not url.host:
            raise ValueError("must be an amqp:// or amqps:// URL with a host")
        # aiormq checks the certificate only when this is absent or "0": "false" would turn
        # the check off, which nobody who writes it means.
        if url.query.get("no_verify_ssl", "0") not in {"0", "1"}:
            raise ValueError("no_verify_ssl must be 0 or 1 (1 turns the certificate check off)")
        return value

    @field_serializer("url", when_used="json")
    def _masked_url(self, value: SecretStr) -> str:
        return masked_url(value.get_secret_value())

    @property
    def exchanges(self) -> tuple[str, ...]:
        """Every exchange events may be published to, the default first, without repeats."""
        return tuple(dict.fromkeys([self.exchange, *(route.exchange for route in self.routes)]))


class KonProSettings(_Section):
    api_url: str = "https://api.konpro.ai"
    api_key: SecretStr = SecretStr("")
    webhook_secret: SecretStr = SecretStr("")
    previous_webhook_secrets: tuple[SecretStr, ...] = ()
    require_signature: bool = False
    timestamp_tolerance: float = Field(default=300.0, gt=0)
    replay_window: float = Field(default=600.0, ge=0)
    replay_cache_size: int = Field(default=100_000, ge=0)
    public_url: str = ""
    events: tuple[str, ...] = ("avatar_video.success", "avatar_video.fail")
    request_timeout: float = Field(default=10.0, gt=0)

    _strip_surrounding_whitespace = field_validator(
        "api_key",
        "webhook_secret",
        "previous_webhook_secrets",
        "api_url",
        "public_url",
        mode="before",
    )(_without_surrounding_whitespace)

    @field_validator("api_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        url = _parsed_url(value)
        if url.scheme not in {"http", "https"} or not url.host:
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("public_url")
    @classmethod
    def _http_url_or_empty(cls, value: str) -> str:
        return cls._http_url(value) if value else value

    @model_validator(mode="after")
    def _rotation_has_a_new_secret(self) -> KonProSettings:
        # Else the bridge would take a learnt secret beside them, while its reconciler, seeing
        # secrets configured, stores none: one reading says configured, the other learnt.
        if self.previous_webhook_secrets and not self.webhook_secret.get_secret_value():
            raise ValueError(
                "previous_webhook_secrets is set without webhook_secret: during a rotation the "
                "new secret goes in webhook_secret, the old ones in previous_webhook_secrets"
            )
        return self

    @property
    def registration_allowance(self) -> float:
        """Seconds a stop waits for a registration already sent: its answer is the only time
        KonPro tells the endpoint's signing secret."""
        return self.request_timeout + 1.0

    @property
    def webhook_secrets(self) -> tuple[str, ...]:
        """All secrets a delivery may be signed with: the current one, then those being retired."""
        secrets = (self.webhook_secret, *self.previous_webhook_secrets)
        return tuple(s.get_secret_value() for s in secrets if s.get_secret_value())


class ReconcileSettings(_Section):
    enabled: bool = True
    interval: float = Field(default=300.0, ge=1.0)
    mode: Literal["repair", "verify"] = "repair"
    max_backoff: float = Field(default=300.0, ge=1.0)


class SpoolSettings(_Section):
    path: Path = Path("/var/lib/konpro-bridge/spool")
    max_bytes: int = Field(default=268_435_456, ge=1024)
    max_events: int = Field(default=100_000, ge=1)
    min_free_bytes: int = Field(default=16_777_216, ge=0)
    parked_retry_interval: float = Field(default=600.0, gt=0)

    def at(self, path: Path) -> SpoolSettings:
        """The same limits for the spool in ``path`` (a worker's, say)."""
        return self.model_copy(update={"path": path})


class LogSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        hide_input_in_errors=True,
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    amqp: AmqpSettings = AmqpSettings()
    konpro: KonProSettings = KonProSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    spool: SpoolSettings = SpoolSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win: arguments, then the environment, then the TOML file.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    @model_validator(mode="after")
    def _room_in_the_spool_for_one_body(self) -> Settings:
        if self.spool.max_bytes < self.server.max_body_bytes:
            raise ValueError(
                f"spool.max_bytes ({self.spool.max_bytes}) must be at least "
                f"server.max_body_bytes ({self.server.max_body_bytes}), or a delivery that size "
                "can never be spooled while the broker is away"
            )
        return self

    def doubts(self) -> list[str]:
        """Settings that are valid but work against the bridge, each said in a sentence."""
        doubts = []
        publish_timeout = self.amqp.publish_timeout
        if publish_timeout >= KONPRO_ANSWER_DEADLINE:
            doubts.append(
                f"amqp.publish_timeout ({publish_timeout:g} s) is not under the "
                f"{KONPRO_ANSWER_DEADLINE:g} s KonPro waits for an answer: while the broker is "
                "slow, deliveries are answered too late, and KonPro sends them again"
            )
        konpro = self.konpro
        public_path = URL(konpro.public_url).path if konpro.public_url else None
        if public_path is not None and public_path != self.server.webhook_path:
            doubts.append(
                f"the path of konpro.public_url ({public_path}) is not server.webhook_path "
                f"({self.server.webhook_path}): KonPro's deliveries get 405 unless a proxy "
                "in front of the bridge rewrites the path"
            )
        amqp_url = URL(self.amqp.url.get_secret_value())
        if unread := sorted(set(amqp_url.query) - AMQP_URL_PARAMETERS):
            doubts.append(
                f"amqp.url names {', '.join(unread)}, which nothing reads (TLS takes cafile, "
                "certfile, keyfile; see the README): it is passed over"
            )
        if amqp_url.query.get("no_verify_ssl") == "1":
            doubts.append(
                "amqp.url has no_verify_ssl=1: the broker's certificate is not checked, and "
                "anyone on the path can pose as the broker"
            )
        for route in self.amqp.routes:
            if "#" in route.match:
                doubts.append(
                    f"amqp.routes match {route.match!r} holds '#', which a route's glob "
                    "(*, ?, [...]) takes literally: it matches no event type; '*' matches "
                    "any run of characters, dots included"
                )
        if konpro.require_signature and not konpro.webhook_secrets and not self.learns_secret():
            doubts.append(
                "konpro.require_signature is set, but no konpro.webhook_secret, and "
                "reconciliation cannot learn one: the bridge starts only with a secret that "
                "`reconcile --once` stored in spool.path"
            )
        return doubts

    def may_use_stored_secret(self) -> bool:
        """Whether the signing secret may come from the file registration stores: none is
        configured, and reconciliation runs (in verify mode too: an operator's
        ``reconcile --once`` may store it). ``learns_secret`` asks the narrower question."""
        return not self.konpro.webhook_secrets and why_not_reconcile(self) is None

    def learns_secret(self) -> bool:
        """Whether registration can give the bridge its signing secret: none is configured,
        and reconciliation runs in repair mode (verify mode registers nothing, stores nothing)."""
        return self.may_use_stored_secret() and self.reconcile.mode == "repair"

    def secrets(self) -> tuple[str, ...]:
        """Every secret value in force, so that log output can be scrubbed of them."""
        password = URL(self.amqp.url.get_secret_value()).password
        values = (password, self.konpro.api_key.get_secret_value(), *self.konpro.webhook_secrets)
        return tuple(value for value in values if value)


def why_not_reconcile(settings: Settings) -> str | None:
    """Why the daemon will not reconcile, in words for its start-up log; ``None`` if it will."""
    if not settings.reconcile.enabled:
        return "reconcile.enabled is false"
    if not settings.konpro.api_key.get_secret_value():
        return "konpro.api_key is not set"
    if not settings.konpro.public_url:
        return "konpro.public_url is not set"
    return None


def masked_url(url: str) -> str:
    """The URL with its password replaced, fit for logs and ``check-config``."""
    parsed = URL(url)
    return str(parsed.with_password(MASK)) if parsed.password else url


def resolve_config_path(explicit: Path | None) -> Path | None:
    """``--config``, else ``$KONPRO_BRIDGE_CONFIG``, else ``./config.toml`` if present."""
    if explicit is None and (from_env := os.environ.get(CONFIG_ENV_VAR)):
        explicit = Path(from_env)
    candidate = DEFAULT_CONFIG_FILE if explicit is None else explicit
    if candidate.is_dir():  # a Kubernetes ConfigMap mounted without subPath, say
        raise ConfigError(f"config file {candidate} is a directory; name the file in it")
    if candidate.is_file():
        return candidate
    if explicit is not None:
        raise ConfigError(f"config file not found: {explicit}")
    return None


def load_settings(path: Path | None = None) -> Settings:
    """Load settings from the resolved TOML file and the environment, or raise ``ConfigError``."""
    toml_file = resolve_config_path(path)
    if misspelt := _misspelt_variables():
        raise ConfigError("\n".join(misspelt))

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=toml_file)

    try:
        merged = _FromFile()
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, toml_file)) from None
    except SettingsError as exc:  # an environment variable's value is not valid JSON
        raise ConfigError(_describe_unparsable(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable file, TOML syntax error
        raise ConfigError(f"{toml_file}: {exc}") from None
    # A plain ``Settings``, not the class made here for this one file: it compares equal to
    # settings built in code, and no temporary class shows in its repr or type checks.
    return Settings.model_validate(merged.model_dump())


def describe_errors(error: ValidationError, source: Path | None) -> str:
    """One line per bad key, naming it as the TOML file spells it, and where it was set (the
    environment variable that overrides the file, else the file); never the offending value."""
    lines = []
    for item in error.errors(include_input=False, include_url=False):
        parts = [str(part) for part in item["loc"]]
        variables = _blamed_variables(parts, item["msg"])
        line = [f"{variables} (environment)" if variables else str(source or "")]
        if parts:
            line.append(".".join(parts))
        line.append(item["msg"])
        lines.append(": ".join(part for part in line if part))
    return "\n".join(lines)


def _blamed_variables(key: list[str], message: str) -> str | None:
    """The variables that set ``key``, as one text; for a rule between keys (``key`` is a
    section, or none for a rule between sections), those of the keys its message names."""
    if len(key) > 1 or (key and key[0] not in Settings.model_fields):
        return _environment_variable_setting(key)
    sections = key or list(Settings.model_fields)
    named = [
        name
        for section in sections
        for name, section_key in _section_variables(section)
        if re.search(rf"\b{re.escape(section_key)}\b", message)
        and (key or f"{section}.{section_key}" in message)
    ]
    return ", ".join(named) or (_environment_variable_setting(key) if key else None)


def _section_variables(section: str) -> list[tuple[str, str]]:
    """The variables set for keys of ``section``, each with the key it sets."""
    head = f"{ENV_PREFIX}{section}__".upper()
    return [
        (name, name[len(head) :].lower())
        for name in sorted(os.environ)
        if name.upper().startswith(head)
    ]


_SERVICE_LINK = re.compile(
    r"(_SERVICE_(HOST|PORT(_\w+)?)|_PORT(_\d+_(TCP|UDP|SCTP)(_PROTO|_PORT|_ADDR)?)?)$",
    re.IGNORECASE,
)
"""The end of a variable Kubernetes sets for a Service (``<NAME>_SERVICE_HOST``, ``<NAME>_PORT``
...): a Service named ``konpro-bridge-amqp`` gives every pod ``KONPRO_BRIDGE_AMQP_PORT``."""


def _misspelt_variables() -> list[str]:
    """Variables of the bridge's prefix that set nothing: pydantic-settings passes them over
    without a word, and the bridge would run on the defaults instead. A single underscore
    (``KONPRO_BRIDGE_AMQP_URL``) or a section that does not exist (``KONPRO_BRIDGE_AMPQ__URL``);
    Kubernetes' service-link variables are left alone."""
    lines = []
    sections = ", ".join(Settings.model_fields)
    for name in sorted(os.environ):
        rest = name.upper().removeprefix(ENV_PREFIX)
        if rest == name.upper() or _is_service_link(rest, os.environ[name]):
            continue
        section, joined, _ = rest.partition("__")
        if joined and section.lower() not in Settings.model_fields:
            lines.append(
                f"{name} (environment): not a setting: there is no section "
                f"{section.lower()!r} (the sections: {sections})"
            )
            continue
        for known in Settings.model_fields:
            head = known.upper() + "_"
            if rest.startswith(head) and not rest.startswith(head + "_"):
                meant = f"{ENV_PREFIX}{head}_{rest[len(head) :]}"
                lines.append(
                    f"{name} (environment): not a setting: the section and the key are joined "
                    f"by two underscores ({meant})"
                )
    return lines


def _is_service_link(rest: str, value: str) -> bool:
    """Whether ``KONPRO_BRIDGE_<rest>`` is one Kubernetes set for a Service; a bare ``_PORT``
    only with the value Kubernetes gives it (``tcp://10.0.0.1:5672``)."""
    link = _SERVICE_LINK.search(rest)
    if link is None:
        return False
    return link[0].upper() != "_PORT" or re.match(r"(tcp|udp|sctp)://", value) is not None


def _describe_unparsable(error: SettingsError) -> str:
    """Name the variables whose value is not the JSON their key needs (a list, a table), where
    pydantic-settings names only the section."""
    section = re.search(r'field "(\w+)"', str(error))
    named = []
    whole = f"{ENV_PREFIX}{section[1]}".upper() if section is not None else ""
    if whole and whole in {name.upper() for name in os.environ}:
        return (
            f"{whole} (environment): sets the whole section, and must be a JSON table; "
            f"to set one key, use {whole}__<KEY>"
        )
    if section is not None and section[1] in Settings.model_fields:
        fields = type(Settings.model_fields[section[1]].default).model_fields  # a section's model
        for name, key in _section_variables(section[1]):
            if key in fields and get_origin(fields[key].annotation) in {tuple, list, dict}:
                try:
                    json.loads(os.environ[name])
                except ValueError:
                    named.append(name)
    if not named:
        return f"environment: {error}"
    return "\n".join(f'{name} (environment): must be JSON, e.g. ["a", "b"]' for name in named)


def _environment_variable_setting(key: list[str]) -> str | None:
    """The variable that set ``key``, or the section holding it, or parts of it (``..._0__MATCH``
    for a list of tables, which is set as one JSON list), if one is set."""
    present = {name.upper() for name in os.environ}
    for depth in range(len(key), 0, -1):
        name = ENV_PREFIX.upper() + "__".join(key[:depth]).upper()
        if name in present:
            return name
    if len(key) < 2:  # a section's variables are not all to blame for one of its keys
        return None
    head = ENV_PREFIX.upper() + "__".join(key).upper() + "__"
    return ", ".join(sorted(name for name in present if name.startswith(head))) or None
