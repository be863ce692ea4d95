"""The composition root: builds the bridge's parts from settings and runs their lifecycle.

Start order matters: the publisher starts connecting first (a broker that is down is not fatal),
then the HTTP server listens, and only then does reconciliation start: KonPro checks a URL it is
asked to register with an OPTIONS request. Stop order is the reverse, so that requests already in
flight can still have their publishes confirmed before the AMQP connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from types import TracebackType
from typing import Self

import structlog
from aiohttp import web

from bridge import __version__
from bridge.config import Settings
from bridge.konpro import KonProClient
from bridge.logs import redactor
from bridge.publisher import Publisher
from bridge.reconcile import Reconciler, ReconcileResult, load_stored_secret, why_not_reconcile
from bridge.relay import Relay
from bridge.server import create_app

log = structlog.get_logger(__name__)


class Bridge:
    """One running bridge: publisher, relay and HTTP server, started and stopped together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.publisher = Publisher(settings.amqp)
        self.relay = Relay(self.publisher)
        self._runner: web.AppRunner | None = None
        self._konpro: KonProClient | None = None
        self.reconciler: Reconciler | None = None
        self._reconciling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.publisher.start()
        app = create_app(self.settings.server, self.relay, self.publisher.not_ready_reason)
        self._runner = web.AppRunner(
            app,
            access_log=None,  # one line per delivery is logged by the handler itself
            handle_signals=False,
            shutdown_timeout=self.settings.server.shutdown_timeout,
            keepalive_timeout=self.settings.server.keepalive_timeout,
            max_field_size=self.settings.server.max_header_bytes,
            max_line_size=self.settings.server.max_header_bytes,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.settings.server.host, self.settings.server.port, reuse_port=True
        )
        await site.start()
        log.info(
            "bridge.listening",
            url=self.url,
            webhook_path=self.settings.server.webhook_path,
            version=__version__,
        )
        self._start_reconciling()

    @property
    def port(self) -> int:
        """The port actually bound (``server.port = 0`` picks a free one)."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the bridge is not listening")
        return int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        host = self.settings.server.host
        host = "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host  # noqa: S104
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, let in-flight deliveries finish (bounded), then close the connection."""
        await self._stop_reconciling()
        if self._runner is not None:
            log.info("bridge.stopping", grace_seconds=self.settings.server.shutdown_timeout)
            await self._runner.cleanup()
            self._runner = None
        await self.publisher.close()
        log.info("bridge.stopped")

    def _start_reconciling(self) -> None:
        """Keep the registration right in the background; the site must already be listening."""
        if reason := why_not_reconcile(self.settings):
            log.info("reconcile.off", reason=reason)
            return
        konpro = self.settings.konpro
        self._konpro = KonProClient(konpro.api_url, konpro.api_key, timeout=konpro.request_timeout)
        self.reconciler = Reconciler.from_settings(self._konpro, self.settings)
        self._reconciling = asyncio.create_task(
            self.reconciler.run_forever(self._on_reconcile_result), name="konpro-reconcile"
        )

    async def _stop_reconciling(self) -> None:
        """Cancel a run even mid-call: a hanging KonPro API must not hold up shutdown."""
        task, self._reconciling = self._reconciling, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._konpro is not None:
            await self._konpro.close()
            self._konpro = None

    def _on_reconcile_result(self, result: ReconcileResult) -> None:
        """Start checking signatures with a signing secret the reconciler has just learnt."""
        if not result.secret_stored:
            return
        # A few bytes the reconciler has just written: reading them does not stall the loop.
        secret = load_stored_secret(self.settings.spool.path)
        if secret:
            redactor.add(secret)
            self.use_webhook_secret(secret)

    def use_webhook_secret(self, secret: str) -> None:
        """Placeholder, replaced by signature verification (issue #4)."""

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def run(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    async with Bridge(settings):
        await stop.wait()


def _request_stop(stop: asyncio.Event, signum: signal.Signals) -> None:
    log.info("bridge.signal", signal=signum.name)
    stop.set()
