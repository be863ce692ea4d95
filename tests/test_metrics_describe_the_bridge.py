"""``/metrics`` tells an operator what became of deliveries and what state the bridge is in."""

from __future__ import annotations

import contextlib
import math
import os
import random
import string
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import get_args

import aiohttp
import pytest

from bridge.events import DOCUMENTED_EVENT_TYPES, Outcome
from bridge.metrics import OUTCOMES, RECONCILE_RESULTS, Metrics, metrics_app
from bridge.reconcile import ResultKind
from tests.support.observing import Samples, samples_of, scrape, value
from tests.support.serving import serving

Serve = Callable[[Metrics], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Serves a ``Metrics`` on a free port through the real aiohttp app; yields its URL."""
    async with contextlib.AsyncExitStack() as servers:

        async def start(metrics: Metrics) -> str:
            return await servers.enter_async_context(serving(metrics_app(metrics))) + "/metrics"

        yield start


async def test_each_call_shows_up_under_its_name_and_labels(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    metrics = Metrics(event_types=["instant_avatar.success"], exchanges=["konpro.events"])
    url = await serve(metrics)

    metrics.delivery("avatar_video.success", Outcome.PUBLISHED)
    metrics.delivery("avatar_video.success", Outcome.PUBLISHED)
    metrics.delivery("instant_avatar.success", Outcome.SPOOLED)
    metrics.delivery("batch.finished", Outcome.DUPLICATE)
    metrics.delivery(None, "invalid")
    metrics.published("konpro.events", 0.003)
    metrics.published("konpro.events", 0.7)
    metrics.reconcile_run("added")
    samples = await scrape(http, url)

    received = "konpro_bridge_events_received_total"
    assert value(samples, received, event_type="avatar_video.success", outcome="published") == 2
    assert value(samples, received, event_type="instant_avatar.success", outcome="spooled") == 1
    assert value(samples, received, event_type="other", outcome="duplicate") == 1
    assert value(samples, received, event_type="other", outcome="invalid") == 1
    assert value(samples, received, event_type="avatar_video.fail", outcome="refused") == 0
    assert value(samples, "konpro_bridge_events_published_total", exchange="konpro.events") == 2
    assert value(samples, "konpro_bridge_publish_seconds_count") == 2
    assert value(samples, "konpro_bridge_publish_seconds_bucket", le="0.005") == 1
    assert value(samples, "konpro_bridge_publish_seconds_bucket", le="0.0005") == 0
    assert value(samples, "konpro_bridge_publish_seconds_bucket", le="5.0") == 2
    assert value(samples, "konpro_bridge_reconcile_runs_total", result="added") == 1
    assert value(samples, "konpro_bridge_reconcile_runs_total", result="error") == 0


async def test_gauges_are_read_from_the_live_state_at_each_scrape(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    state = {"depth": 0, "connected": True, "registered": None}
    metrics = Metrics()
    metrics.watch(
        spool_depth=lambda: state["depth"],
        broker_connected=lambda: state["connected"],
        registration_ok=lambda: state["registered"],
    )
    url = await serve(metrics)

    first = await scrape(http, url)
    state.update(depth=7, connected=False, registered=True)
    second = await scrape(http, url)

    assert value(first, "konpro_bridge_spool_depth") == 0
    assert value(first, "konpro_bridge_broker_connected") == 1
    assert math.isnan(value(first, "konpro_bridge_registration_ok"))
    assert value(second, "konpro_bridge_spool_depth") == 7
    assert value(second, "konpro_bridge_broker_connected") == 0
    assert value(second, "konpro_bridge_registration_ok") == 1


async def test_a_failing_state_source_reads_as_unknown_and_the_scrape_still_succeeds(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    def closed_spool() -> float:
        raise RuntimeError("spool is closed")

    metrics = Metrics()
    metrics.watch(spool_depth=closed_spool)
    url = await serve(metrics)

    assert math.isnan(value(await scrape(http, url), "konpro_bridge_spool_depth"))


def test_label_values_stay_bounded_whatever_event_types_arrive() -> None:
    metrics = Metrics(event_types=["instant_avatar.success"], exchanges=["konpro.events"])
    rng = random.Random(6)
    for _ in range(5000):
        invented = "".join(rng.choices(string.ascii_lowercase + "._-", k=rng.randint(1, 40)))
        metrics.delivery(invented, rng.choice(OUTCOMES))
        metrics.published(invented, 0.001)  # an exchange name nobody configured
        metrics.reconcile_run(invented)

    families = {family.name: family for family in metrics.registry.collect()}
    event_types = {
        sample.labels["event_type"] for sample in families["konpro_bridge_events_received"].samples
    }
    exchanges = {
        sample.labels["exchange"] for sample in families["konpro_bridge_events_published"].samples
    }
    results = {
        sample.labels["result"] for sample in families["konpro_bridge_reconcile_runs"].samples
    }
    assert event_types == {*DOCUMENTED_EVENT_TYPES, "instant_avatar.success", "other"}
    assert exchanges == {"konpro.events", "other"}
    assert "other" in results
    assert len(results) <= 8


def test_an_outcome_outside_the_documented_set_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown outcome"):
        Metrics().delivery("avatar_video.success", "lost")  # type: ignore[arg-type]


def test_the_reconciliation_results_are_the_ones_the_reconciler_reports() -> None:
    assert get_args(ResultKind) == RECONCILE_RESULTS


def test_the_http_intake_does_not_load_the_konpro_client() -> None:
    """Data flows one way: HTTP, validate, publish. The intake has no use for the API client."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, bridge.server; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'bridge.server'" in loaded
    assert "'bridge.konpro'" not in loaded
    assert "'bridge.reconcile'" not in loaded


def test_two_bridges_in_one_process_keep_separate_counts() -> None:
    first, second = Metrics(), Metrics()
    first.delivery("avatar_video.success", Outcome.PUBLISHED)

    assert b'outcome="published"} 1.0' in first.exposition()
    assert b'outcome="published"} 1.0' not in second.exposition()


# One worker of ``server.workers = N``: prometheus-client chooses its multi-process value store
# when it is imported, so each worker is an interpreter of its own with the shared directory set.
_WORKER = """
import sys
from bridge.metrics import Metrics

connected, depth, registered, scrape = sys.argv[1:]
metrics = Metrics()
metrics.watch(broker_connected=lambda: connected == "up", spool_depth=lambda: int(depth))
metrics.watch(spool_parked=lambda: min(int(depth), 1))  # one of them, if any, parked
if registered != "-":  # only the reconciling worker watches the registration
    metrics.watch(registration_ok=lambda: registered == "ok")
metrics.refresh_gauges()
if scrape == "scrape":
    sys.stdout.buffer.write(metrics.exposition())
"""


def workers_metrics(directory: Path, *workers: tuple[str, int, str]) -> Samples:
    """Runs one process per ``(broker, spool depth, registration)`` in turn, all sharing
    ``directory``; the last one's ``/metrics`` text, parsed."""
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _WORKER, broker, str(depth), registered, scrape],
            env=env,
            capture_output=True,
            check=True,
        ).stdout
        for (broker, depth, registered), scrape in zip(
            workers, ["no"] * (len(workers) - 1) + ["scrape"], strict=True
        )
    ]
    return samples_of(outputs[-1].decode())


def test_with_several_workers_the_gauges_combine_as_an_operator_reads_them(
    tmp_path: Path,
) -> None:
    """The link is up only when every worker's is (one worker spooling its share is an
    outage), the depths (and parked counts) add up, and the registration is the reconciling
    worker's."""
    all_up = workers_metrics(tmp_path / "up", ("up", 2, "ok"), ("up", 3, "-"))
    one_down = workers_metrics(tmp_path / "down", ("up", 0, "ok"), ("down", 5, "-"))

    assert value(all_up, "konpro_bridge_broker_connected") == 1
    assert value(one_down, "konpro_bridge_broker_connected") == 0
    assert value(all_up, "konpro_bridge_spool_depth") == 5
    assert value(all_up, "konpro_bridge_spool_parked") == 2
    assert value(all_up, "konpro_bridge_registration_ok") == 1
    assert value(one_down, "konpro_bridge_registration_ok") == 1
