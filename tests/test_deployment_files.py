"""The shipped deployment files agree with the settings model and with issue #6's image rules.

Docker and Kubernetes cannot run here, so these checks read the files: what they configure must
be a valid configuration, every variable they set must name a real setting, and the image must
keep its promises (non-root, health check, spool volume).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from bridge.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "examples" / "k8s"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kind(kind: str) -> dict[str, Any]:
    [found] = [
        doc for path in K8S.glob("*.yaml") for doc in _documents(path) if doc["kind"] == kind
    ]
    return found


def _bridge_container() -> dict[str, Any]:
    containers = _kind("StatefulSet")["spec"]["template"]["spec"]["containers"]
    [bridge] = [c for c in containers if c["name"] == "konpro-bridge"]
    return dict(bridge)


def _setting_exists(variable: str) -> bool:
    section, _, key = variable.removeprefix("KONPRO_BRIDGE_").lower().partition("__")
    field = Settings.model_fields.get(section)
    model = field.annotation if field is not None else None
    return isinstance(model, type) and issubclass(model, BaseModel) and key in model.model_fields


def _configmap_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings the ConfigMap's config.toml gives, loaded as the bridge loads them."""
    monkeypatch.delenv("KONPRO_BRIDGE_CONFIG", raising=False)
    config = tmp_path / "config.toml"
    config.write_text(_kind("ConfigMap")["data"]["config.toml"])
    return load_settings(config)


def test_the_configmap_holds_a_valid_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _configmap_settings(tmp_path, monkeypatch)

    assert str(settings.spool.path) == "/var/lib/konpro-bridge/spool"


def test_the_sidecar_takes_its_secrets_from_the_environment_of_a_secret() -> None:
    env = {item["name"]: item for item in _bridge_container()["env"]}

    assert set(env) == {
        "KONPRO_BRIDGE_AMQP__URL",
        "KONPRO_BRIDGE_KONPRO__API_KEY",
        "KONPRO_BRIDGE_KONPRO__WEBHOOK_SECRET",
    }
    assert all("secretKeyRef" in item["valueFrom"] for item in env.values())
    secret_keys = set(_kind("Secret")["stringData"])
    assert {item["valueFrom"]["secretKeyRef"]["key"] for item in env.values()} <= secret_keys


def test_the_sidecar_is_probed_locked_down_and_spools_to_a_volume() -> None:
    bridge = _bridge_container()
    mounts = {mount["mountPath"]: mount for mount in bridge["volumeMounts"]}

    assert bridge["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert bridge["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert bridge["securityContext"]["readOnlyRootFilesystem"] is True
    assert _kind("StatefulSet")["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"]
    assert "/var/lib/konpro-bridge/spool" in mounts
    assert mounts["/etc/konpro-bridge"]["readOnly"] is True


def test_the_sidecar_agrees_with_its_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = _configmap_settings(tmp_path, monkeypatch).server
    pod = _kind("StatefulSet")["spec"]["template"]
    bridge = _bridge_container()
    ports = {port["name"]: port["containerPort"] for port in bridge["ports"]}

    assert (ports["webhooks"], ports["metrics"]) == (server.port, server.metrics_port)
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(server.metrics_port)
    # A sidecar that is not ready takes the whole pod out of its Services.
    assert server.readiness == "accepting"
    # The stop takes the grace period plus about 2 s (aiormq's close); then Kubernetes kills.
    assert pod["spec"]["terminationGracePeriodSeconds"] >= server.shutdown_timeout + 5
    assert bridge["securityContext"]["allowPrivilegeEscalation"] is False
    assert bridge["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "/tmp" in {m["mountPath"] for m in bridge["volumeMounts"]}  # noqa: S108 - read-only root


def test_each_replicas_spool_outlives_its_pod() -> None:
    """A rollout, a scale-down or an eviction deletes the pod: with the spool in an emptyDir,
    the events KonPro got a 2xx for during a broker outage would go with it."""
    workload = _kind("StatefulSet")["spec"]
    volumes = {volume["name"] for volume in workload["template"]["spec"]["volumes"]}
    claims = {claim["metadata"]["name"] for claim in workload["volumeClaimTemplates"]}
    spool = next(m for m in _bridge_container()["volumeMounts"] if "spool" in m["mountPath"])

    assert spool["name"] in claims
    assert spool["name"] not in volumes


def _seconds(duration: str) -> float:
    """A Compose duration such as ``30s`` or ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(
        float(n) * units[unit] for n, unit in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration)
    )


def test_the_stop_gets_the_time_it_takes_before_the_platform_kills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop takes ``server.shutdown_timeout`` plus about 2 s for the broker's close, and up
    to ``konpro.request_timeout`` + 1 s more for a registration in flight. In Kubernetes the
    bridge first sleeps through the moments in which the Service still sends to a terminating
    pod; Compose's default (10 s) is too short."""
    settings = _configmap_settings(tmp_path, monkeypatch)
    stop = settings.server.shutdown_timeout + 2 + settings.konpro.registration_allowance
    pod = _kind("StatefulSet")["spec"]["template"]["spec"]
    [_, delay] = _bridge_container()["lifecycle"]["preStop"]["exec"]["command"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["bridge"]

    assert int(delay) >= 3
    assert pod["terminationGracePeriodSeconds"] >= int(delay) + stop
    defaults = Settings()
    registration = defaults.konpro.registration_allowance
    assert (
        _seconds(compose["stop_grace_period"])
        >= defaults.server.shutdown_timeout + 2 + registration
    )


def test_every_variable_the_deployments_set_names_a_real_setting() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    variables = [*compose["services"]["bridge"]["environment"]]
    variables += [item["name"] for item in _bridge_container()["env"]]

    assert variables
    assert [v for v in variables if not _setting_exists(v)] == []


def test_the_image_runs_as_a_numeric_non_root_user_with_a_health_check_and_a_spool_volume() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]

    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", final_stage, re.M)
    assert re.search(r"^ARG UID=[1-9]\d*$", final_stage, re.M)
    # `konpro-bridge healthcheck` asks /healthz on the port the settings name
    assert '"konpro-bridge", "healthcheck"]' in final_stage.split("HEALTHCHECK", 1)[1]
    assert f'VOLUME ["{Settings().spool.path}"]' in final_stage
    assert "pip install" not in final_stage  # nothing is built or fetched in the final stage
