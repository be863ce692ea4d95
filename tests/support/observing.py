"""What an operator reads off a running bridge: ``/metrics`` samples and ``/status``."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bridge.app import Bridge

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


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
