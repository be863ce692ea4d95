"""Several bridge processes sharing one port (``server.workers``), for more than one core.

One Python process runs on one core, and the bridge's work per delivery is Python work. With
``server.workers = N`` a supervisor forks N workers; each listens on the same port with
``SO_REUSEPORT`` (the kernel spreads connections across them) and has its own AMQP connection
and its own spool. Worker 0 uses ``spool.path`` and alone runs reconciliation; worker ``i``
spools under ``spool.path/worker-<i>``; the ``spool`` commands cover every one of them.

The supervisor forwards SIGTERM/SIGINT to its workers and waits for them; a worker that dies is
started again after a back-off, unless it could not start at all (exit code 1: a configuration
or spool problem that a restart will not fix), which stops the whole bridge.

The supervisor imports the workers' code before it forks them (``preload``) and freezes what it
holds out of garbage collection: the forked workers then share those pages with it and with each
other, copy-on-write, instead of each importing its own copy. A worker added costs about half a
bridge's memory, and a worker started again begins without the imports.

The workers keep their metrics together in a directory the supervisor makes (and removes), so
that a scrape answered by any of them reports all of them (see ``bridge.metrics``).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Final

import structlog

from bridge.config import Settings, why_not_reconcile
from bridge.replay_mesh import ReplayLink, ReplayMesh

log = structlog.get_logger(__name__)

_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
CANNOT_START: Final = 1  # a worker's exit code when it could not start
CRASHED: Final = 70  # EX_SOFTWARE: an error nobody caught, which a restart may get past

WorkerBody = Callable[[Settings, int, ReplayLink], int]
"""Runs worker ``index`` of the bridge until it is told to stop; returns its exit code. The link
shares its replay memory with the other workers."""

Preload = Callable[[], None]
"""Imports what the workers will run, once, in the supervisor."""


def _nothing() -> None:
    return None


def spool_dir(root: Path, worker: int) -> Path:
    """Where worker ``worker`` keeps its spool: ``spool.path`` itself for worker 0."""
    return root if worker == 0 else root / f"worker-{worker}"


def spool_dirs(root: Path) -> list[Path]:
    """Every spool the bridge's workers may have written, worker 0's first."""
    return [root, *sorted(path for path in root.glob("worker-*") if path.is_dir())]


def left_behind_spool_dirs(root: Path, workers: int) -> list[Path]:
    """The spools of workers that no longer run, after ``server.workers`` was lowered."""
    running = {spool_dir(root, worker) for worker in range(workers)}
    return [path for path in spool_dirs(root) if path not in running]


class RestartBackoff:
    """How long to wait before starting a worker again that ended: ``first`` seconds, doubling
    up to ``most`` while it keeps ending soon after each start. Each worker has its own; one that
    ran for ``most`` seconds or more counts as healthy, and its next restart waits ``first``
    again, however it fared before."""

    def __init__(self, first: float = 1.0, most: float = 30.0) -> None:
        self._first, self._most = first, most
        self._started: dict[int, float] = {}
        self._next: dict[int, float] = {}

    def started(self, worker: int, now: float) -> None:
        self._started[worker] = now

    def delay(self, worker: int, now: float) -> float:
        """The wait before restarting ``worker``, which has just ended."""
        healthy = now - self._started.get(worker, now) >= self._most
        delay = self._first if healthy else self._next.get(worker, self._first)
        self._next[worker] = min(delay * 2, self._most)
        return delay


class Supervisor:
    """Runs ``body(settings, i)`` for i in 0..N-1, each in a forked process, until told to stop."""

    def __init__(
        self,
        settings: Settings,
        body: WorkerBody,
        preload: Preload = _nothing,
        backoff: RestartBackoff | None = None,
    ) -> None:
        self._settings = settings
        self._body = body
        self._preload = preload
        self._backoff = backoff or RestartBackoff()
        self._context = multiprocessing.get_context("fork")
        self._workers: dict[int, BaseProcess] = {}
        self._replays = ReplayMesh(settings.server.workers)
        self._stopping = False
        # Written to by the signal handler: it wakes the waits below, which Python would
        # otherwise resume after the handler has run (PEP 475), and a stop could wait out a
        # restart's back-off (up to 30 s).
        self._stop_reader, self._stop_writer = multiprocessing.connection.Pipe(duplex=False)

    def run(self) -> int:
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._request_stop)
        count = self._settings.server.workers
        log.info("workers.starting", workers=count)
        with _shared_metrics_directory(), self._stop_reader, self._stop_writer:
            self._share_with_workers()
            for index in range(count):
                self._start(index)
            failed, restarting = self._supervise()
            stopped = self._stop_all(restarting)
        self._replays.close()
        return failed or stopped  # the cause of a stop matters more than how the others ended

    def _share_with_workers(self) -> None:
        """Load the workers' code here, then keep the garbage collector off it: a collection in
        a worker would otherwise write to every object it walks, and so copy its page."""
        self._preload()  # after the metrics directory is set: prometheus-client reads it on import
        gc.collect()
        gc.freeze()

    def _start(self, index: int) -> None:
        process = self._context.Process(
            target=_worker_main,
            args=(self._body, self._settings, index, os.getpid(), self._replays.link(index)),
            name=f"konpro-bridge-worker-{index}",
        )
        # Until the worker has put the default handlers back, a stop sent to it would meet the
        # supervisor's handler, copied by fork, and be lost: held back, it arrives then.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        self._workers[index] = process
        self._backoff.started(index, time.monotonic())

    def _supervise(self) -> tuple[int, set[int]]:
        """Until a stop is asked for, or a worker cannot start: the exit code that calls for,
        and the workers that had died and were waiting to start again."""
        restarts: dict[int, float] = {}  # worker -> when to start it again (monotonic clock)
        while not self._stopping:
            self._start_those_due(restarts)
            running = [p.sentinel for i, p in self._workers.items() if i not in restarts]
            next_due = min(restarts.values(), default=None)
            timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
            multiprocessing.connection.wait([*running, self._stop_reader], timeout=timeout)
            ended = time.monotonic()  # as soon as the wait returns: the back-off counts from it
            for index, process in list(self._workers.items()):
                if self._stopping or index in restarts or process.is_alive():
                    continue
                log.error("workers.exited", worker=index, exit_code=process.exitcode)
                _forget_live_gauges(process)
                if process.exitcode == CANNOT_START:
                    return CANNOT_START, set(restarts)
                restarts[index] = ended + self._backoff.delay(index, ended)
        return 0, set(restarts)

    def _start_those_due(self, restarts: dict[int, float]) -> None:
        """Start again each worker whose back-off is over; each waits out its own, while the
        supervisor goes on watching the others."""
        now = time.monotonic()
        for index, due in sorted(restarts.items()):
            if due <= now and not self._stopping:
                del restarts[index]
                self._start(index)

    def _stop_all(self, restarting: set[int]) -> int:
        """Stop the workers; the worst exit of those that were running. One that had died
        before, already reported (``workers.exited``), does not make the stop a failure."""
        self._stopping = True
        running = {i: p for i, p in self._workers.items() if i not in restarting}
        for process in running.values():
            if process.is_alive() and process.pid is not None:
                process.terminate()  # SIGTERM: each worker shuts down gracefully
        deadline = time.monotonic() + stop_allowance(self._settings)
        worst = 0
        for index, process in running.items():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.error("workers.kill", worker=index, detail="did not stop in time")
                process.kill()
                process.join()
            worst = max(worst, _exit_status(process.exitcode))
        log.info("workers.stopped")
        return worst

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        if not self._stopping:
            log.info("workers.signal", signal=signal.Signals(signum).name)
            self._stopping = True
            self._stop_writer.send_bytes(b"")


@contextlib.contextmanager
def _shared_metrics_directory() -> Iterator[None]:
    """A fresh ``PROMETHEUS_MULTIPROC_DIR`` for the workers; prometheus-client reads it when a
    worker first imports it, so it must be set before they start."""
    directory = tempfile.mkdtemp(prefix="konpro-bridge-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    if "prometheus_client.values" in sys.modules:  # imported before: let it choose again
        from prometheus_client import values  # noqa: PLC0415

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(directory, ignore_errors=True)


def _forget_live_gauges(process: BaseProcess) -> None:
    """A dead worker's gauges no longer count; its counters do (they are history)."""
    from prometheus_client import multiprocess  # noqa: PLC0415 - after the directory is set

    if process.pid is not None:
        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]


def stop_allowance(settings: Settings) -> float:
    """How long a worker's graceful stop may take before it is killed: the grace, about 2 s for
    the broker's close, and a registration in flight that worker 0 lets finish."""
    allowance = settings.server.shutdown_timeout + 5.0
    if why_not_reconcile(settings) is None:
        allowance += settings.konpro.registration_allowance
    return allowance


def _exit_status(exitcode: int | None) -> int:
    """A worker's exit code as the supervisor reports it: ended by our SIGTERM (or a terminal's
    SIGINT) is a clean stop.

    A worker still starting up has not installed its signal handlers yet, so the SIGTERM that
    stops it kills it (exit code -15) instead of starting its graceful shutdown.
    """
    if exitcode is None or -exitcode in _STOP_SIGNALS:
        return 0
    return abs(exitcode)


def _worker_main(
    body: WorkerBody, settings: Settings, index: int, supervisor: int, replay_link: ReplayLink
) -> None:
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)  # the worker's event loop installs its own
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held back since the fork
    _stop_with(supervisor)
    structlog.contextvars.bind_contextvars(worker=index)
    try:
        code = body(settings, index, replay_link)
    except Exception:  # multiprocessing would exit 1, which says "could not start": stop all
        log.exception("workers.crashed", worker=index)
        code = CRASHED
    finally:
        logging.shutdown()  # a forked process ends without atexit: its last lines are written here
    raise SystemExit(code)


_PR_SET_PDEATHSIG: Final = 1


def _stop_with(supervisor: int) -> None:
    """Have this worker sent SIGTERM (a graceful stop) when the supervisor dies: one killed
    outright (SIGKILL, the OOM killer) would otherwise leave its workers serving the port
    unsupervised and holding their spools, and the bridge could not be started again. Linux's
    parent-death signal; elsewhere, nothing."""
    import ctypes  # noqa: PLC0415 - only workers need it

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != supervisor:  # it died before the signal was asked for
        raise SystemExit(0)
