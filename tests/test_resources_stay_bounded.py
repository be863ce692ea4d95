"""What a hostile or careless client can make the bridge hold, and for how long, stays bounded,
in a container with a memory limit (256 MiB in the Kubernetes example) and a file descriptor
limit (a soft ``ulimit -n`` of 1024 is common).

Each test runs the bridge as its own process, as an operator runs it (uvloop), and measures that
process: its peak resident memory (``VmHWM``) or its open file descriptors. Each takes a few
seconds; the ones marked ``slow`` send megabytes.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import aiohttp
import pytest

from bridge.config import Settings
from bridge.events import Delivery, body_digest
from bridge.spool import Spool
from tests.support.deliveries import envelope
from tests.support.harness import make_settings, process_sections
from tests.support.private_broker import PrivateBroker
from tests.support.process import BridgeProcess, free_port
from tests.support.waiting import eventually

JSON = {"Content-Type": "application/json"}
MiB = 1024 * 1024


def sections(tmp_path: Path, exchange: str, **server: object) -> dict[str, dict[str, object]]:
    return process_sections(tmp_path, exchange, server=dict(server))


def proc_status(bridge: BridgeProcess, field: str) -> int:
    """A ``/proc/<pid>/status`` field of the bridge process, in bytes (``VmHWM``, ``VmRSS``)."""
    assert bridge.process is not None
    for line in Path(f"/proc/{bridge.process.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(field)


def holds_connection_from(
    bridge: BridgeProcess, client: socket.socket, port: int | None = None
) -> bool:
    """Whether the bridge process still has a file descriptor for its end of ``client``'s
    connection to ``port`` (the main one by default): found by ports in ``/proc/net/tcp``, then
    by socket inode among the process's fds."""
    assert bridge.process is not None
    server_end = f"0100007F:{port or bridge.port:04X}"
    client_end = f"0100007F:{client.getsockname()[1]:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1], fields[2]) == (server_end, client_end):
            inodes.add(f"socket:[{fields[9]}]")
    fd_dir = Path(f"/proc/{bridge.process.pid}/fd")
    held = set()
    for fd in os.listdir(fd_dir):
        try:
            held.add(os.readlink(fd_dir / fd))
        except FileNotFoundError:  # closed meanwhile
            continue
    return bool(inodes & held)


def plain_event(size: int, tag: int = 1) -> bytes:
    """A KonPro envelope of exactly ``size`` bytes whose padding is one long string."""
    head = b'{"event_type":"avatar_video.success","event_data":{"video_id":"v%d"},"pad":"' % tag
    return head + b"x" * (size - len(head) - 2) + b'"}'


def event_of_empty_objects(size: int) -> bytes:
    """A valid KonPro envelope of about ``size`` bytes, padded with an array of empty objects
    (``{}``, three bytes each with the comma), with a ``\\u`` escape in a title: what a JSON
    encoder writes for a title with an accent (``ensure_ascii``)."""
    head = b'{"event_type":"avatar_video.success","event_data":{"title":"caf\\u00e9"},"pad":['
    count = (size - len(head) - 2 + 1) // 3
    return head + b",".join([b"{}"] * count) + b"]}"


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with http.post(url, data=body, headers=JSON) as response:
        return response.status


# --- Checking a body costs what the README says ----------------------------------------------


async def test_checking_a_body_costs_no_more_memory_than_the_readme_says(
    tmp_path: Path, exchange_name: str
) -> None:
    """Checking a body costs what the README says, whatever it holds: the envelope is read
    without building the body's tree. A megabyte of empty objects, with a ``\\u`` escape in a
    title, cost 75 times its size when it was built (and blocked the loop), gzipped 1 KiB on
    the wire; without a webhook secret anybody may send one."""
    async with (
        BridgeProcess(tmp_path, sections(tmp_path, exchange_name)) as bridge,
        aiohttp.ClientSession() as http,
    ):
        for _ in range(2):  # the first large deliveries settle the heap
            assert await post(http, bridge.webhook_url, plain_event(MiB)) == 200
        before = proc_status(bridge, "VmHWM")
        crafted = event_of_empty_objects(MiB)
        assert len(crafted) <= MiB  # within server.max_body_bytes
        assert await post(http, bridge.webhook_url, crafted) == 200
        grew = proc_status(bridge, "VmHWM") - before

    # 2.5 times the body, and a generous allowance for the heap's own slack.
    assert grew <= 2.5 * MiB + 6 * MiB, f"peak RSS grew {grew / MiB:.0f} MiB for 1 MiB"


@pytest.mark.slow
async def test_a_body_sent_in_tiny_pieces_costs_no_more_than_the_readme_says(
    tmp_path: Path, exchange_name: str
) -> None:
    """A body trickled a byte at a time costs what it counts against
    ``server.max_bytes_in_flight``, not some forty bytes of objects for each."""
    async with (
        BridgeProcess(tmp_path, sections(tmp_path, exchange_name, body_timeout=30.0)) as bridge,
        aiohttp.ClientSession() as http,
    ):
        connections = []
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", bridge.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(
                b"POST /webhooks/konpro HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"
            )
            connections.append(sock)

        def trickle(seconds: float) -> None:
            """A byte on each connection in turn, as fast as they go."""
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for sock in connections:
                    sock.send(b" ")

        try:
            await asyncio.sleep(0.5)  # each handler is waiting for its body
            before = proc_status(bridge, "VmRSS")
            await asyncio.to_thread(trickle, 6.0)
            await asyncio.sleep(0.3)
            async with http.get(bridge.url + "/status") as response:
                held = (await response.json())["intake"]["bytes_in_flight"]
            grew = proc_status(bridge, "VmRSS") - before
        finally:
            for sock in connections:
                sock.close()

    assert held > 500_000  # the bytes arrived, and were counted (with the header fields)
    assert grew <= 2.5 * held + 2 * MiB, (
        f"RSS grew {grew / MiB:.1f} MiB while {held / 1000:.0f} kB were counted in flight"
    )


# --- Connections: how long a hostile one is held, and how many there may be ----------------


async def test_a_client_that_never_reads_its_answers_is_disconnected(
    tmp_path: Path, exchange_name: str
) -> None:
    """A client that pipelines requests and reads none of the answers is dropped once it has
    taken nothing for ``server.keepalive_timeout``: else it holds a file descriptor, and what
    aiohttp parsed ahead, for as long as it likes."""
    async with BridgeProcess(
        tmp_path, sections(tmp_path, exchange_name, keepalive_timeout=2.0, body_timeout=2.0)
    ) as bridge:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", bridge.port))
        try:
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
            with suppress(TimeoutError):
                await eventually(lambda: holds_connection_from(bridge, client))
            held_at_first = holds_connection_from(bridge, client)
            with suppress(TimeoutError):  # keepalive_timeout is 2 s
                await eventually(lambda: not holds_connection_from(bridge, client), within=15)
            still_held = holds_connection_from(bridge, client)
        finally:
            client.close()

    assert held_at_first  # the probe finds the connection (answers are still being written)
    assert not still_held, "the bridge still holds the connection of a client that reads nothing"


class LimitedBridgeProcess(BridgeProcess):
    """The bridge with ``RLIMIT_NOFILE`` set to ``(soft, hard)``, as a container runtime may
    start it (containerd since 1.8/2.0 and Docker since 25 leave systemd's 1024 soft, 524288
    hard, expecting software that needs more to raise its own soft limit)."""

    def __init__(
        self, workdir: Path, sections: dict[str, dict[str, object]], nofile: tuple[int, int]
    ) -> None:
        super().__init__(workdir, sections)
        self.nofile = nofile

    async def start(self, *, wait_ready: bool = True, wait_listening: bool = True) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith("KONPRO_BRIDGE_")}
        nofile = self.nofile
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge", "run", "--config", str(self.config),
                stdout=log, stderr=log, env=clean,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile),
            )  # fmt: skip
        await self._wait_for("/readyz" if wait_ready else "/healthz")


@contextmanager
def idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send nothing (each held by the bridge for keepalive_timeout)."""
    socks = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port)))
        yield socks
    finally:
        for sock in socks:
            sock.close()


async def test_deliveries_are_served_past_the_soft_file_descriptor_limit(
    tmp_path: Path, exchange_name: str
) -> None:
    """Containers start programs with a soft limit of 1,024 open files, expecting those that
    need more to raise it to the hard limit: the bridge does, so that idle connections do not
    make every new one (KonPro's deliveries, its OPTIONS check) fail."""
    async with LimitedBridgeProcess(
        tmp_path, sections(tmp_path, exchange_name), nofile=(64, 4096)
    ) as bridge:
        with idle_connections(bridge.port, 60) as idle:

            def taken() -> int:
                return sum(holds_connection_from(bridge, sock) for sock in idle)

            try:
                await eventually(lambda: taken() == len(idle))  # all of them accepted, held
            except TimeoutError:
                pytest.fail(f"the bridge took {taken()} of {len(idle)} idle connections")
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                try:
                    status = await post(http, bridge.webhook_url, plain_event(300))
                except aiohttp.ClientError as exc:
                    status = exc  # type: ignore[assignment]

    assert status == 200, f"a KonPro delivery got {status!r} with 60 idle connections open"


async def test_the_metrics_port_closes_idle_connections_as_the_main_port_does(
    tmp_path: Path, exchange_name: str
) -> None:
    """The metrics port serves as the main one does: idle connections closed after
    ``server.keepalive_timeout``, not kept an hour taking file descriptors."""
    metrics_port = free_port()
    settings = sections(tmp_path, exchange_name, keepalive_timeout=0.5, metrics_port=metrics_port)
    async with BridgeProcess(tmp_path, settings) as bridge:
        main = socket.create_connection(("127.0.0.1", bridge.port))
        metrics = socket.create_connection(("127.0.0.1", metrics_port))
        try:
            with suppress(TimeoutError):
                await eventually(lambda: holds_connection_from(bridge, metrics, metrics_port))
            held_at_first = holds_connection_from(bridge, metrics, metrics_port)
            with suppress(TimeoutError):  # keepalive_timeout is 0.5 s
                await eventually(
                    lambda: (
                        not holds_connection_from(bridge, main)
                        and not holds_connection_from(bridge, metrics, metrics_port)
                    ),
                    within=15,
                )
            main_held = holds_connection_from(bridge, main)
            metrics_held = holds_connection_from(bridge, metrics, metrics_port)
        finally:
            main.close()
            metrics.close()

    assert held_at_first  # the probe finds the connection
    assert not main_held  # the main port closed its idle connection
    assert not metrics_held, "the metrics port still holds a connection idle for 15 s"


# --- Forwarding the spool --------------------------------------------------------------------


async def spool_events(settings: Settings, count: int, size: int) -> None:
    """``count`` distinct events of ``size`` bytes, committed to the spool as the bridge does."""
    spool = await Spool.open(settings.spool)
    try:
        await asyncio.gather(
            *(
                spool.append(Delivery("avatar_video.success", body, body_digest(body)))
                for body in (plain_event(size, tag=i) for i in range(count))
            )
        )
    finally:
        await spool.close()


async def peak_rss_once_drained(bridge: BridgeProcess) -> int:
    async with aiohttp.ClientSession() as http, asyncio.timeout(60):
        while True:
            async with http.get(bridge.url + "/status") as response:
                if (await response.json())["spool"]["depth"] == 0:
                    return proc_status(bridge, "VmHWM")
            await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_forwarding_the_spool_holds_a_bounded_number_of_bytes(
    tmp_path: Path, exchange_name: str
) -> None:
    """Forwarding reads the spool in batches bounded by bytes as well as by count: a hundred
    spooled events of 16 MiB read at once would be more than a container has."""
    idle_dir, draining_dir = tmp_path / "idle", tmp_path / "draining"
    idle_dir.mkdir()
    draining_dir.mkdir()
    async with BridgeProcess(idle_dir, sections(idle_dir, exchange_name)) as idle:
        await peak_rss_once_drained(idle)
        await asyncio.sleep(0.5)
        idle_peak = proc_status(idle, "VmHWM")

    config = sections(draining_dir, exchange_name)
    await spool_events(make_settings(draining_dir, exchange_name), count=100, size=MiB)
    async with BridgeProcess(draining_dir, config) as bridge:
        drained_peak = await peak_rss_once_drained(bridge)

    grew = drained_peak - idle_peak
    # One batch of 4 MiB, and the heap's slack: not a hundred megabytes read at once.
    assert grew <= 40 * MiB, f"forwarding 100 MiB of spooled events took {grew / MiB:.0f} MiB more"


# --- A stop, with a client that reads nothing ------------------------------------------------


def pipeline_unread(port: int, requests: int = 1000) -> socket.socket:
    """A connection that sends ``requests`` GETs of /metrics at once and reads none of the
    answers: they fill the socket's buffers, and the handler waits to write."""
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
    return client


async def stop(bridge: BridgeProcess) -> int | None:
    """SIGTERM, then the exit code; the bound only turns a hang into a failure."""
    bridge.send(signal.SIGTERM)
    return await bridge.wait(within=60.0)


@pytest.mark.parametrize("port", ["webhooks", "metrics"])
async def test_at_the_end_of_the_grace_a_client_that_reads_nothing_is_dropped(
    port: str, tmp_path: Path, exchange_name: str
) -> None:
    """At the end of a stop's grace, a connection whose client has not taken its answer is
    dropped, on either port: aiohttp would otherwise wait for it a second grace period (on the
    metrics port, with aiohttp's own default, 60 s twice)."""
    metrics_port = free_port() if port == "metrics" else 0  # else /metrics on the main port
    settings = sections(tmp_path, exchange_name, shutdown_timeout=2.0, metrics_port=metrics_port)
    bridge = BridgeProcess(tmp_path, settings)
    await bridge.start()
    client = pipeline_unread(metrics_port or bridge.port)
    try:
        await asyncio.sleep(1.0)  # the handler is waiting to write
        code = await stop(bridge)
    finally:
        client.close()
        await bridge.stop()

    assert code == 0
    assert '"http.stalled_reader_dropped"' in bridge.log()


def resident_bytes(bridge: BridgeProcess) -> int:
    assert bridge.process is not None
    for line in Path(f"/proc/{bridge.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("VmRSS")


async def test_deliveries_during_a_broker_memory_alarm_do_not_pile_up_in_memory(
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    http: aiohttp.ClientSession,
) -> None:
    """Under a memory or disk alarm RabbitMQ blocks publishers: it stops reading their
    sockets, and the link stays up. The bridge answers each delivery 202 from the spool once
    its publish times out (README, Troubleshooting: "deliveries are spooled meanwhile"), but
    the frames of every one of those publishes stay in its socket's send buffer, which grows
    without bound for as long as the alarm lasts: every body KonPro sends meanwhile, twice
    over with the forwarder's attempts. ``server.max_bytes_in_flight`` bounds what the bridge
    holds for a delivery (README, Floods); past the answer, nothing does, and an alarm of an
    hour at KonPro's rate is an OOM kill. (And once the alarm ends, all of it reaches the
    broker, a second copy of every event spooled meanwhile.)"""
    mib = 2**20
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp_url=private_broker.url,
        amqp={"publish_timeout": 0.5},
        server={"max_body_bytes": 262_144, "max_bytes_in_flight": 4 * mib},
    )
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start()

    async def post(body: bytes) -> int:
        async with http.post(bridge.webhook_url, data=body, headers=JSON) as response:
            return response.status

    statuses: set[int] = set()
    try:
        before = resident_bytes(bridge)
        private_broker.raise_memory_alarm()
        for batch in range(20):  # 40 MB in all, 2 MB at a time: within max_bytes_in_flight
            bodies = [envelope(f"v{batch}-{n:02d}-" + "x" * 100_000) for n in range(20)]
            statuses |= set(await asyncio.gather(*map(post, bodies)))
        grew = resident_bytes(bridge) - before
        said = bridge.log()
        private_broker.clear_memory_alarm()
        await eventually(lambda: '"amqp.broker_reading_again"' in bridge.log(), within=30)
    finally:
        private_broker.clear_memory_alarm()
        await bridge.stop()
    assert statuses == {202}  # the alarm held every publish: each one spooled
    # The README's cost of what is in flight (2.5 times max_bytes_in_flight), and room to spare.
    assert grew <= 2.5 * 4 * mib + 10 * mib, f"RSS grew {grew / mib:.0f} MiB for 40 MB spooled"
    assert '"amqp.broker_not_reading"' in said


READS_PER_TURN = 64


async def test_a_client_that_reads_its_answers_steadily_is_not_dropped(
    tmp_path: Path, exchange_name: str
) -> None:
    """Only a client that has taken *nothing* for ``server.keepalive_timeout`` is dropped: one
    that keeps reading the answers to requests it pipelined (a proxy, a scraper) keeps its
    connection, since each sweep sees it took some.

    The bridge sees what a client took only through the transport's buffer, which moves when
    the kernel's send buffer has a third or so free: a client reading slower than that per
    ``keepalive_timeout`` (here, on loopback, about 400 KB/s against 2 s) is dropped as if it
    read nothing. This one reads about 1 MB/s."""
    settings = sections(tmp_path, exchange_name, keepalive_timeout=2.0, body_timeout=2.0)
    async with BridgeProcess(tmp_path, settings) as bridge:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", bridge.port))
        client.setblocking(False)
        received = 0
        try:
            client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
            loop = asyncio.get_running_loop()
            for _ in range(24):  # 6 s, three times keepalive_timeout: 256 KiB every 0.25 s
                await asyncio.sleep(0.25)
                for _ in range(READS_PER_TURN):
                    chunk = await asyncio.wait_for(loop.sock_recv(client, 4096), 5)
                    assert chunk, f"the bridge closed the connection after {received} bytes"
                    received += len(chunk)
            still_held = holds_connection_from(bridge, client)
        finally:
            client.close()
        log = bridge.log()

    assert still_held, [line for line in log.splitlines() if "http." in line]
    assert "http.stalled_reader_dropped" not in log
