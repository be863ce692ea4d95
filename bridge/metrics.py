"""Prometheus metrics: what the bridge did with deliveries, and the state it is in now.

Each ``Metrics`` owns its registry, so that tests and several bridges in one process never share
counters. Label values are bounded: an ``event_type`` comes from the network, so any type that is
not documented by KonPro or configured in ``konpro.events`` is counted as ``other``; a sender
inventing types cannot grow the series count. Gauges for live state (spool depth, broker link,
registration) are read from callbacks at scrape time, so they cannot go stale.

With several worker processes (``server.workers``) the supervisor gives them one
``PROMETHEUS_MULTIPROC_DIR``: prometheus-client then keeps every value in files there, and a
scrape answered by any worker reports all of them. Counters and the histogram add up (a restarted
worker's counts are kept); each worker writes its live gauges there every second, and they are
combined per gauge: the spool depths add up, the broker link counts as up only when it is up in
every worker, and the registration is the one the reconciling worker last wrote.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, Literal, get_args

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from bridge.events import DOCUMENTED_EVENT_TYPES, Outcome
from bridge.expect import add_fallback_routes, add_route

NotAccepted = Literal["rejected_signature", "invalid", "refused"]
"""What became of a delivery that was not accepted (an accepted one has an ``Outcome``)."""
OUTCOMES: Final = (*(outcome.value for outcome in Outcome), *get_args(NotAccepted))
# reconcile.ResultKind, spelt out: importing it would pull the KonPro client into the HTTP intake.
RECONCILE_RESULTS: Final = ("ok", "added", "updated", "deduplicated", "disabled", "drift", "error")
OTHER: Final = "other"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
PUBLISH_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip

StateProbe = Callable[[], float | None]
"""Reads a live value at scrape time; ``None`` means unknown and is exposed as NaN."""

GaugeName = Literal["spool_depth", "spool_parked", "broker_connected", "registration_ok"]
Combined = Literal["livesum", "livemin", "livemostrecent"]
_GAUGES: Final[tuple[tuple[GaugeName, str, Combined], ...]] = (
    ("spool_depth", "Events waiting in the spool for the broker.", "livesum"),
    (
        "spool_parked",
        "Events in the spool set aside because the broker refused them; part of the depth.",
        "livesum",
    ),
    ("broker_connected", "1 when the broker link is up and the topology declared.", "livemin"),
    (
        "registration_ok",
        "1 when the last registration check succeeded; NaN before.",
        "livemostrecent",
    ),
)  # name, help, how the values of several workers combine


def shared_directory() -> str | None:
    """Where the workers of this bridge keep their metrics together; ``None``: one process."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class Metrics:
    """The bridge's metrics; every method is cheap enough for the per-delivery hot path."""

    def __init__(self, event_types: Iterable[str] = (), exchanges: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._shared_directory = shared_directory()
        self._probes: dict[GaugeName, Callable[[], float]] = {}
        self._event_types = frozenset((*DOCUMENTED_EVENT_TYPES, *event_types))
        self._exchanges = frozenset(exchanges)
        self._received = Counter(
            "konpro_bridge_events_received",
            "Deliveries received, by event type and what became of them.",
            ["event_type", "outcome"],
            registry=self.registry,
        )
        self._published = Counter(
            "konpro_bridge_events_published",
            "Events confirmed by the broker, by exchange.",
            ["exchange"],
            registry=self.registry,
        )
        self._publish_seconds = Histogram(
            "konpro_bridge_publish_seconds",
            "Time from publish to the broker's confirm.",
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )
        self._reconcile_runs = Counter(
            "konpro_bridge_reconcile_runs",
            "Runs of the registration check, by result.",
            ["result"],
            registry=self.registry,
        )
        self._gauges = {
            name: Gauge(
                f"konpro_bridge_{name}", text, registry=self.registry, multiprocess_mode=mode
            )
            for name, text, mode in _GAUGES
        }
        self._children: dict[tuple[str, str], Counter] = {}
        self._published_children: dict[str, Counter] = {}
        self._initialise_series()

    def delivery(self, event_type: str | None, outcome: Outcome | NotAccepted) -> None:
        """Count one delivery; ``event_type`` is ``None`` when the body named none."""
        label = event_type if event_type in self._event_types else OTHER
        child = self._children.get((label, outcome))  # every valid pair is made up front
        if child is None:
            raise ValueError(f"unknown outcome {outcome!r}; expected one of {OUTCOMES}")
        child.inc()

    def published(self, exchange: str, seconds: float) -> None:
        """Count one confirmed publish and how long the confirm took."""
        label = exchange if exchange in self._exchanges else OTHER
        self._published_children[label].inc()  # made up front: labels() costs a lock per call
        self._publish_seconds.observe(seconds)

    def reconcile_run(self, result: str) -> None:
        """Count one registration check by its result (``ok``, ``added``, ``error``...)."""
        self._reconcile_runs.labels(result if result in RECONCILE_RESULTS else OTHER).inc()

    def watch(
        self,
        *,
        spool_depth: StateProbe | None = None,
        spool_parked: StateProbe | None = None,
        broker_connected: StateProbe | None = None,
        registration_ok: StateProbe | None = None,
    ) -> None:
        """Read these gauges from the given callbacks at every scrape (and, with several
        workers, at every ``refresh_gauges``)."""
        probes: dict[GaugeName, StateProbe | None] = {
            "spool_depth": spool_depth,
            "spool_parked": spool_parked,
            "broker_connected": broker_connected,
            "registration_ok": registration_ok,
        }
        for name, probe in probes.items():
            if probe is not None:
                self._probes[name] = _never_raising(probe)
                if self._shared_directory is None:
                    self._gauges[name].set_function(self._probes[name])

    @property
    def shared(self) -> bool:
        """Whether the values are kept with those of the other workers."""
        return self._shared_directory is not None

    def refresh_gauges(self) -> None:
        """Write the live gauges where the other workers' scrapes read them."""
        for name, read in self._probes.items():
            self._gauges[name].set(read())

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format, served as ``CONTENT_TYPE``."""
        if self._shared_directory is None:
            return generate_latest(self.registry)
        self.refresh_gauges()
        every_worker = CollectorRegistry()
        multiprocess.MultiProcessCollector(  # type: ignore[no-untyped-call] # untyped upstream
            every_worker, path=self._shared_directory
        )
        return generate_latest(every_worker)

    def _initialise_series(self) -> None:
        # Series that exist from the start read 0 rather than absent, so rate() sees the first
        # event and alerts on "no successful check yet" can be written.
        for event_type in (*sorted(self._event_types), OTHER):
            for outcome in OUTCOMES:
                self._children[(event_type, outcome)] = self._received.labels(event_type, outcome)
        for exchange in (*sorted(self._exchanges), OTHER):
            self._published_children[exchange] = self._published.labels(exchange)
        for result in RECONCILE_RESULTS:
            self._reconcile_runs.labels(result)
        if self._shared_directory is None:
            # With several workers only the reconciling one writes it, when it is watched.
            self._gauges["registration_ok"].set(math.nan)


def metrics_handler(metrics: Metrics) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An aiohttp handler for ``GET /metrics``."""

    async def handle(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    return handle


def metrics_app(metrics: Metrics) -> web.Application:
    """A tiny application serving only ``GET /metrics``, for ``server.metrics_port``."""
    app = web.Application()
    add_route(app, "GET", "/metrics", metrics_handler(metrics))
    add_fallback_routes(app)
    return app


def _never_raising(probe: StateProbe) -> Callable[[], float]:
    """A scrape must not fail because one source of state is closing: NaN instead."""

    def read() -> float:
        try:
            value = probe()
        except Exception:  # noqa: BLE001 - reported as unknown, never as a failed scrape
            return math.nan
        return math.nan if value is None else float(value)

    return read
