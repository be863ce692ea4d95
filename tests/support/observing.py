"""What an operator reads off a running bridge: ``/metrics`` samples, ``/status``, log lines."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import Bridge

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
LogLine = MutableMapping[str, Any]  # as structlog.testing.capture_logs gives them


async def scrape(http: aiohttp.ClientSession, url: str) -> Samples:
    async with http.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return samples_of(await response.text())


def samples_of(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def status(http: aiohttp.ClientSession, bridge: Bridge) -> dict[str, Any]:
    async with http.get(bridge.url + "/status") as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


def seen(logs: list[LogLine], name: str) -> list[LogLine]:
    """The lines of one event."""
    return [entry for entry in logs if entry["event"] == name]


def shown(entry: LogLine) -> bool:
    """Whether the line reaches the log at the default level (info)."""
    return bool(entry["log_level"] != "debug")
