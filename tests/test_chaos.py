"""Chaos: many faults in a row, picked at random, and still no accepted event is lost.

The bridge runs as a process behind the tests' TCP proxy to the shared broker while several
clients post distinct, signed KonPro deliveries. Meanwhile a seeded random plan of faults runs
for a while: the link cut, held (the broker silent) or slowed, and the bridge killed (SIGKILL)
or stopped (SIGTERM) and started again on the same spool, sometimes in the middle of an outage.
Afterwards only invariants are checked, never timings: every event answered 200 or 202 is on
the queue, byte for byte; answers are 200, 202 or 503, or a connection error while the bridge
was down; the log holds no error; the bridge stops with exit 0.

CI runs one fixed seed (12: a flapping link, a slow one, a stop while the broker is silent, a
cut, two holds and a SIGKILL) with 16 s of faults, about 25 s in all. To hunt, override either
or both::

    KONPRO_CHAOS_SEED=7 KONPRO_CHAOS_SECONDS=120 .venv/bin/pytest -s tests/test_chaos.py

``KONPRO_CHAOS_WORKERS=2`` runs the bridge as a supervisor and two workers; a SIGKILL then takes
one worker, as the OOM killer would, and the supervisor starts it again (a SIGKILL of the
supervisor itself is a defect of its own, below). ``KONPRO_CHAOS_LOG_LEVEL=debug`` adds
aiormq's and aio-pika's own account of each reconnect to the bridge's log (kept in pytest's
temporary directory, ``bridge.log``), to diagnose a failure.
``-s`` shows the one-line summary (seed, plan, accepted, spooled, duplicates). A failure names
the seed; the same seed gives the same plan of faults, though not the same interleaving with the
clients' deliveries.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from bridge.events import DOCUMENTED_EVENT_TYPES
from bridge.publisher import Publisher
from bridge.samples import sample_body
from bridge.signatures import sign
from tests.support.chaos import Answer, Chaos, Fault, alive, children, parse_lines
from tests.support.harness import (
    BridgeFactory,
    QueueFactory,
    drain,
    process_sections,
    proxied_amqp_url,
)
from tests.support.observing import scrape, value
from tests.support.process import BridgeProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

SEED = int(os.environ.get("KONPRO_CHAOS_SEED", "12"))
SECONDS = float(os.environ.get("KONPRO_CHAOS_SECONDS", "16"))
LOG_LEVEL = os.environ.get("KONPRO_CHAOS_LOG_LEVEL", "info")
WORKERS = int(os.environ.get("KONPRO_CHAOS_WORKERS", "1"))
SECRET = "whsec_chaos-test-secret"
SENDERS = 6
SHUTDOWN_TIMEOUT = 3.0


# --- the plan of faults ------------------------------------------------------------------------


FAULTS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    # kind: (range of its length in seconds, range of its detail)
    "cut": ((0.2, 3.0), (0.0, 0.0)),
    "hold": ((0.5, 7.0), (0.0, 0.0)),  # past (1 + 1) x 3 s, a 1 s heartbeat gives the link up
    "slow": ((1.0, 4.0), (0.05, 0.5)),  # detail: the delay per chunk
    "flap": ((1.0, 4.0), (0.05, 0.5)),  # cut and restored over and over, each for detail at most
    "kill": ((0.0, 1.0), (0.0, 0.0)),  # length: how long the bridge stays down
    "kill_in_outage": ((1.0, 4.0), (0.2, 1.0)),  # detail: the outage before the kill
    "kill_held": ((1.0, 4.0), (0.2, 1.0)),
    "term": ((0.0, 1.0), (0.0, 0.0)),
    "term_held": ((1.0, 2.0), (0.2, 1.0)),
}
KINDS = ("cut", "cut", "hold", "hold", *FAULTS)  # link faults twice as often
KILLS = ("kill", "kill_in_outage", "kill_held")


def plan_faults(rng: random.Random, seconds: float) -> list[Fault]:
    """Faults whose lengths and pauses add up to about ``seconds``, at least one a SIGKILL."""
    plan: list[Fault] = []
    total = 0.0
    while total < seconds:
        kind = rng.choice(KINDS)
        length, detail = (rng.uniform(*bounds) for bounds in FAULTS[kind])
        plan.append(Fault(kind, length, rng.uniform(0.2, 1.5), detail))
        total += length + plan[-1].pause
    if not any(fault.kind in KILLS for fault in plan):
        at = rng.randrange(len(plan))
        plan[at] = Fault("kill", rng.uniform(0.0, 1.0), plan[at].pause)
    return plan


# --- the clients -------------------------------------------------------------------------------


def delivery(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    """A fresh KonPro delivery of a documented type, signed as KonPro signs it."""
    event_id = uuid.uuid4().hex
    body = sample_body(rng.choice(DOCUMENTED_EVENT_TYPES))
    headers = {
        "Content-Type": "application/json",
        "KonPro-Event-Id": event_id,
        "KonPro-Timestamp": str(int(time.time())),
        "KonPro-Signature": sign(body, SECRET),
    }
    return event_id, body, headers


async def post_once(url: str, rng: random.Random) -> int:
    """One delivery on a connection of its own; its status."""
    _, body, headers = delivery(rng)
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as r:
        return r.status


async def post_until(stop: asyncio.Event, url: str, rng: random.Random) -> list[Answer]:
    """One client posting distinct events one after another, a new connection each, until
    ``stop``. As KonPro does, it sends a delivery again (same body, same event id) when it got
    no 2xx, up to three times, and now and then after a 2xx too (a retry of an answer that came
    late). A short random pause between posts keeps the load steady rather than maximal."""
    answers: list[Answer] = []
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=15)  # KonPro waits 10 s
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        while not stop.is_set():
            event_id, body, headers = delivery(rng)
            for _ in range(3):
                answers.append(await post(http, url, event_id, body, headers))
                if answers[-1].status in {200, 202}:
                    if rng.random() < 0.05:
                        answers.append(await post(http, url, event_id, body, headers))
                    break
                await asyncio.sleep(0.2)  # the bridge is down, or refused: again a little later
            await asyncio.sleep(rng.uniform(0.0, 0.05))
    return answers


async def post(
    http: aiohttp.ClientSession, url: str, event_id: str, body: bytes, headers: dict[str, str]
) -> Answer:
    started = time.monotonic()
    try:
        async with http.post(url, data=body, headers=headers) as response:
            await response.read()
            return Answer(event_id, body, started, time.monotonic(), response.status)
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
        return Answer(event_id, body, started, time.monotonic(), None, error)


@contextlib.contextmanager
def fail_after(why: str) -> Iterator[None]:
    """A wait that timed out, as a test failure that says what did not happen."""
    try:
        yield
    except TimeoutError:
        pytest.fail(why)


# --- the specification -------------------------------------------------------------------------


@pytest.mark.timeout(int(90 + 3 * SECONDS))
async def test_no_accepted_event_is_lost_through_a_random_run_of_link_faults_kills_and_restarts(
    tmp_path: Path, exchange_name: str, broker_proxy: TcpProxy, bind_queue: QueueFactory
) -> None:
    rng = random.Random(SEED)
    plan = plan_faults(rng, SECONDS)
    heartbeat = rng.choice(["", "?heartbeat=1"])  # the broker's 60 s, or a silent link given up
    # Shorter than the grace period, or longer: a stop while the broker is silent then
    # abandons the confirms still due and spools their deliveries.
    publish_timeout = rng.choice([1.0, 5.0])
    queue = await bind_queue("#")
    sections: dict[str, dict[str, Any]] = {
        "server": {"shutdown_timeout": SHUTDOWN_TIMEOUT, "workers": WORKERS},
        "amqp": {
            "url": proxied_amqp_url(broker_proxy) + heartbeat,
            "exchange": exchange_name,
            "publish_timeout": publish_timeout,
            "reconnect_interval": 0.2,
        },
        "konpro": {"webhook_secret": SECRET},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
        "log": {"format": "json", "level": LOG_LEVEL},
    }
    bridge = BridgeProcess(tmp_path, sections)
    chaos = Chaos(
        broker_proxy,
        bridge,
        WORKERS,
        random.Random(rng.random()),
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await chaos.start()
    stop_posting = asyncio.Event()
    try:
        senders = [
            asyncio.create_task(post_until(stop_posting, bridge.webhook_url, random.Random(n)))
            for n in range(SENDERS)
        ]
        for fault in plan:
            await chaos.apply(fault)
        stop_posting.set()
        answers = list(itertools.chain.from_iterable(await asyncio.gather(*senders)))
        await chaos.heal()

        async def gauge(name: str) -> float:
            async with aiohttp.ClientSession() as http:  # every worker's, with several
                return value(await scrape(http, bridge.url + "/metrics"), name)

        async def ready() -> bool:
            return await gauge("konpro_bridge_broker_connected") == 1

        async def spool_is_empty() -> bool:
            return await gauge("konpro_bridge_spool_depth") == 0

        # Generous: a bridge that could not connect at start backs off up to 30 s between tries.
        with fail_after(f"the bridge did not get back to the broker (seed {SEED})"):
            await eventually(ready, within=45)
        with fail_after(f"the spool was not forwarded (seed {SEED})"):
            await eventually(spool_is_empty, within=70)
        final_stop = await chaos.stop()
    finally:
        stop_posting.set()
        if bridge.process is not None and bridge.process.returncode is None:
            bridge.process.kill()
            await bridge.process.wait()

    statuses = collections.Counter(answer.status for answer in answers)
    accepted = {a.event_id: a.body for a in answers if a.status in {200, 202}}
    received = await drain(queue, expect=len(accepted), within=30)
    received_ids = [str(message.message_id) for message in received]
    bodies = {str(message.message_id): message.body for message in received}
    lines, strays = parse_lines(bridge.log_path.read_bytes())
    # A worker the test killed is reported as an error, and rightly so.
    killed = {(worker, -signal.SIGKILL) for worker, _ in chaos.killed}
    errors = [
        line
        for line in lines
        if line["level"] in {"error", "critical"}
        and not (
            line["event"] == "workers.exited" and (line["worker"], line["exit_code"]) in killed
        )
    ]
    print(
        f"\nchaos seed={SEED} seconds={SECONDS:g} workers={WORKERS} "
        f"heartbeat={heartbeat or 'default'} "
        f"publish_timeout={publish_timeout:g} "
        f"answers={len(answers)} events={len({a.event_id for a in answers})} "
        f"accepted={len(accepted)} spooled={statuses[202]} "
        f"refused={statuses[503]} connection_errors={statuses[None]} "
        f"received={len(received_ids)} duplicates={len(received_ids) - len(set(received_ids))} "
        f"faults={dict(chaos.applied)} plan={' '.join(map(str, plan))}"
    )

    missing = sorted(set(accepted) - set(bodies))
    assert missing == [], f"{len(missing)} accepted events never reached the queue (seed {SEED})"
    assert all(bodies[event_id] == body for event_id, body in accepted.items())
    assert set(statuses) <= {200, 202, 503, None}, statuses
    cut_off = [a for a in answers if a.status is None and not chaos.was_down(a)]
    assert cut_off == [], f"connection errors while the bridge was up (seed {SEED})"
    unanswered = chaos.unanswered(answers)
    assert unanswered == [], f"answers logged but not received (seed {SEED})"
    assert errors == [], f"error lines in the bridge's log (seed {SEED})"
    assert strays == [], f"lines that are not JSON in the bridge's log (seed {SEED})"
    assert chaos.stop_codes == [0] * len(chaos.stop_codes), chaos.stop_codes
    assert final_stop == 0, f"the bridge did not stop cleanly (seed {SEED})"


# --- defects the chaos test found, each fixed: deterministic reproductions -------------------


async def test_a_bridge_started_while_the_broker_is_silent_connects_once_it_answers(
    start_bridge: BridgeFactory, broker_proxy: TcpProxy
) -> None:
    """A broker that answers nothing while the bridge starts (a frozen host, a partition), and
    then answers again after a few seconds. With a 1 s heartbeat aiormq gives a connection up
    after 6 s without a frame; a link that comes back between then and the 10 s connect timeout
    completes the handshake, and is given up while the bridge opens its channel."""
    url = proxied_amqp_url(broker_proxy) + "?heartbeat=1"
    broker_proxy.hold()
    loop = asyncio.get_running_loop()

    async def first_connect_attempt() -> float:
        await eventually(lambda: broker_proxy.sent_upstream > 0, within=15, every=0.01)
        return loop.time()

    attempt = asyncio.create_task(first_connect_attempt())
    with structlog.testing.capture_logs() as logs:
        async with start_bridge(wait_ready=False, amqp={"url": url}) as bridge:
            held_since = await attempt  # the connection's first bytes wait in the proxy
            await asyncio.sleep(held_since + 7.5 - loop.time())  # the broker's silence
            broker_proxy.release()
            await eventually(lambda: bridge.publisher.is_ready, within=15)

    assert [line for line in logs if line["log_level"] in ("error", "critical")] == []


HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"


def stream_ends_behind_a_frame(publisher: Publisher) -> None:
    """What aiormq's reader finds when the broker's last frame and the end of the stream (a FIN,
    not a reset) arrive while it is still busy with earlier frames (under load), or right after
    a handshake (a link that flaps): a whole frame, then the end, with no wait in between. It
    takes the frame, finds the stream at its end, and returns normally; aiormq then closes the
    connection with no exception, and fails each pending future with a bare ``Exception``
    (``FutureStore.reject_all``: ``exception or Exception``). Fed straight into the stream
    aiormq reads, through its internals: the proxy cannot time a FIN that precisely."""
    connection = publisher._connection
    assert connection is not None
    assert connection.transport is not None
    underlay: Any = connection.transport.connection
    receiver = underlay._reader_task.get_coro().cr_frame.f_locals["frame_receiver"]
    stream: asyncio.StreamReader = receiver.reader
    stream.feed_data(HEARTBEAT_FRAME)
    stream.feed_eof()


async def test_deliveries_waiting_for_confirms_when_the_link_ends_cleanly_are_spooled(
    start_bridge: BridgeFactory, broker_proxy: TcpProxy
) -> None:
    async with start_bridge(amqp={"url": proxied_amqp_url(broker_proxy)}) as bridge:
        broker_proxy.hold()  # the publishes wait in the proxy: their confirms are due
        rng = random.Random(SEED)
        posts = [asyncio.create_task(post_once(bridge.webhook_url, rng)) for _ in range(3)]
        await eventually(lambda: len(confirms_due(bridge.publisher)) == 3)
        with structlog.testing.capture_logs() as logs:
            stream_ends_behind_a_frame(bridge.publisher)
            statuses = await asyncio.gather(*posts)
        broker_proxy.release()
        await eventually(lambda: bridge.spool.depth == 0, within=10)
    assert statuses == [202, 202, 202]
    lost = [line for line in logs if line["event"] == "amqp.connection_lost"]
    assert [line["error"] for line in lost] == ["the connection ended"]  # not taken for our own


def confirms_due(publisher: Publisher) -> list[object]:
    underlay = publisher._underlay
    confirmations = underlay.confirmations.values() if underlay is not None else ()
    return [c for c in confirmations if isinstance(c, asyncio.Future) and not c.done()]


async def test_the_workers_end_with_a_supervisor_killed_outright(
    tmp_path: Path, exchange_name: str
) -> None:
    """``kill -9`` of the process an operator started (a process manager that signals only its
    main process, an OOM kill of the supervisor): the next start must be able to take over."""
    sections = process_sections(
        tmp_path,
        exchange_name,
        amqp={"reconnect_interval": 0.2},
        server={"workers": 2, "shutdown_timeout": SHUTDOWN_TIMEOUT},
    )
    bridge = BridgeProcess(tmp_path, sections)
    await bridge.start()
    assert bridge.process is not None
    workers = children(bridge.process.pid)
    assert len(workers) == 2
    bridge.send(signal.SIGKILL)
    await bridge.wait()
    try:
        await eventually(lambda: not any(map(alive, workers)), within=3)
        await bridge.start()  # the same port, the same spool
        assert await bridge.stop() == 0
    finally:
        for pid in filter(alive, workers):  # the orphans this test made, by their ids
            os.kill(pid, signal.SIGKILL)
