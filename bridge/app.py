"""The composition root: builds the bridge's parts from settings and runs their lifecycle.

Start order matters: the spool opens first (without it a 2xx could not be promised), the
publisher starts connecting (a broker that is down is not fatal), the HTTP server listens, and
only then does reconciliation start: KonPro checks a URL it is asked to register with an OPTIONS
request. Stop order is the reverse, so that requests already in flight still get their publish
confirmed or their event spooled before the AMQP connection and the spool close.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from types import TracebackType
from typing import Self

import structlog
from aiohttp import web

from bridge import __version__
from bridge.config import Settings, why_not_reconcile
from bridge.expect import add_route
from bridge.forwarder import Forwarder, LeftBehindSpools, forwarding
from bridge.konpro import KonProClient
from bridge.logs import Redactor, redactor
from bridge.metrics import Metrics, metrics_app, metrics_handler
from bridge.publisher import Publisher
from bridge.reconcile import Reconciler, ReconcileResult
from bridge.relay import Relay
from bridge.replay_mesh import ReplayLink
from bridge.secret_file import load_stored_secret
from bridge.server import BodiesInFlight, create_app, drop_stalled_readers, drop_unsent
from bridge.signatures import Authenticator, ReplayGuard
from bridge.spool import Spool, SpoolLocked, SpoolOpenFailed
from bridge.status import StatusReport, registration_ok
from bridge.tasks import cancel_and_wait
from bridge.workers import left_behind_spool_dirs, spool_dir, stop_allowance

log = structlog.get_logger(__name__)

_SECRET_POLL_INTERVAL = 2.0
_RECANCEL_SECONDS = 0.5  # aiohttp may swallow a cancellation that meets a request's timeout
_GAUGE_REFRESH_SECONDS = 1.0  # how fresh, with several workers, the live gauges are
_FIRST_CONNECT_WAIT = 3.0  # seconds at most that listening waits for the first broker connect
_LOCKED_SPOOL_POLL_SECONDS = 0.5


class StartupError(Exception):
    """The bridge cannot start as configured; the message says why, for the operator."""


class Bridge:
    """One running bridge: spool, publisher, relay and HTTP server, started and stopped together."""

    def __init__(
        self, settings: Settings, worker: int = 0, replay_link: ReplayLink | None = None
    ) -> None:
        """``replay_link``: with several workers, how this one shares its replay memory."""
        self.settings = settings
        self.worker = worker
        self._replay_link = replay_link
        self.metrics = Metrics(
            event_types=settings.konpro.events, exchanges=settings.amqp.exchanges
        )
        self.publisher = Publisher(
            settings.amqp, self.metrics, max_unsent_bytes=settings.server.max_bytes_in_flight
        )
        self._bodies_in_flight = BodiesInFlight(settings.server.max_bytes_in_flight)
        self._watch_live_gauges()
        konpro = settings.konpro
        self.authenticator = Authenticator(
            konpro.webhook_secrets,
            timestamp_tolerance=konpro.timestamp_tolerance,
            required=konpro.require_signature,
        )
        self.replay_guard = ReplayGuard(
            konpro.replay_window,
            konpro.replay_cache_size,
            tell=replay_link.tell if replay_link is not None else None,
        )
        # For what the bridge says over HTTP (/readyz, /status): reasons quote error texts.
        self._answers = Redactor(settings.secrets())
        self._spool: Spool | None = None
        self._forwarder: Forwarder | None = None
        self._secret_unreadable = ""  # the last error reading the stored secret, said once
        self._runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._dropping_stalled: list[asyncio.Task[None]] = []  # a task for each site
        self._konpro: KonProClient | None = None
        self.reconciler: Reconciler | None = None
        self._reconciling: asyncio.Task[None] | None = None
        self._following_secret: asyncio.Task[None] | None = None  # workers other than 0
        self._sharing_gauges: asyncio.Task[None] | None = None
        self._left_behind: LeftBehindSpools | None = None  # spools of workers no longer run

    def _watch_live_gauges(self) -> None:
        """The live gauges, read from the parts themselves. With several workers, the one that
        reconciles speaks for the registration; the others would only say "unknown"."""
        silent = self.metrics.shared and self._why_not_reconcile() is not None
        self.metrics.watch(
            spool_depth=lambda: sum(spool.depth for spool in self.spools),
            spool_parked=lambda: sum(spool.parked for spool in self.spools),
            broker_connected=lambda: self.publisher.is_ready,
            registration_ok=None if silent else lambda: registration_ok(self.last_registration()),
        )

    @property
    def spool(self) -> Spool:
        if self._spool is None:
            raise RuntimeError("the bridge is not started")
        return self._spool

    @property
    def spools(self) -> list[Spool]:
        """This worker's spool, and those of workers no longer run that it is forwarding."""
        left_behind = self._left_behind.spools if self._left_behind is not None else []
        return [self.spool, *left_behind]

    async def start(self) -> None:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        for doubt in self.settings.doubts():
            log.warning("bridge.setting_doubtful", detail=doubt)
        self._spool = await self._open_spool()
        self._use_stored_secret()
        self._forwarder = Forwarder(
            self._spool,
            forwarding(self.publisher.publish),
            is_connected=lambda: self.publisher.is_ready,
            parked_retry_interval=self.settings.spool.parked_retry_interval,
        )
        self.publisher.on_ready(self._forwarder.retry_now)
        relay = Relay(self.publisher, self._spool, self._forwarder.notify, self.replay_guard)
        if self._replay_link is not None and self.replay_guard.enabled:
            self._replay_link.listen(self.replay_guard.heard)
        self._forwarder.start()
        await self.publisher.start()
        if self.worker == 0:
            self._left_behind = LeftBehindSpools(
                left_behind_spool_dirs(self.settings.spool.path, self.settings.server.workers),
                self.settings.spool,
                self.publisher.publish,
                is_connected=lambda: self.publisher.is_ready,
            )
            self._left_behind.start()
        app = create_app(
            self.settings.server,
            relay,
            self._not_ready_reason,
            self.authenticator,
            metrics=self.metrics,
            bodies=self._bodies_in_flight,
        )
        await self._add_operator_endpoints(app)
        if self.metrics.shared:
            self._sharing_gauges = asyncio.create_task(self._share_gauges(), name="share-gauges")
        self._runner = self._runner_for(app)
        await self._runner.setup()
        await self._wait_for_the_first_connect()
        await self._listen(self._runner, self.settings.server.port, "server.port")
        log.info(
            "bridge.listening",
            url=self.webhook_url,
            version=__version__,
        )
        self._start_reconciling()

    async def _wait_for_the_first_connect(self) -> None:
        """Before listening, wait (briefly) for the first connect to the broker to succeed or
        fail: a bridge that took deliveries while still connecting would spool them all, and a
        worker started again takes its share of its siblings' connections at once."""
        try:
            async with asyncio.timeout(_FIRST_CONNECT_WAIT):
                await self.publisher.until_first_attempt()
        except TimeoutError:
            log.info("bridge.listening_before_broker", waited_s=_FIRST_CONNECT_WAIT)

    async def _add_operator_endpoints(self, app: web.Application) -> None:
        """``/status`` on the main port; ``/metrics`` there too, or alone on its own port."""
        off = self._why_not_reconcile()
        report = StatusReport(
            self.publisher,
            lambda: self.spools,
            self._bodies_in_flight,
            registration=None if off else self.last_registration,
            registration_off=off or "",
            redact=self._answers.redact_bytes,
        )
        add_route(app, "GET", "/status", report.handle)
        port = self.settings.server.metrics_port
        if not port:
            add_route(app, "GET", "/metrics", metrics_handler(self.metrics))
            return
        self._metrics_runner = self._runner_for(metrics_app(self.metrics))
        await self._metrics_runner.setup()
        await self._listen(self._metrics_runner, port, "server.metrics_port")

    def _runner_for(self, app: web.Application) -> web.AppRunner:
        """How both sites serve: the webhook one, and the metrics one, whose connections take
        the same file descriptors and whose stop is part of the same grace."""
        server = self.settings.server
        return web.AppRunner(
            app,
            access_log=None,  # one line per delivery is logged by the handler itself
            handle_signals=False,
            shutdown_timeout=server.shutdown_timeout,
            keepalive_timeout=server.keepalive_timeout,
            max_field_size=server.max_header_bytes,
            max_line_size=server.max_header_bytes,
            # A request refused before its body was read is read on (and discarded) for a
            # second at most, not aiohttp's ten, so that what it holds is soon freed: a client
            # still sending gets its answer rather than a reset, unless it is slow.
            lingering_time=1.0,
        )

    async def _listen(self, runner: web.AppRunner, port: int, setting: str) -> None:
        server = self.settings.server
        # Workers share the port; a single process must notice that another one holds it.
        site = web.TCPSite(runner, server.host, port, reuse_port=server.workers > 1)
        try:
            await site.start()
        except OSError as exc:
            where = f"{server.host}:{port} ({setting})"
            raise StartupError(f"cannot listen on {where}: {exc}") from exc
        if runner.server is not None:
            dropping = drop_stalled_readers(runner.server, after=server.keepalive_timeout)
            self._dropping_stalled.append(asyncio.create_task(dropping, name="drop-stalled"))

    async def _open_spool(self) -> Spool:
        """This worker's spool. One still locked is waited for as long as a stop may take: the
        workers of a supervisor killed outright stop gracefully, holding theirs meanwhile, and
        a process manager starts the bridge again at once."""
        path = spool_dir(self.settings.spool.path, self.worker)
        try:
            return await Spool.open_when_free(
                self.settings.spool.at(path),
                poll_interval=_LOCKED_SPOOL_POLL_SECONDS,
                on_locked=lambda exc: log.warning(
                    "spool.locked_at_start", path=str(path), error=str(exc)
                ),
                give_up_after=stop_allowance(self.settings),
            )
        except SpoolLocked as exc:
            raise StartupError(f"cannot open the spool at {path}: {exc}") from exc
        except (OSError, SpoolOpenFailed) as exc:
            raise StartupError(
                f"cannot open the spool at {self.settings.spool.path}: {exc}"
            ) from exc

    def _use_stored_secret(self) -> None:
        if not self.settings.konpro.webhook_secret.get_secret_value():
            try:
                self._adopt_stored_secret()
            except OSError as exc:  # better no start than a bridge that cannot check signatures
                raise StartupError(f"cannot read the stored webhook secret: {exc}") from exc
        if self.authenticator.enabled:
            return
        if self.settings.konpro.require_signature:
            if not self.settings.learns_secret():
                raise StartupError(
                    "konpro.require_signature is set but no webhook secret is known: "
                    "set konpro.webhook_secret (KONPRO_BRIDGE_KONPRO__WEBHOOK_SECRET)"
                )
            log.warning(
                "bridge.signatures_awaited",
                detail="konpro.require_signature: every delivery is refused 401 until "
                "registration learns the webhook secret",
            )
            return
        log.warning(
            "bridge.signatures_off",
            detail="no webhook secret is configured: deliveries are accepted unsigned; "
            "set konpro.webhook_secret",
        )

    def use_webhook_secret(self, secret: str) -> None:
        """Verify deliveries with ``secret`` from now on, instead of any learnt before (and keep
        both out of logs and answers)."""
        redactor.add(secret)
        self._answers.add(secret)
        self.authenticator.learn_secret(secret)

    def _not_ready_reason(self) -> str | None:
        """Why ``/readyz`` says 503, per ``server.readiness``, with any secret masked."""
        reason = self.publisher.not_ready_reason()
        if reason is None:
            return None
        spool = self._spool
        if self.settings.server.readiness == "accepting" and spool is not None:
            if (full := spool.why_full()) is None:
                return None  # deliveries are spooled (202) and forwarded when the broker is back
            reason += f" and the spool cannot take events ({full})"
        return self._answers(reason)

    @property
    def port(self) -> int:
        """The port actually bound (``server.port = 0`` picks a free one). With ``host = ""``
        there is a socket for each address family, each with its own free port: the IPv4
        one's, which ``url`` reaches over 127.0.0.1."""
        if self._runner is None or not self._runner.addresses:
            raise RuntimeError("the bridge is not listening")
        addresses = self._runner.addresses
        ipv4 = [address for address in addresses if len(address) == 2]  # IPv6: 4 fields
        return int((ipv4 or addresses)[0][1])

    @property
    def url(self) -> str:
        """This bridge as reached from the same host, on the port actually bound."""
        return self.settings.server.local_url(port=self.port)

    @property
    def webhook_url(self) -> str:
        """Where KonPro's deliveries go, on the port actually bound."""
        return self.url + self.settings.server.webhook_path

    async def stop(self) -> None:
        """Let a registration in flight finish (its answer holds the signing secret), then stop
        listening, let in-flight deliveries and a drain of the spool finish within one grace
        period (``server.shutdown_timeout``), and close the connection and the spool."""
        loop = asyncio.get_running_loop()
        grace = self.settings.server.shutdown_timeout
        if self._runner is not None:
            log.info("bridge.stopping", grace_seconds=grace)
        await self._stop_reconciling()
        deadline = loop.time() + grace  # the deliveries' grace starts once the site closes
        await cancel_and_wait(self._sharing_gauges)
        self._sharing_gauges = None
        runners = [runner for runner in (self._runner, self._metrics_runner) if runner]
        if runners:
            # aiohttp waits ``grace`` for the handlers, then cancels them: a delivery still
            # waiting for the broker's confirm by then is spooled and answered instead.
            grace_over = loop.call_at(deadline, self._grace_over, runners)
            await asyncio.gather(*(runner.cleanup() for runner in runners))
            grace_over.cancel()
            self._runner = self._metrics_runner = None
        while self._dropping_stalled:  # on until the sites are closed: a stop waits for them
            await cancel_and_wait(self._dropping_stalled.pop())
        # An event a forwarder was publishing when its grace ran out stays in its spool.
        if self._forwarder is not None:
            await self._forwarder.stop(grace=max(0.0, deadline - loop.time()))
        if self._left_behind is not None:
            await self._left_behind.stop(grace=max(0.0, deadline - loop.time()))
            self._left_behind = None
        if self._replay_link is not None:
            self._replay_link.close()
        await self.publisher.close()
        if self._spool is not None:
            # Read after any write still going on (shielded from a forwarder stopped mid-way).
            status = await self._spool.status()
            if status.depth:
                log.warning(
                    "bridge.spool_not_empty",
                    depth=status.depth,
                    parked=status.parked,
                    detail="forwarded when the bridge next starts",
                )
            await self._spool.close()
            self._spool = None
        log.info("bridge.stopped")

    def _grace_over(self, runners: list[web.AppRunner]) -> None:
        """End what would make aiohttp wait a second grace period after cancelling the
        handlers: the waits for confirms, and answers a client has not taken."""
        self._end_confirm_waits()
        for runner in runners:
            if runner.server is not None:
                drop_unsent(runner.server)

    def _end_confirm_waits(self) -> None:
        if waiting := self.publisher.abandon_confirm_waits("the bridge is stopping"):
            log.warning(
                "bridge.confirms_abandoned",
                publishes=waiting,
                detail="the grace period ran out before the broker confirmed: spooled instead",
            )

    async def _share_gauges(self) -> None:
        """Keep this worker's live gauges current for the scrapes the other workers answer."""
        while True:
            self.metrics.refresh_gauges()
            await asyncio.sleep(_GAUGE_REFRESH_SECONDS)

    def _why_not_reconcile(self) -> str | None:
        if self.worker:
            return "reconciliation runs in worker 0"
        return why_not_reconcile(self.settings)

    def _start_reconciling(self) -> None:
        """Keep the registration right in the background; the site must already be listening."""
        if reason := self._why_not_reconcile():
            log.info("reconcile.off", reason=reason)
            if self.worker and self.settings.may_use_stored_secret():
                self._following_secret = asyncio.create_task(
                    self._follow_stored_secret(), name="follow-secret"
                )
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
        await cancel_and_wait(task, again_every=_RECANCEL_SECONDS)
        await cancel_and_wait(self._following_secret)
        self._following_secret = None
        if self._konpro is not None:
            await self._konpro.close()
            self._konpro = None

    async def _follow_stored_secret(self) -> None:
        """Other workers pick up the secret worker 0's reconciler learns, within seconds."""
        while True:
            self._adopt_stored_secret_if_readable()
            await asyncio.sleep(_SECRET_POLL_INTERVAL)

    def last_registration(self) -> ReconcileResult | None:
        """The last registration check's result; ``None`` before one, or without reconciliation."""
        return None if self.reconciler is None else self.reconciler.last_result

    def _on_reconcile_result(self, result: ReconcileResult) -> None:
        """Count the run; check signatures with the secret the registration's file holds, which
        this reconciler or an operator's ``reconcile --once`` may have just written."""
        self.metrics.reconcile_run(result.kind)
        if self.settings.may_use_stored_secret():
            self._adopt_stored_secret_if_readable()

    def _adopt_stored_secret_if_readable(self) -> None:
        """At run time a secret file that cannot be read (an operator's ``reconcile --once``
        run as another user wrote it) leaves the secret in force as it is, said once."""
        try:
            self._adopt_stored_secret()
        except OSError as exc:
            if str(exc) != self._secret_unreadable:
                log.error(
                    "bridge.secret_unreadable",
                    error=str(exc),
                    detail="signatures are still checked with the secret in force",
                )
            self._secret_unreadable = str(exc)
        else:
            self._secret_unreadable = ""

    def _adopt_stored_secret(self) -> None:
        """Verify with the secret reconciliation kept, if there is one (a few bytes: reading
        them does not stall the loop)."""
        secret = load_stored_secret(self.settings.spool.path)
        if secret:
            self.use_webhook_secret(secret)

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


async def run(settings: Settings, worker: int = 0, replay_link: ReplayLink | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _request_stop, stop, signum)
    bridge = Bridge(settings, worker, replay_link)
    if not await _started_unless_stopped(bridge, stop):
        return
    try:
        settle_memory()
        await stop.wait()
    finally:
        await bridge.stop()


async def _started_unless_stopped(bridge: Bridge, stop: asyncio.Event) -> bool:
    """Start ``bridge``, unless a stop is asked for first: start-up may wait seconds for the
    broker, and a bridge told to stop meanwhile must not go on to listen (and take deliveries,
    and register its URL) before it stops. Whether it started."""
    starting = asyncio.create_task(bridge.start(), name="bridge-start")
    stopping = asyncio.create_task(stop.wait(), name="bridge-stop-asked")
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        starting.cancel()
        raise
    finally:
        stopping.cancel()
    if not starting.done():
        starting.cancel()  # start() stops what it has started before it ends
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        return False
    starting.result()  # a StartupError, say
    return True


def settle_memory() -> None:
    """Once the process has started: collect start-up's garbage, exempt what is left from later
    collections, and give the C heap's free pages back.

    What start-up leaves (modules, classes, settings, the bridge's parts: some 60,000 objects)
    lives as long as the process, yet every full collection walked it: 13-33 ms under load, a
    pause for every request in flight, and the tail of the OPTIONS latency. Frozen, it is left
    out, and a full collection walks what requests create: under a millisecond. The price: a
    start-up object that later dies in a reference cycle (say, the first AMQP connection's, after
    a reconnect) is never reclaimed. That happens once, not per request.
    """
    gc.collect()
    gc.freeze()
    trimmed = release_free_heap()
    log.debug("bridge.memory_settled", frozen_objects=gc.get_freeze_count(), heap_trimmed=trimmed)


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the system; whether any went back.

    Importing the libraries and building the settings model leave about half a MiB of freed
    blocks in glibc's heap, kept for a reuse that does not come. Only glibc has ``malloc_trim``;
    elsewhere this does nothing.
    """
    import ctypes  # noqa: PLC0415 - only for this, once

    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    return trim is not None and bool(trim(0))


def _request_stop(stop: asyncio.Event, signum: signal.Signals) -> None:
    log.info("bridge.signal", signal=signum.name)
    stop.set()
