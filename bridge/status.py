"""``GET /status``: what an operator asks first when events do not arrive, in one JSON answer.

``/readyz`` answers a yes or no for the orchestrator; ``/status`` says why, and since when: the
broker link, what waits in the spool, and how the last registration check went.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any, Final

import orjson
from aiohttp import web

from bridge import __version__
from bridge.publisher import Publisher
from bridge.reconcile import ReconcileResult
from bridge.server import BodiesInFlight
from bridge.spool import Spool, SpoolClosed, SpoolStatus

RegistrationProbe = Callable[[], ReconcileResult | None]
"""The last registration check's result, ``None`` before the first one."""

REGISTERED: Final = frozenset({"ok", "added", "updated", "deduplicated"})
"""Results after which the registration is as configured."""


def registration_ok(result: ReconcileResult | None) -> bool | None:
    """Whether the last check left the registration right; ``None`` if there was none yet."""
    return None if result is None else result.kind in REGISTERED


class StatusReport:
    """Collects the status from the parts themselves at each request: it cannot go stale."""

    def __init__(
        self,
        publisher: Publisher,
        spools: Callable[[], Iterable[Spool]],
        bodies: BodiesInFlight,
        *,
        registration: RegistrationProbe | None = None,
        registration_off: str = "reconciliation is not enabled",
        redact: Callable[[bytes], bytes] = lambda text: text,
    ) -> None:
        self._publisher = publisher
        self._redact = redact
        self._spools = spools
        self._bodies = bodies
        self._registration = registration
        self._registration_off = registration_off

    async def collect(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "broker": self._broker(),
            "spool": await self._spool_status(),
            "intake": {
                "bytes_in_flight": self._bodies.held,
                "max_bytes_in_flight": self._bodies.limit,
            },
            "registration": self._registration_status(),
        }

    async def handle(self, request: web.Request) -> web.Response:
        """The report as JSON, with any secret that slipped into an error text masked."""
        body = self._redact(orjson.dumps(await self.collect()))
        return web.Response(body=body, content_type="application/json")

    def _broker(self) -> dict[str, Any]:
        reason = self._publisher.not_ready_reason()
        stalled = self._publisher.not_reading_reason or self._publisher.confirms_late_reason
        late = stalled if reason is None else None
        return {
            "connected": reason is None,
            "since": _iso(self._publisher.link_changed_at),
            "reason": reason or late,
        }

    async def _spool_status(self) -> dict[str, Any]:
        """This worker's spool, with those of workers no longer run that it is forwarding."""
        statuses = []
        spools = list(self._spools())
        for spool in spools:
            with contextlib.suppress(SpoolClosed):  # a left-behind spool closed meanwhile
                statuses.append(await spool.status())
        total = SpoolStatus.of_all(statuses)
        oldest = None if total.oldest_age is None else round(total.oldest_age, 3)
        return {
            "depth": total.depth,
            "parked": total.parked,
            "bytes": total.bytes,
            "oldest_age": oldest,
            # This worker's own spool: the one deliveries go to.
            "refusing": spools[0].why_full() if spools else None,
        }

    def _registration_status(self) -> dict[str, Any]:
        if self._registration is None:
            return {"enabled": False, "reason": self._registration_off}
        result = self._registration()
        return {
            "enabled": True,
            "ok": registration_ok(result),
            "checked_at": None if result is None else result.time.isoformat(),
            "result": None if result is None else result.kind,
            "endpoint_id": None if result is None else result.endpoint_id,
            "error": None if result is None else result.error,
        }


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, tz=dt.UTC).isoformat()
