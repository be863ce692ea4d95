"""Start and stop like a well-behaved daemon: SIGTERM drains what is in flight, then exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

import aiohttp
import orjson
import pytest
import structlog
from structlog.testing import capture_logs

from bridge.app import Bridge
from bridge.config import SpoolSettings
from bridge.events import Delivery
from bridge.spool import Spool
from bridge.tasks import cancel_and_wait
from tests.support.deliveries import envelope
from tests.support.harness import (
    BridgeFactory,
    QueueFactory,
    drain,
    make_settings,
    process_sections,
    proxied_amqp_url,
)
from tests.support.observing import seen
from tests.support.process import (
    CAN_SWITCH_USER,
    NOBODY,
    BridgeProcess,
    free_port,
    start_command,
    write_toml,
)
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

JSON = {"Content-Type": "application/json"}


def settings(tmp_path: Path, exchange: str, amqp_url: str) -> dict[str, dict[str, object]]:
    return process_sections(tmp_path, exchange, amqp_url=amqp_url)


async def test_sigterm_lets_in_flight_publishes_finish_then_exits_zero(
    tmp_path: Path,
    exchange_name: str,
    bind_queue: QueueFactory,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    queue = await bind_queue("#")
    bridge = BridgeProcess(
        tmp_path, settings(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    )
    await bridge.start()
    broker_proxy.mute()  # the broker takes the publishes; their confirms wait in the proxy
    url = bridge.webhook_url
    bodies = [
        orjson.dumps({"event_type": "avatar_video.success", "event_data": {"video_id": f"v{i}"}})
        for i in range(20)
    ]

    async def post(body: bytes) -> int:
        async with http.post(url, data=body, headers=JSON) as r:
            return r.status

    async def all_in_flight() -> bool:  # every body read, and held until its answer
        async with http.get(bridge.url + "/status") as response:
            held: int = (await response.json())["intake"]["bytes_in_flight"]
        return held == sum(map(len, bodies))

    posts = [asyncio.create_task(post(body)) for body in bodies]
    await eventually(all_in_flight)
    bridge.send(signal.SIGTERM)
    await eventually(lambda: '"bridge.stopping"' in bridge.log())  # publishes still in flight
    broker_proxy.release()
    statuses = await asyncio.gather(*posts)
    exit_code = await bridge.wait()

    assert exit_code == 0, bridge.log()
    assert statuses == [200] * len(bodies)
    assert sorted(m.body for m in await drain(queue, expect=len(bodies))) == sorted(bodies)
    log = bridge.log()
    assert log.index('"bridge.signal"') < log.index('"bridge.stopped"')


async def test_deliveries_still_unconfirmed_when_the_grace_ends_are_spooled_and_answered(
    tmp_path: Path,
    exchange_name: str,
    bind_queue: QueueFactory,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    """A broker that stopped answering at the moment of a restart: the grace period runs out
    with deliveries waiting for confirms. They are answered 202 from the spool, not cut off."""
    queue = await bind_queue("#")
    sections = settings(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    sections["amqp"]["publish_timeout"] = 30.0
    sections["server"] = {"shutdown_timeout": 1.0}
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start()
    broker_proxy.hold()
    body = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'

    async def post() -> tuple[int, str]:
        headers = {"Content-Type": "application/json", "KonPro-Event-Id": "evt-at-shutdown"}
        async with http.post(bridge.webhook_url, data=body, headers=headers) as response:
            return response.status, (await response.json())["outcome"]

    answer = asyncio.create_task(post())
    await asyncio.sleep(0.3)
    bridge.send(signal.SIGTERM)
    assert await answer == (202, "spooled")
    # The whole stop: the grace period, then about 2 s for aiormq's close; the Kubernetes
    # example's terminationGracePeriodSeconds leaves 5 s over shutdown_timeout for it.
    assert await bridge.wait(within=1.0 + 5.0) == 0, bridge.log()
    assert '"bridge.confirms_abandoned"' in bridge.log()
    assert '"bridge.setting_doubtful"' in bridge.log()  # 30 s: longer than KonPro waits
    assert '"bridge.spool_not_empty"' in bridge.log()

    broker_proxy.release()
    async with bridge:  # the next start forwards it
        received = await drain(queue, expect=1, within=10)
    assert {m.message_id for m in received} == {"evt-at-shutdown"}


async def test_a_delivery_waiting_behind_one_with_its_event_id_is_answered_when_the_grace_ends(
    tmp_path: Path,
    exchange_name: str,
    bind_queue: QueueFactory,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    """Publishes under one message id go one at a time. The one waiting its turn when the
    grace ends must not then publish and wait for a confirm nobody abandons: it would be cut
    off unanswered a grace period later, and hold the stop that long."""
    queue = await bind_queue("#")
    sections = settings(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    sections["amqp"]["publish_timeout"] = 30.0
    sections["server"] = {"shutdown_timeout": 1.0}
    sections["konpro"] = {"replay_window": 0.0}
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start()
    broker_proxy.hold()
    headers = {"Content-Type": "application/json", "KonPro-Event-Id": "evt-same-id"}
    bodies = [
        b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}',
        b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1", "try": 2}}',
    ]

    async def post(body: bytes) -> int | str:
        try:
            async with http.post(bridge.webhook_url, data=body, headers=headers) as response:
                return response.status
        except aiohttp.ClientError as exc:
            return type(exc).__name__

    async def held_in_flight() -> int:  # bytes of the bodies (and headers) the bridge holds
        async with http.get(bridge.url + "/status") as response:
            held: int = (await response.json())["intake"]["bytes_in_flight"]
            return held

    async def second_read(first_held: int) -> bool:  # and waiting for its turn
        return await held_in_flight() >= first_held + len(bodies[1])

    before = broker_proxy.sent_upstream
    first = asyncio.create_task(post(bodies[0]))
    await eventually(lambda: broker_proxy.sent_upstream - before >= len(bodies[0]))  # published
    first_held = await held_in_flight()
    second = asyncio.create_task(post(bodies[1]))
    await eventually(lambda: second_read(first_held))
    bridge.send(signal.SIGTERM)
    answers = await asyncio.gather(first, second)
    assert await bridge.wait(within=1.0 + 5.0) == 0, bridge.log()
    assert list(answers) == [202, 202], bridge.log()
    broker_proxy.release()
    received: set[bytes] = set()

    async def both_forwarded() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            received.add(message.body)
        return received >= set(bodies)

    async with bridge:  # the next start forwards both
        # The first may arrive twice: the broker stored it once the link was let through.
        with contextlib.suppress(TimeoutError):
            await eventually(both_forwarded)
    assert received == set(bodies)


async def test_a_delivery_whose_body_is_still_coming_when_the_grace_ends_is_answered_and_logged(
    tmp_path: Path, exchange_name: str
) -> None:
    """aiohttp ends the body read when the grace runs out: the delivery is answered 503,
    as any the bridge cannot take now, and the log says so, instead of a silent close."""
    sections = settings(tmp_path, exchange_name, "amqp://guest:guest@127.0.0.1:5672/")
    sections["server"] = {"shutdown_timeout": 1.0}
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start()
    body = b'{"event_type": "avatar_video.success", "event_data": {"video_id": "v1"}}'
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    head = (
        b"POST /webhooks/konpro HTTP/1.1\r\nHost: bridge\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    writer.write(head + body[:10])  # the rest is on its way, slowly
    await writer.drain()
    await asyncio.sleep(0.3)
    bridge.send(signal.SIGTERM)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert await bridge.wait(within=1.0 + 5.0) == 0, bridge.log()
    log = bridge.log()
    assert answer.startswith(b"HTTP/1.1 503"), (answer, log)
    assert '"webhook.refused"' in log, log


async def test_a_bridge_started_while_the_broker_is_down_serves_health_and_stops_cleanly(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    await broker_proxy.cut()
    bridge = BridgeProcess(
        tmp_path, settings(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    )
    await bridge.start(wait_ready=False)
    async with http.get(bridge.url + "/readyz") as response:
        assert response.status == 503
    assert await bridge.stop() == 0
    assert "amqp.connect_failed" in bridge.log()


async def test_python_dash_m_and_the_console_script_are_the_same_program(tmp_path: Path) -> None:
    console_script = str(Path(sys.executable).parent / "konpro-bridge")
    for argv in ([console_script], [sys.executable, "-m", "bridge"]):
        process = await asyncio.create_subprocess_exec(
            *argv, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, _ = await process.communicate()
        assert process.returncode == 0
        assert out.startswith(b"konpro-bridge ")


@pytest.mark.parametrize(
    ("setting", "said"),
    [("port", "(server.port): "), ("metrics_port", "(server.metrics_port): ")],
)
async def test_a_port_already_taken_is_a_clear_start_up_error(
    setting: str, said: str, tmp_path: Path, exchange_name: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sections = settings(tmp_path, exchange_name, "amqp://guest:guest@127.0.0.1:5672/")
        bridge = BridgeProcess(tmp_path, {**sections, "server": {setting: port}})
        await bridge.start(wait_listening=False)
        assert await bridge.wait() == 1
    assert f"cannot listen on 127.0.0.1:{port}" in bridge.log()
    assert said in bridge.log()
    assert "Traceback" not in bridge.log()


@pytest.mark.parametrize(
    ("damage", "said"),
    [("a directory", "[Errno 21] Is a directory"), ("not text", "is not UTF-8 text")],
)
async def test_a_stored_secret_that_cannot_be_read_is_a_clear_start_up_error(
    damage: str, said: str, tmp_path: Path, exchange_name: str
) -> None:
    secret_file = tmp_path / "spool" / "webhook_secret"
    if damage == "a directory":
        secret_file.mkdir(parents=True)  # unreadable, even for root
    else:
        secret_file.parent.mkdir()
        secret_file.write_bytes(b"whsec_\xff\xfe")
    sections = settings(tmp_path, exchange_name, "amqp://guest:guest@127.0.0.1:5672/")
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start(wait_listening=False)
    assert await bridge.wait() == 1
    assert "cannot read the stored webhook secret: " in bridge.log()
    assert said in bridge.log()
    assert "Traceback" not in bridge.log()


async def test_a_bridge_listens_once_it_can_publish_so_its_first_delivery_is_published(
    start_bridge: BridgeFactory, http: aiohttp.ClientSession
) -> None:
    """Listening while still connecting would spool the first moments' deliveries (202)."""
    async with start_bridge(wait_ready=False) as bridge:
        body = orjson.dumps({"event_type": "avatar_video.success", "event_data": {"video_id": "1"}})
        async with http.post(bridge.webhook_url, data=body, headers=JSON) as response:
            answer = await response.json()
    assert (response.status, answer["outcome"]) == (200, "published")


async def test_a_broker_that_does_not_answer_delays_listening_by_a_few_seconds_at_most(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, http: aiohttp.ClientSession
) -> None:
    broker_proxy.hold()  # connections are taken, and nothing comes back
    bridge = BridgeProcess(
        tmp_path, settings(tmp_path, exchange_name, proxied_amqp_url(broker_proxy))
    )
    await bridge.start(wait_ready=False)  # waits for bridge.listening, 15 s at most
    async with http.get(bridge.url + "/healthz") as response:
        assert response.status == 200
    assert await bridge.stop() == 0
    assert "bridge.listening_before_broker" in bridge.log()


async def test_a_stop_while_a_left_behind_spool_drains_stops_listening_before_the_drain_ends(
    tmp_path: Path, exchange_name: str, bind_queue: QueueFactory, broker_proxy: TcpProxy
) -> None:
    """Listening ends first, as on any stop, so that KonPro's deliveries go to another bridge
    rather than wait on this one; the drain of a left-behind spool has what is left of the
    grace period, and its events go on reaching the bus after the port is closed."""
    # Worker 1's spool, after server.workers went from 2 to 1: worker 0 forwards it at start.
    queue = await bind_queue("#")
    left_behind = make_settings(tmp_path, exchange_name).spool.at(tmp_path / "spool" / "worker-1")
    async with await Spool.open(left_behind) as spool:
        for n in range(50):
            await spool.append(Delivery("avatar_video.success", b"{}", f"left-{n}"))
    broker_proxy.delay = 0.05  # every confirm takes a while: the drain lasts seconds
    settings = make_settings(
        tmp_path,
        exchange_name,
        amqp={"url": proxied_amqp_url(broker_proxy)},
        server={"shutdown_timeout": 2.5},
    )
    bridge = Bridge(settings)
    received: list[str | None] = []

    async def forwarded() -> bool:
        while (message := await queue.get(fail=False)) is not None:
            received.append(message.message_id)
        return bool(received)

    with capture_logs() as logs:
        await bridge.start()
        await eventually(forwarded)  # the drain is under way
        port = bridge.port
        stopping = asyncio.create_task(bridge.stop())
        await eventually(lambda: refuses_connections(port))
        await forwarded()
        when_closed = len(received)
        await stopping
    await forwarded()

    # One publish may have been on its way when the port closed; more is the drain going on.
    assert len(received) - when_closed > 2, (when_closed, len(received))
    assert [e["event"] for e in logs].count("bridge.stopped") == 1


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def test_ending_a_task_that_died_of_an_error_logs_it_and_lets_the_stop_go_on() -> None:
    async def helper() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(helper(), name="helper")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await cancel_and_wait(task)

    assert [(e["event"], e["task"], e["error"]) for e in logs] == [
        ("bridge.task_failed", "helper", "RuntimeError('boom')")
    ]


async def test_a_task_whose_library_swallowed_a_cancellation_is_cancelled_again() -> None:
    # As aiohttp does with a cancellation that meets its own timeout: it becomes a
    # TimeoutError, and the task goes on (reconciliation would sleep and run again).
    async def swallows_the_first_cancellation() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        await asyncio.sleep(10)

    task = asyncio.create_task(swallows_the_first_cancellation())
    await asyncio.sleep(0)

    await asyncio.wait_for(cancel_and_wait(task, again_every=0.05), 2)

    assert task.cancelled()


async def test_a_stop_cancelled_while_it_ends_a_task_stays_cancelled() -> None:
    async def slow_to_end() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(10)  # cleaning up

    task = asyncio.create_task(slow_to_end())
    await asyncio.sleep(0)
    stopping = asyncio.create_task(cancel_and_wait(task))
    await asyncio.sleep(0.01)
    stopping.cancel()

    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert task.cancelled()


@pytest.mark.skipif(not CAN_SWITCH_USER, reason="runs the bridge as nobody: root and setpriv")
async def test_a_spool_file_the_bridge_may_not_write_is_a_clear_start_up_error(
    exchange_name: str,
) -> None:
    """A volume restored with the wrong owner: SQLite opens a file it may not write read-only,
    without a word, and the spool would fail at the first delivery the broker cannot take."""
    with tempfile.TemporaryDirectory() as workdir:  # pytest's own is for root alone
        os.chmod(workdir, 0o755)  # noqa: S103 - nobody must reach the spool inside
        root = Path(workdir)
        spool = root / "spool"
        async with await Spool.open(SpoolSettings(path=spool)):
            pass  # root's: the bridge's user may write the directory, not the file
        for path in (spool, spool / "spool.lock"):
            os.chown(path, NOBODY, NOBODY)
        sections = settings(root, exchange_name, "amqp://guest:guest@127.0.0.1:5672/")
        sections["server"] = {"host": "127.0.0.1", "port": free_port()}  # should it start
        config = write_toml(root / "bridge.toml", sections)
        process = await start_command("run", "--config", config, cwd=root, as_user=NOBODY)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()  # it started: the failure is below
        _, stderr = await process.communicate()

    log = stderr.decode()
    assert process.returncode == 1, log[-600:]
    assert "bridge.cannot_start" in log
    assert "(attempt to write a readonly database); check the volume (permissions" in log


async def test_cleanup_after_a_tasks_own_cancellation_still_waits_for_its_helpers() -> None:
    cleaned_up: list[str] = []

    async def owner() -> None:
        helper = asyncio.create_task(asyncio.sleep(3600))
        try:
            await asyncio.sleep(3600)
        finally:  # runs once this task's own cancellation has been delivered
            await cancel_and_wait(helper)
            cleaned_up.append("helper ended")

    owning = asyncio.create_task(owner())
    await asyncio.sleep(0.01)
    owning.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await owning

    assert cleaned_up == ["helper ended"]


async def test_a_bridge_whose_task_is_cancelled_still_stops_completely(
    tmp_path: Path, exchange_name: str
) -> None:
    # Embedded with ``async with Bridge(...)`` in a task that is cancelled (a TaskGroup, say),
    # while the broker is down (nothing listens on port 1): stop() must not end at the first
    # helper task still running, leaving the spool locked and the connection attempts going.
    settings = make_settings(
        tmp_path, exchange_name, amqp={"url": "amqp://guest:guest@127.0.0.1:1/"}
    )
    running = asyncio.Event()

    async def embedded() -> None:
        async with Bridge(settings):
            running.set()
            await asyncio.Event().wait()

    with capture_logs() as logs:
        task = asyncio.create_task(embedded())
        await asyncio.wait_for(running.wait(), 15)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    assert [entry["event"] for entry in logs][-1] == "bridge.stopped"
    async with await Spool.open(settings.spool):  # its lock was let go
        pass


async def test_a_stop_asked_for_while_starting_does_not_start_serving_first(
    tmp_path: Path, exchange_name: str
) -> None:
    """Start-up may wait seconds for a broker that does not answer. A SIGTERM meanwhile (a
    rollout, or the supervisor stopping the workers because another could not start) ends it
    there: before, the bridge went on to listen, take deliveries and start reconciliation, and
    only then stopped."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # takes the connection, never answers: a frozen broker

    frozen_broker = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = frozen_broker.sockets[0].getsockname()[1]
    bridge = BridgeProcess(
        tmp_path,
        process_sections(tmp_path, exchange_name, amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/"),
    )
    try:
        await bridge.start(wait_listening=False)
        # Started (its first line is written), not yet listening: the broker holds it 3 s.
        await eventually(lambda: "bridge.signatures_off" in bridge.log(), within=15, every=0.02)
        bridge.send(signal.SIGTERM)
        code = await bridge.wait()
    finally:
        await bridge.stop()
        frozen_broker.close()
        for writer in held:
            writer.close()

    after_the_signal = bridge.log().partition('"bridge.signal"')[2]
    assert code == 0
    assert '"bridge.listening"' not in after_the_signal, after_the_signal
    # Nor did it wait out the 3 s it gives a broker that does not answer.
    assert '"bridge.listening_before_broker"' not in after_the_signal, after_the_signal


async def test_a_stop_that_abandons_confirms_does_not_count_a_failed_forward_against_the_event(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """A broker that goes silent at the moment of a restart: when the grace period runs out,
    the bridge abandons the confirms still due (README, Running it), the forwarder's among
    them. That is the stop doing its job, not a failure of the spooled event: the forwarder,
    still running until the sites are closed, takes it for one, counts a failed attempt
    against the event (``attempts``, the poison-message hint; ``test_spool`` says "being
    stopped is not a failure of the event") and logs ``spool.forward_failed`` ("the bridge is
    stopping", ``retry_in`` 1 s), a warning an operator reads as a broker problem."""
    async with start_proxied_bridge(
        server={"shutdown_timeout": 1.0}, amqp={"publish_timeout": 3.0}
    ) as bridge:
        broker_proxy.hold()  # the link stays up; the broker says nothing more

        async def post(video: str, event_id: str) -> int:
            headers = {**JSON, "KonPro-Event-Id": event_id}
            async with http.post(
                bridge.webhook_url, data=envelope(video), headers=headers
            ) as response:
                return response.status

        assert await post("v-spooled", "evt-spooled") == 202  # its publish timed out
        # The forwarder now publishes it, and waits (up to 60 s) for the confirm.
        await eventually(lambda: "evt-spooled" in bridge.publisher._in_flight)
        live = asyncio.create_task(post("v-live", "evt-live"))  # waits for its confirm too
        await eventually(lambda: "evt-live" in bridge.publisher._in_flight)
        with structlog.testing.capture_logs() as logs:
            await bridge.stop()  # the grace (1 s) runs out before the publish timeout (3 s)
        assert await live == 202
        broker_proxy.release()

    assert seen(logs, "bridge.confirms_abandoned")
    assert seen(logs, "spool.forward_failed") == []
    async with await Spool.open(SpoolSettings(path=tmp_path / "spool")) as spool:
        entries = {entry.delivery.message_id: entry for entry in await spool.peek(10)}
    assert entries["evt-spooled"].attempts == 0  # being stopped is no failure of the event


async def test_a_stop_while_the_broker_reads_nothing_ends_within_its_grace(
    start_proxied_bridge: BridgeFactory,
    broker_proxy: TcpProxy,
    http: aiohttp.ClientSession,
) -> None:
    """RabbitMQ under a memory or disk alarm stops reading from publishing connections. The
    bridge goes on publishing meanwhile (each publish times out and its delivery is spooled,
    202), and what it writes piles up unsent in its socket. A stop then (a rollout, an operator
    restarting a bridge that "only spools") must end within ``server.shutdown_timeout`` plus
    about 2 s (README, Running it): a process manager kills it past its allowance, and the
    supervisor of several workers does (``workers.kill``) after ``shutdown_timeout`` + 5 s. It
    may not wait for the broker to take bytes it will not read: aiormq's close waits to write
    its Connection.Close for up to three heartbeat timeouts (183 s at RabbitMQ's 60 s)."""
    grace = 1.0
    async with start_proxied_bridge(
        server={"shutdown_timeout": grace}, amqp={"publish_timeout": 1.0}
    ) as bridge:
        broker_proxy.hold()  # the link stays up; nothing more reaches the broker
        bodies = [  # 100 kB each, 8 MB in all: a few thousand of KonPro's own deliveries
            envelope(f"v{n:03d}-" + "x" * 100_000) for n in range(80)
        ]

        async def post(body: bytes) -> int:
            async with http.post(bridge.webhook_url, data=body, headers=JSON) as response:
                return response.status

        assert set(await asyncio.gather(*map(post, bodies))) == {202}
        stopping = asyncio.create_task(bridge.stop())
        try:
            # Generous: the README's bound is the grace plus about 2 s.
            done, _ = await asyncio.wait({stopping}, timeout=grace + 14.0)
            assert stopping in done, "the stop still waits for the broker to read its socket"
        finally:
            await broker_proxy.cut()  # what ends a stop still waiting
            await stopping
