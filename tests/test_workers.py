"""``server.workers``: several processes share the port, each with its own connection and spool."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.util
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs

from bridge.app import Bridge
from bridge.config import Settings
from bridge.replay_mesh import ReplayLink
from bridge.secret_file import load_stored_secret, store_secret
from bridge.workers import RestartBackoff, Supervisor, WorkerBody
from tests.fake_konpro import FakeKonPro
from tests.support.deliveries import envelope
from tests.support.harness import (
    AMQP_URL,
    QueueFactory,
    drain,
    make_settings,
    process_sections,
    proxied_amqp_url,
)
from tests.support.process import BridgeProcess, free_port, run_command, write_toml
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytest_plugins = ("tests.fake_konpro",)

JSON = {"Content-Type": "application/json"}


def sections(tmp_path: Path, exchange: str, amqp_url: str) -> dict[str, dict[str, object]]:
    return process_sections(
        tmp_path,
        exchange,
        amqp_url=amqp_url,
        amqp={"reconnect_interval": 0.2},
        server={"workers": 2},
    )


def bodies(count: int) -> list[bytes]:
    return [
        orjson.dumps({"event_type": "avatar_video.success", "event_data": {"video_id": f"v{n}"}})
        for n in range(count)
    ]


async def post_each_on_a_new_connection(url: str, events: list[bytes]) -> list[int]:
    """A connection per request, so that the kernel spreads them over the workers."""
    statuses = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for body in events:
            async with http.post(url, data=body, headers=JSON) as response:
                statuses.append(response.status)
    return statuses


async def every_worker_listening(bridge: BridgeProcess, workers: int = 2) -> None:
    """With the broker away /readyz cannot tell, but the log can: each worker says it listens.
    Posting before then could send every connection to the workers already up."""

    def listening() -> bool:
        lines = (orjson.loads(line) for line in bridge.log().splitlines() if line.startswith("{"))
        seen = {line.get("worker") for line in lines if line.get("event") == "bridge.listening"}
        return seen >= set(range(workers))

    await eventually(listening)


async def spool_with_two_workers(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy
) -> list[bytes]:
    """Two workers take 30 events while the broker is away (each spools its share), then stop;
    returns the events."""
    await broker_proxy.cut()
    settings = sections(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    bridge = BridgeProcess(tmp_path, settings)
    await bridge.start(wait_ready=False)
    await every_worker_listening(bridge)
    events = bodies(30)
    statuses = await post_each_on_a_new_connection(bridge.webhook_url, events)

    async def summed_over_the_workers() -> bool:  # /metrics answers for all of them together
        metrics = await scrape(bridge.url + "/metrics")
        depth, connected = (
            metrics[f"konpro_bridge_{name}"] for name in ("spool_depth", "broker_connected")
        )
        return (depth, connected) == (len(events), 0)

    await eventually(summed_over_the_workers)
    assert await bridge.stop() == 0
    assert statuses == [202] * len(events)
    return events


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children]


def worker_lines(log: str, event: str) -> set[int]:
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return {line["worker"] for line in lines if line.get("event") == event and "worker" in line}


async def test_two_workers_share_the_port_deliver_everything_and_stop_cleanly(
    tmp_path: Path, exchange_name: str, bind_queue: QueueFactory
) -> None:
    queue = await bind_queue("#")
    events = bodies(40)
    async with BridgeProcess(tmp_path, sections(tmp_path, exchange_name, AMQP_URL)) as bridge:
        await eventually(lambda: worker_lines(bridge.log(), "amqp.connected") == {0, 1})
        statuses = await post_each_on_a_new_connection(bridge.webhook_url, events)
        assert await bridge.stop() == 0

    assert statuses == [200] * len(events)
    assert sorted(m.body for m in await drain(queue, expect=len(events))) == sorted(events)
    assert worker_lines(bridge.log(), "webhook.accepted") == {0, 1}
    assert "workers.stopped" in bridge.log()


def written_memory_kib(pid: int) -> tuple[int, int]:
    """(private, shared) of what the process has written to: shared with whom it was forked
    from or with, until either writes to the page."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    fields = dict(line.split(":", 1) for line in rollup.splitlines()[1:])
    return int(fields["Private_Dirty"].split()[0]), int(fields["Shared_Dirty"].split()[0])


async def test_workers_share_most_of_their_memory_with_the_supervisor(
    tmp_path: Path, exchange_name: str
) -> None:
    """The supervisor loads the bridge's code before it forks the workers: a worker added costs
    a fraction of a bridge, not a whole one."""
    settings = sections(tmp_path, exchange_name, AMQP_URL)
    settings["log"]["level"] = "debug"  # for bridge.memory_settled
    async with BridgeProcess(tmp_path, settings) as bridge:
        assert bridge.process is not None
        await eventually(lambda: worker_lines(bridge.log(), "bridge.memory_settled") == {0, 1})
        split = {pid: written_memory_kib(pid) for pid in worker_pids(bridge.process.pid)}

    assert len(split) == 2
    for private, shared in split.values():
        assert private < shared, split


async def test_metrics_from_any_worker_count_the_deliveries_of_all_of_them(
    tmp_path: Path, exchange_name: str
) -> None:
    events = bodies(20)
    async with BridgeProcess(tmp_path, sections(tmp_path, exchange_name, AMQP_URL)) as bridge:
        await eventually(lambda: worker_lines(bridge.log(), "amqp.connected") == {0, 1})
        await post_each_on_a_new_connection(bridge.webhook_url, events)
        assert worker_lines(bridge.log(), "webhook.accepted") == {0, 1}

        async def live_gauges_refreshed() -> bool:  # every second, by each worker
            metrics = await scrape(bridge.url + "/metrics")
            gauges = ("broker_connected", "spool_depth")
            return [metrics.get(f"konpro_bridge_{name}") for name in gauges] == [1, 0]

        await eventually(live_gauges_refreshed)
        scrapes = [await scrape(bridge.url + "/metrics") for _ in range(8)]

    received = 'events_received_total{event_type="avatar_video.success",outcome="published"}'
    confirmed = f'events_published_total{{exchange="{exchange_name}"}}'
    for metrics in scrapes:  # whichever worker answered
        assert metrics[f"konpro_bridge_{received}"] == len(events)
        assert metrics[f"konpro_bridge_{confirmed}"] == len(events)
        assert metrics["konpro_bridge_publish_seconds_count"] == len(events)
        assert metrics["konpro_bridge_broker_connected"] == 1
        assert metrics["konpro_bridge_spool_depth"] == 0


async def scrape(url: str) -> dict[str, float]:
    """One scrape on a connection of its own, so that either worker may answer it."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http, http.get(url) as response:
        text = await response.text()
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return {name: float(value) for name, value in samples}


async def test_each_worker_spools_on_its_own_and_the_spool_commands_see_them_all(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, bind_queue: QueueFactory
) -> None:
    queue = await bind_queue("#")
    events = await spool_with_two_workers(tmp_path, exchange_name, broker_proxy)

    direct = write_toml(tmp_path / "direct.toml", sections(tmp_path, exchange_name, AMQP_URL))
    status = json.loads(await cli("spool", "status", "--json", "--config", str(direct)))
    assert status["depth"] == len(events)
    assert [spool["depth"] > 0 for spool in status["spools"]] == [True, True]
    assert "drained 30 events" in await cli("spool", "drain", "--config", str(direct))
    assert sorted(m.body for m in await drain(queue, expect=len(events))) == sorted(events)


async def test_lowering_the_number_of_workers_strands_no_spooled_event(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, bind_queue: QueueFactory
) -> None:
    queue = await bind_queue("#")
    events = await spool_with_two_workers(tmp_path, exchange_name, broker_proxy)
    one = sections(tmp_path, exchange_name, AMQP_URL)
    one["server"] = {"workers": 1}
    config = str(write_toml(tmp_path / "one.toml", one))
    status = json.loads(await cli("spool", "status", "--json", "--config", config))
    assert [spool["depth"] > 0 for spool in status["spools"]] == [True, True]
    left_behind = tmp_path / "spool" / "worker-1"

    async with BridgeProcess(tmp_path, one) as bridge:
        received = await drain(queue, expect=len(events))
        await eventually(lambda: not left_behind.exists())
    assert sorted(m.body for m in received) == sorted(events)
    told = [json.loads(line)["event"] for line in bridge.log().splitlines() if line[:1] == "{"]
    assert told.index("spool.left_behind") < told.index("spool.left_behind_forwarded")


async def test_only_worker_0_registers_and_every_worker_enforces_the_secret_it_learns(
    tmp_path: Path, exchange_name: str, fake_konpro: FakeKonPro
) -> None:
    settings = sections(tmp_path, exchange_name, AMQP_URL)
    port = free_port()
    settings["server"] = {"workers": 2, "port": port}
    settings["konpro"] = {
        "api_url": fake_konpro.url,
        "api_key": fake_konpro.api_key,
        "public_url": f"http://127.0.0.1:{port}/webhooks/konpro",
    }
    settings["reconcile"] = {"enabled": True, "interval": 60.0}

    async with BridgeProcess(tmp_path, settings) as bridge:
        await every_worker_listening(bridge)
        await eventually((tmp_path / "spool" / "webhook_secret").exists)

        async def worker_1_enforces_it() -> bool:  # it looks for the secret every two seconds
            await post_each_on_a_new_connection(bridge.webhook_url, bodies(1))
            return 1 in worker_lines(bridge.log(), "webhook.rejected")

        await eventually(worker_1_enforces_it, within=15, every=0.1)
        before = len(bridge.log())
        unsigned = await post_each_on_a_new_connection(bridge.webhook_url, bodies(20))
        answered_by = worker_lines(bridge.log()[before:], "webhook.rejected")
        reconciling_off = worker_lines(bridge.log(), "reconcile.off")

    assert [call.name for call in fake_konpro.writes] == ["endpoint.add"]  # once, not per worker
    assert reconciling_off == {1}
    assert unsigned == [401] * 20
    assert answered_by == {0, 1}  # both workers refused some: the kernel spread the connections


async def test_a_worker_that_cannot_read_the_stored_secret_says_so_once_and_keeps_checking(
    tmp_path: Path, exchange_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Say, a secret file an operator's ``reconcile --once`` wrote as another user: the worker
    keeps the secret in force, and still stops gracefully."""
    konpro = {"api_key": "key", "public_url": "https://hooks.example.com/webhooks/konpro"}
    settings = make_settings(tmp_path, exchange_name, konpro=konpro, reconcile={"enabled": True})
    store_secret(settings.spool.path, "whsec_in_force", "endpoint-1")
    secret_file = settings.spool.path / "webhook_secret"
    unreadable_looks: list[OSError] = []

    def load_counting(spool_dir: Path) -> str | None:
        try:
            return load_stored_secret(spool_dir)
        except OSError as exc:
            unreadable_looks.append(exc)
            raise

    monkeypatch.setattr("bridge.app.load_stored_secret", load_counting)
    with capture_logs() as logs:
        async with Bridge(settings, worker=1) as bridge:
            secret_file.unlink()
            secret_file.mkdir()  # unreadable, even for root

            def said() -> list[str]:
                return [e["error"] for e in logs if e["event"] == "bridge.secret_unreadable"]

            await eventually(lambda: bool(said()))
            await eventually(lambda: len(unreadable_looks) >= 2)  # it looked again, said no more
            unsigned = await post_each_on_a_new_connection(bridge.webhook_url, bodies(1))

    assert said() == [f"[Errno 21] Is a directory: '{secret_file}'"]
    assert unsigned == [401]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["bridge.secret_unreadable"]
    assert [e["event"] for e in logs][-1] == "bridge.stopped"


async def test_a_worker_that_dies_is_started_again(
    tmp_path: Path, exchange_name: str, bind_queue: QueueFactory
) -> None:
    queue = await bind_queue("#")
    async with BridgeProcess(tmp_path, sections(tmp_path, exchange_name, AMQP_URL)) as bridge:
        assert bridge.process is not None
        supervisor = bridge.process.pid
        await eventually(lambda: len(worker_pids(supervisor)) == 2)
        victim = worker_pids(supervisor)[0]
        os.kill(victim, signal.SIGKILL)
        await eventually(lambda: "workers.exited" in bridge.log())
        await eventually(
            lambda: len(worker_pids(supervisor)) == 2 and victim not in worker_pids(supervisor)
        )
        statuses = await post_each_on_a_new_connection(bridge.webhook_url, bodies(10))
        assert await bridge.stop() == 0

    assert statuses == [200] * 10
    assert len(await drain(queue, expect=10)) == 10


async def test_workers_that_cannot_start_stop_the_bridge_with_exit_code_1(
    tmp_path: Path, exchange_name: str
) -> None:
    settings = sections(tmp_path, exchange_name, AMQP_URL)
    (tmp_path / "not-a-directory").write_text("")
    settings["spool"] = {"path": str(tmp_path / "not-a-directory")}
    bridge = BridgeProcess(tmp_path, settings)
    await bridge.start(wait_ready=False, wait_listening=False)
    assert await bridge.wait() == 1
    assert "bridge.cannot_start" in bridge.log()


def one_cannot_start_while_the_other_is_still_starting(
    settings: Settings, index: int, replays: ReplayLink
) -> int:
    """Worker 0 fails to start; worker 1 has not installed its signal handlers yet."""
    if index == 0:
        time.sleep(0.3)  # worker 1 is surely forked and asleep by now
        return 1
    time.sleep(30)
    return 0


def supervise(settings: Settings, body: WorkerBody, backoff: RestartBackoff | None = None) -> None:
    raise SystemExit(Supervisor(settings, body, backoff=backoff).run())


def start_supervisor(
    settings: Settings, body: WorkerBody, backoff: RestartBackoff | None = None
) -> BaseProcess:
    """The supervisor in a process of its own, so that its signal handlers stay out of the test
    runner."""
    process = multiprocessing.get_context("fork").Process(
        target=supervise, args=(settings, body, backoff)
    )
    process.start()
    return process


async def stop_supervisor(process: BaseProcess) -> None:
    assert process.pid is not None
    os.kill(process.pid, signal.SIGTERM)
    await asyncio.to_thread(process.join, 20)
    process.kill()


def record_start(settings: Settings, index: int) -> Path:
    """Note that worker ``index`` started (a line with the time) in a file the test reads."""
    starts = settings.spool.path.parent / f"worker-{index}-starts"
    with starts.open("a") as record:
        record.write(f"{time.time()}\n")
    return starts


def started_twice(settings: Settings, index: int) -> Callable[[], bool]:
    starts = settings.spool.path.parent / f"worker-{index}-starts"
    return lambda: starts.exists() and len(starts.read_text().split()) == 2


def test_the_worker_that_cannot_start_decides_the_exit_code_not_the_ones_stopped_with_it(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, one_cannot_start_while_the_other_is_still_starting)
    supervisor.join(20)
    assert supervisor.exitcode == 1


async def cli(*args: str) -> str:
    ran = await run_command(*args)
    assert ran.code == 0, ran.stderr
    return ran.stdout


def fails_at_once(settings: Settings, index: int, replays: ReplayLink) -> int:
    (settings.spool.path.parent / f"worker-{index}-failed").touch()
    return 3  # not CANNOT_START: the supervisor starts it again, after its back-off


async def test_a_stop_during_a_restart_back_off_does_not_wait_it_out(tmp_path: Path) -> None:
    """The back-off grows to 30 s; a platform's stop grace is often as short (Kubernetes: 30 s).
    Python resumes a sleep after a signal handler, so the supervisor must wake itself."""
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, fails_at_once, RestartBackoff(60.0, 60.0))
    try:
        failed = [settings.spool.path.parent / f"worker-{i}-failed" for i in (0, 1)]
        assert supervisor.pid is not None
        pid = supervisor.pid
        # Once it has seen them end (reaped them), the supervisor is in its back-off.
        await eventually(lambda: all(m.exists() for m in failed) and not worker_pids(pid))
        os.kill(pid, signal.SIGTERM)
        await asyncio.to_thread(supervisor.join, 20)
        assert supervisor.exitcode is not None, "still waiting out its back-off"
    finally:
        supervisor.kill()


def worker_0_dies_at_once(settings: Settings, index: int, replays: ReplayLink) -> int:
    if index == 0:
        (settings.spool.path.parent / "worker-0-failed").touch()
        return 70  # as a worker that crashed
    (settings.spool.path.parent / "worker-1-ran").touch()
    time.sleep(60)
    return 0


async def test_a_stop_while_a_dead_worker_waits_to_restart_is_still_a_clean_stop(
    tmp_path: Path,
) -> None:
    """The death was reported when it happened (``workers.exited``); only how the stop goes
    decides the exit code. Else a rollout after an OOM kill reads as a failed stop (systemd:
    ``failed``), and a restart-on-failure policy starts the bridge again."""
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, worker_0_dies_at_once, RestartBackoff(60.0, 60.0))
    try:
        assert supervisor.pid is not None
        pid = supervisor.pid
        markers = settings.spool.path.parent
        failed, ran = markers / "worker-0-failed", markers / "worker-1-ran"
        # Once it has seen it end (reaped it), the supervisor is in its back-off.
        await eventually(lambda: failed.exists() and ran.exists() and len(worker_pids(pid)) == 1)
    finally:
        await stop_supervisor(supervisor)
    assert supervisor.exitcode == 0


def crash_loops_or_runs_a_while(settings: Settings, index: int, replays: ReplayLink) -> int:
    """Worker 0 dies at once, every time; worker 1 runs for 11.5 s, dies once, then runs on."""
    starts = record_start(settings, index)
    if index == 0:
        return 3
    if len(starts.read_text().split()) == 1:
        time.sleep(11.5)
        (settings.spool.path.parent / "worker-1-ended").write_text(str(time.time()))
        return 3
    time.sleep(60)
    return 0


async def test_a_worker_crash_looping_does_not_hold_up_the_restart_of_another(
    tmp_path: Path,
) -> None:
    """Each worker waits out its own back-off: worker 1, healthy until it dies, is started again
    after its own first wait, while worker 0, crash-looping, is still in a long one. Were the
    supervisor to wait for worker 0's, worker 1 would come back only with it."""
    # Worker 0's back-offs (0.25, 0.5, 1, 2, 4, 8 s) put it in the 8 s one, from about 7.75 s
    # to 15.75 s, when worker 1 dies at 11.5 s: no start of worker 0 falls between worker 1's
    # end and its restart, unless the restart waited for worker 0's.
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, crash_loops_or_runs_a_while, RestartBackoff(0.25, 30))
    try:
        await eventually(started_twice(settings, 1), within=40)
    finally:
        await stop_supervisor(supervisor)

    folder = settings.spool.path.parent
    ended = float((folder / "worker-1-ended").read_text())
    restarted = float((folder / "worker-1-starts").read_text().split()[1])
    worker_0_starts = [float(t) for t in (folder / "worker-0-starts").read_text().split()]
    assert len(worker_0_starts) >= 5  # it did crash-loop: its back-off had grown
    assert [t for t in worker_0_starts if ended <= t <= restarted] == []


def test_a_worker_that_keeps_dying_waits_longer_each_time_up_to_the_bound() -> None:
    backoff = RestartBackoff()  # the supervisor's
    delays = []
    now = 0.0
    for _ in range(7):
        backoff.started(0, now)
        now += 0.5  # it dies half a second after each start
        delays.append(backoff.delay(0, now))
        now += delays[-1]

    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_worker_that_ran_for_a_while_is_restarted_after_the_first_wait_again() -> None:
    backoff = RestartBackoff(1.0, 30.0)
    for _ in range(5):  # a bad start: five quick deaths
        backoff.started(0, 0.0)
        backoff.delay(0, 0.1)
    backoff.started(0, 100.0)

    assert backoff.delay(0, 100.0 + 3600.0) == 1.0  # an hour later, not 30 s


def test_each_worker_has_its_own_back_off() -> None:
    backoff = RestartBackoff(1.0, 30.0)
    for worker in (0, 1):
        backoff.started(worker, 0.0)
    backoff.delay(0, 0.1)
    backoff.started(0, 1.1)

    assert (backoff.delay(0, 1.2), backoff.delay(1, 1.2)) == (2.0, 1.0)


def raises_once(settings: Settings, index: int, replays: ReplayLink) -> int:
    starts = record_start(settings, index)
    if index == 0 and len(starts.read_text().split()) == 1:
        raise RuntimeError("a bug met at run time")
    time.sleep(60)
    return 0


async def test_a_worker_that_dies_of_an_error_nobody_caught_is_started_again(
    tmp_path: Path,
) -> None:
    """multiprocessing ends such a process with exit code 1, the code of a worker that could
    not start at all: the supervisor stopped the whole bridge. Now it logs ``workers.crashed``
    (with the traceback), exits 70, and is started again after its back-off."""
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, raises_once, RestartBackoff(0.25, 4.0))
    try:
        await eventually(started_twice(settings, 0), within=20)
        assert supervisor.is_alive()
    finally:
        await stop_supervisor(supervisor)
    assert supervisor.exitcode == 0


class _HoldTheForkWindow:
    """Preload: each forked worker, between ``fork()`` and its own code, notes that it is there
    (a file ``forked-<pid>``) and stays until a stop is pending for it (5 s at most), as a
    loaded machine may take a moment; nothing else changes."""

    def __init__(self, markers: Path) -> None:
        self.markers = markers

    def __call__(self) -> None:
        multiprocessing.util.register_after_fork(self, _HoldTheForkWindow.hold)

    def hold(self) -> None:
        (self.markers / f"forked-{os.getpid()}").touch()
        deadline = time.monotonic() + 5.0
        while signal.SIGTERM not in signal.sigpending() and time.monotonic() < deadline:
            time.sleep(0.01)


def _serve_until_stopped(settings: Settings, index: int, replays: ReplayLink) -> int:
    """A worker that runs until SIGTERM (the default action ends it: a clean stop)."""
    (settings.spool.path.parent / f"worker-{index}-ran").touch()
    time.sleep(60)
    return 0


def _markers(directory: Path, pattern: str) -> list[Path]:
    return list(directory.glob(pattern))


def _supervise(settings: Settings) -> None:
    window = _HoldTheForkWindow(settings.spool.path.parent)
    supervisor = Supervisor(settings, _serve_until_stopped, preload=window)
    raise SystemExit(supervisor.run())


async def test_a_stop_that_comes_as_the_workers_are_forked_stops_them(tmp_path: Path) -> None:
    """Until a forked worker has put the default handlers back, it has the supervisor's,
    copied by fork: a stop sent to it then must not be lost (the worker would serve on until
    the supervisor kills it, shutdown_timeout + 5 s later). The window is widened here to hit
    it every time; on a real machine it is well under a millisecond, and just as real."""
    settings = make_settings(
        tmp_path, "unused", server={"workers": 2, "shutdown_timeout": 1.0, "port": free_port()}
    )
    supervisor = multiprocessing.get_context("fork").Process(target=_supervise, args=(settings,))
    supervisor.start()
    try:
        await eventually(lambda: len(_markers(tmp_path, "forked-*")) == 2)  # both in the window
        assert supervisor.pid is not None
        os.kill(supervisor.pid, signal.SIGTERM)
        await asyncio.to_thread(supervisor.join, 20)
    finally:
        supervisor.kill()
    # Not 9: a worker that lost its stop is killed once shutdown_timeout + 5 s are over.
    assert supervisor.exitcode == 0
    assert not _markers(tmp_path, "worker-*-ran")  # each was stopped in the window


async def test_with_several_workers_the_supervisor_lets_the_registration_finish_too(
    tmp_path: Path, exchange_name: str, fake_konpro: FakeKonPro, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The supervisor's patience with a stopping worker includes the registration allowance
    (``konpro.request_timeout`` + 1 s): else worker 0 is killed waiting for KonPro's answer,
    and the secret in it is lost."""
    fake_konpro.list_secrets = False
    fake_konpro.registration_delay = 8.0  # KonPro writing it, after the check
    port = free_port()
    sections: dict[str, dict[str, object]] = {
        "server": {"port": port, "workers": 2, "shutdown_timeout": 1.0},
        "konpro": {
            "api_url": fake_konpro.url,
            "api_key": fake_konpro.api_key,
            "public_url": f"http://127.0.0.1:{port}/webhooks/konpro",
            "request_timeout": 10.0,
        },
        "reconcile": {"enabled": True},
    }
    sections["amqp"] = {"url": "amqp://guest:guest@127.0.0.1:5672/", "exchange": exchange_name}
    sections["spool"] = {"path": str(tmp_path / "spool")}
    sections["log"] = {"format": "json"}
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start()
    try:
        await eventually(lambda: bool(fake_konpro.verified_urls), within=15)
        await asyncio.sleep(0.2)  # the registration is in flight: the stop begins
        bridge.send(signal.SIGTERM)
        code = await bridge.wait(within=30)
    finally:
        await bridge.stop()

    await eventually(
        lambda: bool(fake_konpro.registered)
    )  # KonPro registers it, whatever the bridge did
    endpoint = fake_konpro.endpoints[fake_konpro.registered[0]]
    assert '"workers.kill"' not in bridge.log()
    assert code == 0
    assert load_stored_secret(tmp_path / "spool") == endpoint["secret"]


async def test_workers_stopped_while_the_broker_reads_nothing_stop_cleanly(
    tmp_path: Path,
    exchange_name: str,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    """The same stop under the supervisor of ``server.workers = 2``: each worker must stop
    gracefully within the allowance, and the bridge exit 0. Instead each worker waits on
    aiormq's close until the supervisor kills it (``workers.kill``, an error), with its spool
    and its connection left to the kill, and the bridge exits 9."""
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp_url=proxied_amqp_url(broker_proxy),
        amqp={"publish_timeout": 1.0},
        server={"shutdown_timeout": 1.0, "workers": 2},
    )
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start()
    try:
        broker_proxy.hold()
        bodies = [envelope(f"v{n:03d}-" + "x" * 100_000) for n in range(200)]

        async def post(body: bytes) -> int:
            async with http.post(bridge.webhook_url, data=body, headers=JSON) as response:
                return response.status

        assert set(await asyncio.gather(*map(post, bodies))) == {202}
        bridge.send(signal.SIGTERM)
        exit_code = await bridge.wait(within=60)
    finally:
        await broker_proxy.cut()
        if bridge.process is not None and bridge.process.returncode is None:
            bridge.process.kill()
            await bridge.process.wait()
    assert '"workers.kill"' not in bridge.log()
    assert exit_code == 0


def _started(settings: Settings, index: int) -> None:
    (settings.spool.path.parent / f"worker-{index}-started").touch()


def fails_its_stop(settings: Settings, index: int, replays: ReplayLink) -> int:
    """A worker whose graceful stop fails: it exits 3 when told to stop."""

    def on_stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(3)

    signal.signal(signal.SIGTERM, on_stop)
    _started(settings, index)
    time.sleep(60)
    return 0


def dies_of_sigint_when_stopped(settings: Settings, index: int, replays: ReplayLink) -> int:
    """A worker that a terminal's Ctrl-C ends before its handlers are in place: killed by
    SIGINT (exit code -2) as the stop comes."""

    def on_stop(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, on_stop)
    _started(settings, index)
    time.sleep(60)
    return 0


async def exit_code_of_a_stop(tmp_path: Path, body: WorkerBody) -> int | None:
    """The supervisor's exit code when told to stop once both its workers run ``body``."""
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, body)
    markers = [settings.spool.path.parent / f"worker-{i}-started" for i in (0, 1)]
    try:
        await eventually(lambda: all(marker.exists() for marker in markers))
    finally:
        await stop_supervisor(supervisor)
    return supervisor.exitcode


async def test_a_worker_whose_stop_fails_makes_the_bridges_stop_fail(tmp_path: Path) -> None:
    """The supervisor's exit code is the worst of its workers' stops: a worker that could not
    stop cleanly (its events may be in doubt) is not hidden behind a 0 for systemd or the
    orchestrator."""
    assert await exit_code_of_a_stop(tmp_path, fails_its_stop) == 3


async def test_a_worker_ended_by_a_terminals_ctrl_c_is_a_clean_stop(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches every process of the group, workers included; one ended by
    that SIGINT stopped as asked, like one ended by the supervisor's SIGTERM: exit code 0."""
    assert await exit_code_of_a_stop(tmp_path, dies_of_sigint_when_stopped) == 0


def cannot_start_once_worker_1_runs(settings: Settings, index: int, replays: ReplayLink) -> int:
    """Worker 0 cannot start (exit code 1) once worker 1 is up; worker 1 fails its stop."""
    if index == 1:
        return fails_its_stop(settings, index, replays)
    marker = settings.spool.path.parent / "worker-1-started"
    deadline = time.monotonic() + 20
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return 1


def test_a_worker_that_cannot_start_decides_the_exit_code_over_a_failed_stop_of_another(
    tmp_path: Path,
) -> None:
    """Exit code 1 says "could not start: a restart will not fix it" (a process manager then
    stops trying); the stop of the other workers that follows, however it goes, must not
    replace it."""
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, cannot_start_once_worker_1_runs)
    supervisor.join(30)
    supervisor.kill()

    assert supervisor.exitcode == 1


def notes_its_pid(settings: Settings, index: int, replays: ReplayLink) -> int:
    (settings.spool.path.parent / f"worker-{index}-pid").write_text(str(os.getpid()))
    time.sleep(60)
    return 0


def _running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def test_workers_of_a_supervisor_killed_outright_stop_too(tmp_path: Path) -> None:
    """A supervisor killed with SIGKILL (the OOM killer) cannot stop its workers; the kernel
    does (a parent-death SIGTERM). Else they would go on serving the port unsupervised and
    holding their spools, and the bridge could never be started again."""
    settings = make_settings(tmp_path, "unused", server={"workers": 2, "port": free_port()})
    supervisor = start_supervisor(settings, notes_its_pid)
    notes = [settings.spool.path.parent / f"worker-{i}-pid" for i in (0, 1)]
    pids: list[int] = []
    try:
        await eventually(lambda: all(note.exists() and note.read_text() for note in notes))
        pids = [int(note.read_text()) for note in notes]
        assert supervisor.pid is not None
        os.kill(supervisor.pid, signal.SIGKILL)
        supervisor.join(10)
        await eventually(lambda: not any(_running(pid) for pid in pids))
    finally:
        for pid in filter(_running, pids):  # the orphans this test made, by their ids
            os.kill(pid, signal.SIGKILL)


async def test_the_spool_depth_metric_does_not_count_a_dead_workers_spool_twice(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy
) -> None:
    """A worker killed (the OOM killer) and started again reports its spool anew; the depth a
    scrape reports must not also hold what the dead process last reported, or an alert on
    spool_depth sees events that are not there, and a drained spool never reads 0."""
    await broker_proxy.cut()
    bridge = BridgeProcess(
        tmp_path, sections(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    )
    await bridge.start(wait_ready=False)
    try:
        await every_worker_listening(bridge)
        events = bodies(30)
        statuses = await post_each_on_a_new_connection(bridge.webhook_url, events)
        assert statuses == [202] * len(events)

        async def depth() -> float:
            return (await scrape(bridge.url + "/metrics"))["konpro_bridge_spool_depth"]

        async def all_spooled() -> bool:
            return await depth() == len(events)

        await eventually(all_spooled)
        assert bridge.process is not None
        supervisor = bridge.process.pid
        victim = worker_pids(supervisor)[1]
        os.kill(victim, signal.SIGKILL)
        await eventually(
            lambda: len(worker_pids(supervisor)) == 2 and victim not in worker_pids(supervisor)
        )
        await eventually(lambda: bridge.log().count('"bridge.listening"') >= 3, within=20)
        await eventually(all_spooled)
        # Live gauges are at most a second old: the new worker has reported by now.
        for _ in range(3):
            await asyncio.sleep(1.0)
            assert await depth() == len(events)
    finally:
        await bridge.stop()
