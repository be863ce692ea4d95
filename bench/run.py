"""Side-by-side benchmark: ``python -m bench.run [--duration S] [--rounds N] [--only NAME,...]``.

Every contender runs against the local RabbitMQ, into one durable queue bound ``#`` to a durable
topic exchange, with persistent messages and publisher confirms. Contenders alternate order from
round to round; each round starts a contender afresh (start-up time, idle memory), warms it up,
loads it with wrk at full concurrency while firing OPTIONS requests at it, then at low concurrency
for latency. After every load the queue depth is read with a passive declare and compared with
the 2xx count: each 2xx must be a stored message. Medians over rounds go into a markdown table on
stdout and, with every raw sample, into bench/results/<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from bench.contenders import CONTENDERS, PYTHON, Contender, Slots, contender_pythonpath
from bench.procstat import (
    TICK,
    machine_cpu_ticks,
    pids_named,
    process_cpu_seconds,
    tree_cpu_seconds,
    tree_memory,
)

HERE = Path(__file__).resolve().parent
LUA = HERE / "post_events.lua"
MIB = 1024 * 1024
JSON_MARK = "BENCH_JSON "

Json = dict[str, Any]
FAILURES = (
    RuntimeError,
    OSError,
    TimeoutError,
    ValueError,
    KeyError,
    aiohttp.ClientError,
    aio_pika.exceptions.AMQPError,
)
"""What a contender round may fail with; the round is reported failed and the run goes on."""


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- wrk --------------------------------------------------------------------------------------


def ensure_wrk(install: bool = True) -> str | None:
    """Path to wrk; installs the Debian package when missing and we may. None if unavailable."""
    found = shutil.which("wrk")
    if found or not install:
        return found
    apt = shutil.which("apt-get")
    if apt and os.geteuid() == 0:
        log("wrk not found; installing the Debian package: apt-get install -y wrk")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "wrk"]):
            done = subprocess_run(cmd, env)
            if done != 0:
                break
        found = shutil.which("wrk")
    if not found:
        log(
            "wrk is required: install it with `apt-get update && apt-get install -y wrk` "
            "(Debian/Ubuntu) or `brew install wrk`"
        )
    return found


def subprocess_run(cmd: list[str], env: dict[str, str]) -> int:
    import subprocess  # noqa: PLC0415 - only needed for the one-off install

    return subprocess.run(  # noqa: S603 - fixed argv, no shell
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
    ).returncode


def parse_bench_json(output: str) -> Json:
    for line in output.splitlines():
        if line.startswith(JSON_MARK):
            result: Json = json.loads(line[len(JSON_MARK) :])
            return result
    raise RuntimeError(f"no {JSON_MARK.strip()} line in output:\n{output[-2000:]}")


async def run_wrk(
    wrk: str, url: str, *, connections: int, threads: int, duration: int, run_id: str
) -> Json:
    cmd = [
        wrk,
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "BENCH_RUN_ID": run_id},
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited {proc.returncode}:\n{text[-2000:]}")
    return parse_bench_json(text)


# --- OPTIONS probe ----------------------------------------------------------------------------


@dataclass
class Probe:
    latencies_us: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: int = 0

    def summary(self) -> Json:
        values = sorted(self.latencies_us)
        return {
            "count": len(values),
            "failures": self.failures,
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "p50_us": round(percentile(values, 50)),
            "p99_us": round(percentile(values, 99)),
            "max_us": round(values[-1]) if values else 0,
        }


async def options_probe(url: str, rate: float, stop: asyncio.Event, probe: Probe) -> None:
    """Fire OPTIONS at ``url`` at ``rate`` per second, one at a time, until ``stop`` is set."""
    interval = 1.0 / rate
    timeout = aiohttp.ClientTimeout(total=10)
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                async with session.options(url) as response:
                    await response.read()
                probe.latencies_us.append((time.perf_counter() - started) * 1e6)
                probe.statuses[response.status] = probe.statuses.get(response.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                probe.failures += 1
            delay = interval - (time.perf_counter() - started)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(delay, 0.0))


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


# --- contender processes ----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class MemorySampler:
    pid: int
    peak_rss: int = 0
    peak_pss: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)

    def sample(self) -> None:
        memory = tree_memory(self.pid)
        self.peak_rss = max(self.peak_rss, memory.rss)
        self.peak_pss = max(self.peak_pss, memory.pss)


@contextlib.asynccontextmanager
async def spawned(
    contender: Contender, slots: Slots, log_path: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start the contender in its own session; stop its whole process group on the way out."""
    argv = [slots.fill(part) for part in contender.command]
    env = {**os.environ, **{k: slots.fill(v) for k, v in contender.env.items()}}
    # bench.* is found through PYTHONPATH (after any the caller set); the working directory is the
    # round's temp dir, so that `python -m bridge` resolves like an installed daemon would.
    env["PYTHONPATH"] = contender_pythonpath()
    with log_path.open("wb") as log_file:
        stdout = asyncio.subprocess.PIPE if contender.kind == "publish" else log_file
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=log_path.parent,
            env=env,
            stdout=stdout,
            stderr=log_file,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            await stop_process(proc)


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            log(f"pid {proc.pid} ignored SIGTERM for 15 s; killing its process group")
    # Whatever is left of the group (e.g. a stuck worker) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()


async def wait_ready(
    url: str, proc: asyncio.subprocess.Process, within: float, log_path: Path
) -> float:
    """Seconds from now until ``url`` answers 200; raises if the process dies or time runs out."""
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
        while time.perf_counter() - started < within:
            if proc.returncode is not None:
                raise RuntimeError(f"exited {proc.returncode} before ready; log:\n{tail(log_path)}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.01)
    raise RuntimeError(f"not ready after {within} s; log:\n{tail(log_path)}")


def tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return "<no log>"


async def quiesce(threshold: float = 0.2, window: float = 0.5, within: float = 20.0) -> Json:
    """Wait until the whole machine is quiet: two windows in a row under ``threshold`` busy.

    After a contender's round the broker still works (message store clean-up after a purge,
    fsyncs); without this the next contender would pay for it. Gives up after ``within`` s.
    """
    started = time.perf_counter()
    quiet = 0
    busy_fraction = 1.0
    if within <= 0:
        return {"waited_s": 0.0, "busy": None, "quiet": None}
    while time.perf_counter() - started < within:
        busy0, total0 = machine_cpu_ticks()
        await asyncio.sleep(window)
        busy1, total1 = machine_cpu_ticks()
        busy_fraction = (busy1 - busy0) / max(1, total1 - total0)
        quiet = quiet + 1 if busy_fraction < threshold else 0
        if quiet >= 2:
            break
    return {
        "waited_s": round(time.perf_counter() - started, 2),
        "busy": round(busy_fraction, 3),
        "quiet": quiet >= 2,
    }


@dataclass
class CpuSnapshot:
    """Where the machine's CPU went between two snapshots: us, the broker, everyone else.

    "Us" is the harness, wrk and the contender (live descendants plus reaped children); the
    broker is every beam.smp process (RabbitMQ may also be serving others); the rest is foreign
    load that competes with the measurement, e.g. other test suites on a shared machine.
    """

    machine_busy: float
    ours: float
    broker: float
    at: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        busy, _ = machine_cpu_ticks()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours = tree_cpu_seconds(os.getpid()) + children.ru_utime + children.ru_stime
        broker = sum(process_cpu_seconds(pid) for pid in pids_named("beam.smp"))
        return cls(busy / TICK, ours, broker, time.perf_counter())

    def since(self, before: CpuSnapshot) -> Json:
        """Average cores used by each party over the interval."""
        elapsed = max(self.at - before.at, 1e-9)
        machine = (self.machine_busy - before.machine_busy) / elapsed
        ours = (self.ours - before.ours) / elapsed
        broker = (self.broker - before.broker) / elapsed
        return {
            "machine_cores": round(machine, 3),
            "ours_cores": round(ours, 3),
            "broker_cores": round(broker, 3),
            "foreign_cores": round(max(0.0, machine - ours - broker), 3),
        }


# --- the broker side --------------------------------------------------------------------------


@dataclass
class Broker:
    """The harness's own connection, and the exchange and queue of the round being measured.

    Every contender round gets a fresh exchange (durable topic, with the contender's declared
    arguments, so that its own declaration is equivalent) and a fresh durable queue bound ``#``;
    both, and whatever else the contender declares next to them, are deleted after the round.
    """

    url: str
    exchange_name: str = ""
    queue_name: str = ""
    connection: aio_pika.abc.AbstractConnection | None = None
    channel: aio_pika.abc.AbstractChannel | None = None
    leftovers: list[tuple[str, str]] = field(default_factory=list)
    """("exchange" | "queue", name) still to delete."""

    async def connect(self) -> None:
        # A plain (not robust) connection on purpose: aio-pika's RobustChannel answers a passive
        # declare of a queue it already knows from its cache, with a stale message count.
        self.connection = await aio_pika.connect(self.url)
        self.channel = await self.connection.channel()

    async def prepare(self, contender: Contender, slots: Slots) -> None:
        assert self.connection is not None
        if self.channel is None or self.channel.is_closed:  # a channel error closed it
            self.channel = await self.connection.channel()
        self.exchange_name, self.queue_name = slots.exchange, f"{slots.exchange}.q"
        self.leftovers += [("queue", self.queue_name), ("exchange", self.exchange_name)]
        self.leftovers += [("queue", slots.fill(q)) for q in contender.also_queues]
        self.leftovers += [("exchange", slots.fill(x)) for x in contender.also_exchanges]
        exchange = await self.channel.declare_exchange(
            self.exchange_name,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={k: slots.fill(v) for k, v in contender.exchange_arguments.items()} or None,
        )
        queue = await self.channel.declare_queue(self.queue_name, durable=True)
        await queue.bind(exchange, routing_key="#")

    async def cleanup(self) -> None:
        """Delete every queue and exchange made for (or by) the rounds so far."""
        if self.connection is None or self.connection.is_closed:
            return
        channel = await self.connection.channel()
        while self.leftovers:
            kind, name = self.leftovers.pop()
            try:
                if kind == "queue":
                    await channel.queue_delete(name)
                else:
                    await channel.exchange_delete(name)
            except aio_pika.exceptions.AMQPError as exc:
                log(f"could not delete {kind} {name}: {exc}")
                channel = await self.connection.channel()
        await channel.close()

    async def close(self) -> None:
        await self.cleanup()
        if self.connection is not None:
            await self.connection.close()

    def server_version(self) -> str:
        assert self.connection is not None
        props = self.connection.transport.connection.server_properties  # type: ignore[union-attr]

        def text(key: str) -> str:
            value = props.get(key, "?")
            return value.decode() if isinstance(value, bytes) else str(value)

        return f"{text('product')} {text('version')}"

    async def depth(self) -> int:
        """The queue's message count, from a fresh passive declare."""
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.queue_name, passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)

    async def settled_depth(self, within: float = 15.0) -> int:
        """Queue depth once it stopped changing (publishes in flight at wrk's cut-off land)."""
        deadline = time.perf_counter() + within
        last = await self.depth()
        while time.perf_counter() < deadline:
            await asyncio.sleep(0.3)
            now = await self.depth()
            if now == last:
                return now
            last = now
        return last

    async def purge(self) -> None:
        assert self.channel is not None
        queue = await self.channel.declare_queue(self.queue_name, passive=True)
        await queue.purge()


async def account(
    broker: Broker, contender: Contender, result: Json, slack: int, settle: float
) -> Json:
    """Compare the stored messages with the 2xx answers, then purge. Adds ``result["stored"]``.

    Every 2xx must be a stored message (stored >= ok). A few more may be stored than answered:
    requests published but still in flight when wrk stopped (at most one per connection).
    """
    stored = await broker.settled_depth()
    await broker.purge()
    # The broker's clean-up after the purge is not to be billed to the next load.
    result["quiesce_after"] = await quiesce(within=settle)
    ok = int(result["ok"])
    if contender.publishes:
        lost = max(0, ok - stored)
        extra = max(0, stored - ok)
        accounted = lost == 0
        if not accounted:
            log(
                f"!!! MISMATCH {contender.name}: {ok} answered 2xx but only {stored} stored "
                f"({lost} LOST)"
            )
        elif extra > slack:
            log(
                f"!!! {contender.name}: {extra} more stored than 2xx (more than the {slack} "
                "that can be in flight at cut-off)"
            )
    else:
        lost, extra, accounted = 0, stored, stored == 0
    result.update(stored=stored, lost=lost, extra_stored=extra, accounted=accounted)
    return result


# --- one contender, one round -----------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    duration: int
    rounds: int
    connections: int
    latency_connections: int
    threads: int
    warmup: int
    inflight: int
    options_rate: float
    amqp_url: str
    ready_timeout: float
    settle: float


async def run_round(
    contender: Contender, opts: Options, broker: Broker, *, wrk: str, workdir: Path, tag: str
) -> Json:
    if contender.kind == "publish":
        return await run_publish_round(contender, opts, broker, workdir, tag)

    slots = make_slots(contender, opts, workdir=workdir, tag=tag, inflight=opts.inflight)
    await broker.prepare(contender, slots)
    log_path = workdir / f"{tag}.log"
    record: Json = {}
    spawned_at = time.perf_counter()
    async with spawned(contender, slots, log_path) as proc:
        ready_url = slots.fill(contender.ready_url)
        post_url = slots.fill(contender.post_url)
        await wait_ready(ready_url, proc, opts.ready_timeout, log_path)
        record["startup_s"] = round(time.perf_counter() - spawned_at, 4)
        sampler = MemorySampler(proc.pid)
        await asyncio.sleep(1.0)
        idle = tree_memory(proc.pid)
        record.update(idle_rss=idle.rss, idle_pss=idle.pss, processes=idle.processes)
        stop_sampling = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop_sampling))

        async def load_with_wrk(connections: int, duration: int, phase: str) -> Json:
            return await run_wrk(
                wrk,
                post_url,
                connections=connections,
                threads=opts.threads,
                duration=duration,
                run_id=f"{tag}-{phase}",
            )

        try:
            if opts.warmup > 0:
                warm = await load_with_wrk(opts.connections, opts.warmup, "warm")
                record["warmup"] = await account(
                    broker, contender, warm, opts.connections, opts.settle
                )

            stop_probe = asyncio.Event()
            probe = Probe()
            probing = asyncio.create_task(
                options_probe(post_url, opts.options_rate, stop_probe, probe)
            )
            cpu_before = tree_cpu_seconds(proc.pid)
            machine_before = CpuSnapshot.take()
            try:
                load = await load_with_wrk(opts.connections, opts.duration, "load")
            finally:
                stop_probe.set()
                await probing
            load["cpu_s"] = round(tree_cpu_seconds(proc.pid) - cpu_before, 3)
            load["machine"] = CpuSnapshot.take().since(machine_before)
            load["options"] = probe.summary()
            record["load"] = await account(broker, contender, load, opts.connections, opts.settle)

            latency = await load_with_wrk(opts.latency_connections, opts.duration, "lat")
            record["latency"] = await account(
                broker, contender, latency, opts.latency_connections, opts.settle
            )
        finally:
            stop_sampling.set()
            await sampling
        if proc.returncode is not None:
            raise RuntimeError(f"exited {proc.returncode} during the run:\n{tail(log_path)}")
    record.update(peak_rss=sampler.peak_rss, peak_pss=sampler.peak_pss)
    record["log_bytes"] = log_path.stat().st_size
    return record


async def run_publish_round(
    contender: Contender, opts: Options, broker: Broker, workdir: Path, tag: str
) -> Json:
    record: Json = {"startup_s": None, "idle_rss": None, "idle_pss": None}
    peak_rss = peak_pss = 0
    phases = [("load", opts.inflight), ("latency", opts.latency_connections)]
    for phase, inflight in phases:
        slots = make_slots(
            contender, opts, workdir=workdir, tag=f"{tag}-{phase}", inflight=inflight
        )
        await broker.prepare(contender, slots)
        log_path = workdir / f"{tag}-{phase}.log"
        machine_before = CpuSnapshot.take()
        async with spawned(contender, slots, log_path) as proc:
            sampler = MemorySampler(proc.pid)
            stop = asyncio.Event()
            sampling = asyncio.create_task(sampler.run(stop))
            try:
                assert proc.stdout is not None
                out = await asyncio.wait_for(proc.stdout.read(), opts.duration + 60)
                await proc.wait()
            finally:
                stop.set()
                await sampling
            if proc.returncode != 0:
                raise RuntimeError(f"exited {proc.returncode}:\n{tail(log_path)}")
        result = parse_bench_json(out.decode(errors="replace"))
        result["inflight"] = inflight
        result["machine"] = CpuSnapshot.take().since(machine_before)
        record[phase] = await account(broker, contender, result, 0, opts.settle)
        peak_rss, peak_pss = max(peak_rss, sampler.peak_rss), max(peak_pss, sampler.peak_pss)
    record.update(peak_rss=peak_rss, peak_pss=peak_pss)
    return record


def make_slots(
    contender: Contender,
    opts: Options,
    *,
    workdir: Path,
    tag: str,
    inflight: int,
) -> Slots:
    """Fill in the per-run values and write the contender's config file, if it has one."""
    spool = workdir / f"{tag}-spool"
    spool.mkdir(exist_ok=True)
    slots = Slots(
        python=PYTHON,
        port=free_port(),
        amqp_url=opts.amqp_url,
        exchange=f"bench.{tag}",
        config=str(workdir / f"{tag}.toml"),
        spool=str(spool),
        inflight=inflight,
        duration=opts.duration,
        run_id=tag,
    )
    if contender.config_template is not None:
        Path(slots.config).write_text(slots.fill(contender.config_template))
    return slots


# --- aggregation and report -------------------------------------------------------------------


def rate(phase: Json | None) -> float | None:
    if not phase:
        return None
    return float(phase["ok"]) / (float(phase["duration_us"]) / 1e6)


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(rounds: list[Json]) -> Json:
    def pick(*path: str) -> list[float | None]:
        out: list[float | None] = []
        for record in rounds:
            node: Any = record
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            out.append(float(node) if isinstance(node, int | float) else None)
        return out

    rates = [rate(r.get("load")) for r in rounds]
    present_rates = [r for r in rates if r is not None]
    return {
        "rounds": len(rounds),
        "rps": median(rates),
        "rps_min": min(present_rates) if present_rates else None,
        "rps_max": max(present_rates) if present_rates else None,
        "cpu_us_per_req": median(
            float(r["load"]["cpu_s"]) / int(r["load"]["ok"]) * 1e6
            if r.get("load", {}).get("cpu_s") is not None and r["load"]["ok"]
            else None
            for r in rounds
        ),
        "foreign_cores": median(pick("load", "machine", "foreign_cores")),
        "foreign_cores_max": max(
            (v for v in pick("load", "machine", "foreign_cores") if v is not None), default=None
        ),
        "broker_cores": median(pick("load", "machine", "broker_cores")),
        "load_p50_us": median(pick("load", "latency_us", "p50")),
        "load_p99_us": median(pick("load", "latency_us", "p99")),
        "lat_rps": median(rate(r.get("latency")) for r in rounds),
        "lat_p50_us": median(pick("latency", "latency_us", "p50")),
        "lat_p99_us": median(pick("latency", "latency_us", "p99")),
        "options_p99_us": median(pick("load", "options", "p99_us")),
        "options_count": sum(int(v or 0) for v in pick("load", "options", "count")),
        "peak_rss": median(pick("peak_rss")),
        "peak_pss": median(pick("peak_pss")),
        "idle_rss": median(pick("idle_rss")),
        "idle_pss": median(pick("idle_pss")),
        "startup_s": median(pick("startup_s")),
        "ok_total": sum(
            int(r[p]["ok"]) for r in rounds for p in ("warmup", "load", "latency") if p in r
        ),
        "lost_total": sum(
            int(r[p]["lost"]) for r in rounds for p in ("warmup", "load", "latency") if p in r
        ),
        "non2xx_total": sum(
            int(r[p]["non2xx"]) for r in rounds for p in ("warmup", "load", "latency") if p in r
        ),
        "socket_errors_total": sum(
            sum(int(v) for k, v in r[p]["errors"].items() if k != "status")
            for r in rounds
            for p in ("warmup", "load", "latency")
            if p in r
        ),
        "accounted": all(
            r[p]["accounted"] for r in rounds for p in ("warmup", "load", "latency") if p in r
        ),
    }


def ratios(summary: dict[str, Json], reference: str) -> Json:
    ref = summary.get(reference)
    out: Json = {}
    if not ref:
        return out
    for name, other in summary.items():
        if name == reference:
            continue
        entry: Json = {}
        if ref["rps"] and other["rps"]:
            entry["rps"] = ref["rps"] / other["rps"]
        if ref["lat_p99_us"] and other["lat_p99_us"]:
            entry["lat_p99"] = ref["lat_p99_us"] / other["lat_p99_us"]
        if ref["cpu_us_per_req"] and other["cpu_us_per_req"]:
            entry["cpu_per_req"] = ref["cpu_us_per_req"] / other["cpu_us_per_req"]
        if ref["peak_rss"] and other["peak_rss"]:
            entry["peak_rss"] = ref["peak_rss"] / other["peak_rss"]
        out[name] = entry
    return out


def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value / scale:,.{digits}f}"


def markdown(report: Json) -> str:
    summary: dict[str, Json] = report["summary"]
    opts = report["options"]
    lines = [
        f"## konpro-bridge benchmark ({report['started']}, {report['machine']['cpus']} CPUs, "
        f"{report['machine']['broker']}, everything on one machine)",
        "",
        f"{opts['rounds']} rounds, alternating order, medians; load = {opts['connections']} "
        f"connections x {opts['duration']} s (ceiling_publish: {opts['inflight']} in flight); "
        f"latency = {opts['latency_connections']} connections (ceiling_publish: "
        f"{opts['latency_connections']} in flight). Durable queue, persistent messages, "
        "publisher confirms.",
        "",
        "| contender | confirmed req/s (min-max) | CPU µs/req | broker cores | foreign cores "
        "(max) | p50 / p99 ms @load | p50 / p99 ms "
        f"@{opts['latency_connections']}c | OPTIONS p99 ms @load | peak RSS MiB (PSS) | "
        "idle RSS MiB (PSS) | start-up s | 2xx stored? |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        stored = (
            "n/a (no AMQP)"
            if not report["contenders"][name]["publishes"]
            else (
                f"yes ({s['ok_total']:,})" if s["accounted"] else f"**NO: {s['lost_total']} lost**"
            )
        )
        if s["non2xx_total"] or s["socket_errors_total"]:
            stored += f"; {s['non2xx_total']} non-2xx, {s['socket_errors_total']} socket errors"
        lines.append(
            f"| {name} | {fmt(s['rps'], digits=0)} ({fmt(s['rps_min'], digits=0)}-"
            f"{fmt(s['rps_max'], digits=0)}) "
            f"| {fmt(s['cpu_us_per_req'], digits=0)} "
            f"| {fmt(s['broker_cores'], digits=2)} "
            f"| {fmt(s['foreign_cores'], digits=2)} ({fmt(s['foreign_cores_max'], digits=2)}) "
            f"| {fmt(s['load_p50_us'], 1000, 2)} / {fmt(s['load_p99_us'], 1000, 2)} "
            f"| {fmt(s['lat_p50_us'], 1000, 2)} / {fmt(s['lat_p99_us'], 1000, 2)} "
            f"| {fmt(s['options_p99_us'], 1000, 2)} "
            f"| {fmt(s['peak_rss'], MIB)} ({fmt(s['peak_pss'], MIB)}) "
            f"| {fmt(s['idle_rss'], MIB)} ({fmt(s['idle_pss'], MIB)}) "
            f"| {fmt(s['startup_s'], digits=2)} | {stored} |"
        )
    ref = report["reference"]
    if report["ratios"]:
        lines += [
            "",
            f"Ratios, {ref} / other (req/s: >1 means {ref} is faster; CPU, p99 and RSS: <1 "
            f"means {ref} uses less):",
            "",
            "| other | req/s | CPU per request | p99 latency (low concurrency) | peak RSS |",
            "|---|---|---|---|---|",
        ]
        for name, entry in report["ratios"].items():
            cells = [
                "-" if key not in entry else f"{entry[key]:.2f}x"
                for key in ("rps", "cpu_per_req", "lat_p99", "peak_rss")
            ]
            lines.append(f"| {name} | {' | '.join(cells)} |")
    if report["skipped"]:
        lines += ["", *(f"Skipped {name}: {why}" for name, why in report["skipped"].items())]
    lines += [
        "",
        f"Load average at start: {report['machine']['loadavg_start']}; at end: "
        f"{report['machine']['loadavg_end']}.",
    ]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------


def select(only: list[str] | None) -> tuple[list[Contender], dict[str, str]]:
    wanted = {n.strip() for group in only or [] for n in group.split(",") if n.strip()}
    known = {c.name for c in CONTENDERS}
    if unknown := wanted - known:
        raise SystemExit(f"unknown contender(s) {sorted(unknown)}; known: {sorted(known)}")
    chosen, skipped = [], {}
    for contender in CONTENDERS:
        selected = contender.name in wanted if wanted else contender.by_default
        if not selected:
            continue
        if why := contender.unavailable():
            skipped[contender.name] = why
            log(f"skipping {contender.name}: {why}")
            continue
        chosen.append(contender)
    return chosen, skipped


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


async def bench(args: argparse.Namespace) -> Json:
    opts = Options(
        duration=args.duration,
        rounds=args.rounds,
        connections=args.connections,
        latency_connections=args.latency_connections,
        threads=args.threads,
        warmup=args.warmup,
        inflight=args.inflight or args.connections,
        options_rate=args.options_rate,
        amqp_url=args.amqp_url,
        ready_timeout=args.ready_timeout,
        settle=args.settle,
    )
    # SIGTERM / SIGINT cancel the run: contenders are stopped and the broker cleaned up on the way.
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
    contenders, skipped = select(args.only)
    if not contenders:
        raise SystemExit("no contender to run")
    wrk = ensure_wrk(install=not args.no_install)
    if wrk is None:
        raise SystemExit(2)
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    broker = Broker(args.amqp_url)
    reference = args.reference or (
        "konpro-bridge" if any(c.name == "konpro-bridge" for c in contenders) else "naive"
    )
    if reference == "naive" and "konpro-bridge" in skipped:
        log("ratios are taken against 'naive' because konpro-bridge is not available")
    report: Json = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "run_id": run_id,
        "options": {k: v for k, v in vars(opts).items() if k != "amqp_url"},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": loadavg(),
            "wrk": wrk,
            "versions": {
                pkg: version(pkg)
                for pkg in ("aiohttp", "aio-pika", "aiormq", "flask", "pika", "gunicorn")
                if _has_dist(pkg)
            },
        },
        "contenders": {
            c.name: {
                "description": c.description,
                "kind": c.kind,
                "publishes": c.publishes,
                "command": list(c.command),
            }
            for c in contenders
        },
        "skipped": skipped,
        "reference": reference,
        "rounds": {c.name: [] for c in contenders},
        "errors": {},
    }
    with tempfile.TemporaryDirectory(prefix="konpro-bench-") as tmp:
        workdir = Path(tmp)
        try:
            await broker.connect()
            report["machine"]["broker"] = broker.server_version()
            for rnd in range(opts.rounds):
                order = contenders if rnd % 2 == 0 else list(reversed(contenders))
                for contender in order:
                    tag = f"{run_id}-{contender.name}-r{rnd}"
                    log(f"round {rnd + 1}/{opts.rounds}: {contender.name}")
                    settle = await quiesce(within=opts.settle)
                    if settle["quiet"] is False:
                        log(f"machine not quiet before {contender.name}: {settle}")
                    load_before = loadavg()
                    try:
                        record = await run_round(
                            contender, opts, broker, wrk=wrk, workdir=workdir, tag=tag
                        )
                    except FAILURES as exc:  # reported as failed; the others go on
                        log(f"!!! {contender.name} failed in round {rnd + 1}: {exc}")
                        report["errors"].setdefault(contender.name, []).append(str(exc))
                        continue
                    finally:
                        await broker.cleanup()
                    record.update(round=rnd, loadavg_before=load_before, quiesce=settle)
                    report["rounds"][contender.name].append(record)
                    log(f"  {contender.name}: {brief(record)}")
        finally:
            await broker.close()
    report["machine"]["loadavg_end"] = loadavg()
    report["summary"] = {
        name: summarize(rounds) for name, rounds in report["rounds"].items() if rounds
    }
    report["ratios"] = ratios(report["summary"], reference)
    return report


def brief(record: Json) -> str:
    load = record["load"]
    return (
        f"{rate(load) or 0:,.0f} req/s, p99 {load['latency_us']['p99'] / 1000:.1f} ms, "
        f"stored {load['stored']} for {load['ok']} 2xx, peak RSS {record['peak_rss'] / MIB:.1f} MiB"
    )


def _has_dist(name: str) -> bool:
    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--duration",
        type=int,
        default=10,
        help="whole seconds per load (10; wrk takes whole seconds)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order alternating (3)")
    parser.add_argument("--connections", type=int, default=64, help="load connections (64)")
    parser.add_argument(
        "--latency-connections", type=int, default=4, help="connections for the latency run (4)"
    )
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds (2; 0 = none)")
    parser.add_argument(
        "--inflight",
        type=int,
        help="publishes in flight for the publish ceilings (default: --connections, the most "
        "confirms an HTTP bridge can be waiting for under that load)",
    )
    parser.add_argument(
        "--options-rate",
        type=float,
        default=20.0,
        help="OPTIONS requests per second during the load (20)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME[,NAME]",
        help=f"run only these contenders: {', '.join(c.name for c in CONTENDERS)}",
    )
    parser.add_argument(
        "--reference", help="contender the ratios are taken against (konpro-bridge, else naive)"
    )
    parser.add_argument(
        "--amqp-url", default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    )
    parser.add_argument("--ready-timeout", type=float, default=30.0)
    parser.add_argument(
        "--settle",
        type=float,
        default=20.0,
        help="at most this long, wait for a quiet machine before each round and after each "
        "purge (20; 0 = do not wait)",
    )
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--json-out", type=Path, help="write the JSON report here instead")
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not try to apt-get install wrk when it is missing",
    )
    args = parser.parse_args(argv)
    if min(args.connections, args.latency_connections, args.rounds, args.duration) < 1:
        parser.error("--duration, --connections, --latency-connections, --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = asyncio.run(bench(args))
    except asyncio.CancelledError:
        log("interrupted; contenders stopped, queues and exchanges deleted")
        return 130
    out: Path = args.json_out or args.results_dir / f"bench-{report['run_id']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nJSON: {out}")
    failed = bool(report["errors"]) or not all(s["accounted"] for s in report["summary"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
