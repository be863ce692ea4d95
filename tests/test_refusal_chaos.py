"""Chaos for parked events: faults at random while the broker refuses some deliveries by size,
and still no accepted event is lost.

The bridge runs as a process behind the tests' TCP proxy to the private RabbitMQ node, with
``spool.parked_retry_interval`` of 1 s, while several clients post distinct, signed deliveries,
about one in eight of them larger (8,000 bytes) than the broker's ``max_message_size`` (4,096 at
the start). Those the broker refuses are spooled (202) and parked. Meanwhile a seeded random plan
of faults runs: the link cut or held, the bridge killed (SIGKILL) or stopped (SIGTERM) and
started again on the same spool, and the broker's limit raised or lowered at run time
(``application:set_env``; RabbitMQ applies it to channels opened later).

Afterwards the clients stop; the link comes back and the limit stays low for a few quiet
seconds; then, healed (the limit raised for good, the link restored), the bridge drains until
``/status`` and the depth metric (every worker's) say 0. Only invariants are checked: every
event answered 2xx is on the queue, byte for byte (by message id; duplicates allowed); answers
are 200, 202 or 503, or a connection error while the bridge was down; the log's only error
lines are ``spool.event_parked`` (and the exit of a worker the test killed); every SIGTERM ends
with exit 0; and refusals make no busy loop: ``spool.forward_failed`` lines per second stay
bounded, and from the quiet seconds on, each ``amqp.channel_closed`` is the refusal of an event
parked then or of a parked one tried again (``spool.event_parked``,
``spool.parked_still_refused``), none the forwarder's going round in circles.

CI runs one fixed seed (2: the limit raised, a hold, the limit lowered, a SIGKILL in an outage,
a SIGTERM, a cut) with about 6 s of faults, about 20 s in all. To hunt::

    KONPRO_PARK_CHAOS_SEED=7 KONPRO_PARK_CHAOS_SECONDS=30 KONPRO_PARK_CHAOS_WORKERS=2 \\
        .venv/bin/pytest -s tests/test_refusal_chaos.py

``KONPRO_PARK_CHAOS_SEED`` takes a list (``1,2,3``): one run each, on one private node.
``-s`` shows a one-line summary (seed, plan, accepted, spooled, parked, duplicates).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import itertools
import os
import random
import re
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest

from bridge.signatures import sign
from tests.support import chaos
from tests.support.chaos import Fault, parse_lines
from tests.support.harness import proxied_amqp_url
from tests.support.observing import scrape, value
from tests.support.private_broker import PrivateBroker
from tests.support.process import BridgeProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

SEEDS = [int(seed) for seed in os.environ.get("KONPRO_PARK_CHAOS_SEED", "2").split(",")]
SECONDS = float(os.environ.get("KONPRO_PARK_CHAOS_SECONDS", "6"))
WORKERS = int(os.environ.get("KONPRO_PARK_CHAOS_WORKERS", "1"))
LOG_LEVEL = os.environ.get("KONPRO_PARK_CHAOS_LOG_LEVEL", "info")
SECRET = "whsec_park-chaos-secret"
SENDERS = 5
SHUTDOWN_TIMEOUT = 3.0
RETRY_INTERVAL = 1.0
BEFORE_THE_SIGNAL = 0.3  # seconds of a link cut or held before a kill or a stop in it
LOW_LIMIT = 4096
TOO_LARGE = 8000
LARGE_SHARE = 0.12
QUIET = 3.0
"""Seconds with no live deliveries and the limit low, before healing."""
BUSY_FAILURES_PER_SECOND = 10
"""More ``spool.forward_failed`` lines than this in a second is a loop, not a bridge working
through refused events."""
CLOSES_UNEXPLAINED = 3
"""Channel closes after the clients stopped that no refusal line explains, at most (a close
that races the link's loss, say)."""


# --- the plan of faults ------------------------------------------------------------------------


FAULTS: dict[str, tuple[float, float]] = {
    "cut": (0.2, 2.5),
    "hold": (0.5, 4.0),
    "kill": (0.0, 1.0),
    "kill_in_outage": (0.5, 2.0),
    "term": (0.0, 1.0),
    "term_held": (0.5, 2.0),
    "limit_low": (0.0, 0.0),
    "limit_high": (0.0, 0.0),
}
KINDS = ("cut", "hold", "limit_low", "limit_high", "limit_low", "limit_high", *FAULTS)


def plan_faults(rng: random.Random, seconds: float) -> list[Fault]:
    plan: list[Fault] = []
    total = 0.0
    while total < seconds:
        kind = rng.choice(KINDS)
        seconds, pause = rng.uniform(*FAULTS[kind]), rng.uniform(0.3, 2.0)
        plan.append(Fault(kind, seconds, pause, detail=BEFORE_THE_SIGNAL))
        total += plan[-1].seconds + plan[-1].pause
    return plan


# --- the clients -------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Answer(chaos.Answer):
    large: bool
    """Larger than the broker's limit."""


def delivery(rng: random.Random) -> tuple[str, bytes, bool, dict[str, str]]:
    event_id = f"evt_{uuid.uuid4().hex}"
    large = rng.random() < LARGE_SHARE
    size = TOO_LARGE + rng.randrange(0, 200) if large else rng.randrange(0, 600)
    data = {"video_id": event_id, "padding": "x" * size}
    body = orjson.dumps({"event_type": "avatar_video.success", "event_data": data})
    headers = {
        "Content-Type": "application/json",
        "KonPro-Event-Id": event_id,
        "KonPro-Timestamp": str(int(time.time())),
        "KonPro-Signature": sign(body, SECRET),
    }
    return event_id, body, large, headers


async def post_until(stop: asyncio.Event, url: str, rng: random.Random) -> list[Answer]:
    """One client posting distinct events, a new connection each, until ``stop``; as KonPro does,
    a delivery that got no 2xx is sent again (same id, same body), up to three times."""
    answers: list[Answer] = []
    connector = aiohttp.TCPConnector(force_close=True)
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        while not stop.is_set():
            event_id, body, large, headers = delivery(rng)
            for _ in range(3):
                started = time.monotonic()
                try:
                    async with http.post(url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                        answer = Answer(
                            event_id, body, started, time.monotonic(), status, large=large
                        )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    ended = time.monotonic()
                    answer = Answer(event_id, body, started, ended, None, error, large=large)
                answers.append(answer)
                if answer.status in {200, 202}:
                    break
                await asyncio.sleep(0.2)
            await asyncio.sleep(rng.uniform(0.0, 0.05))
    return answers


# --- running the plan --------------------------------------------------------------------------


@dataclass(kw_only=True)
class Chaos(chaos.Chaos):
    """test_chaos's faults of the link and the bridge, and the broker's limit raised or lowered
    at run time (RabbitMQ applies it to channels opened later)."""

    broker: PrivateBroker
    default_limit: int
    limits: list[tuple[float, int]] = field(default_factory=list)

    async def set_limit(self, size: int) -> None:
        command = f"application:set_env(rabbit, max_message_size, {size})."
        await asyncio.to_thread(self.broker.ctl, "eval", command, timeout=30)
        self.limits.append((time.monotonic(), size))

    async def _limit_low(self, fault: Fault) -> None:
        await self.set_limit(LOW_LIMIT)

    async def _limit_high(self, fault: Fault) -> None:
        await self.set_limit(self.default_limit)


def busiest_second(lines: list[dict[str, Any]], event: str, since: str = "") -> tuple[int, str]:
    """The most ``event`` lines in one second of the log (from ``since``, an ISO time), and
    that second."""
    per_second = collections.Counter(
        str(line["timestamp"])[:19]
        for line in lines
        if line["event"] == event and str(line["timestamp"]) >= since
    )
    if not per_second:
        return 0, ""
    second, count = per_second.most_common(1)[0]
    return count, second


def gist(line: dict[str, Any]) -> str:
    """An error line's event, without the addresses of objects, to count alike ones together."""
    return re.sub(r" at 0x[0-9a-f]+", "", str(line["event"]))[-160:]


def utc_now() -> str:
    """Now, as the bridge's log writes times."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def drain_ids(
    queue: aio_pika.abc.AbstractQueue, expect: set[str], within: float
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message until each id of ``expect`` was seen (or ``within`` ran out), then the rest."""
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []
    seen: set[str] = set()
    deadline = time.monotonic() + within
    while not expect <= seen and time.monotonic() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.05)
            continue
        messages.append(message)
        seen.add(str(message.message_id))
    await asyncio.sleep(0.3)
    while (extra := await queue.get(fail=False, no_ack=True)) is not None:
        messages.append(extra)
    return messages


# --- the specification -------------------------------------------------------------------------


@pytest.mark.timeout(int(150 + 3 * SECONDS))
@pytest.mark.parametrize("SEED", SEEDS)
async def test_no_accepted_event_is_lost_while_the_broker_refuses_some_and_faults_come_at_random(
    SEED: int,
    tmp_path: Path,
    exchange_name: str,
    private_broker: PrivateBroker,
    private_queue: aio_pika.abc.AbstractQueue,
) -> None:
    rng = random.Random(SEED)
    plan = plan_faults(rng, SECONDS)
    publish_timeout = rng.choice([1.0, 5.0])
    default = private_broker.ctl("eval", "application:get_env(rabbit, max_message_size).")
    (default_limit,) = map(int, re.findall(r"\{ok,(\d+)\}", default))
    proxy = TcpProxy("127.0.0.1", private_broker.port)
    await proxy.start()
    sections: dict[str, dict[str, Any]] = {
        "server": {"shutdown_timeout": SHUTDOWN_TIMEOUT, "workers": WORKERS},
        "amqp": {
            "url": proxied_amqp_url(proxy),
            "exchange": exchange_name,
            "publish_timeout": publish_timeout,
            "reconnect_interval": 0.2,
        },
        "konpro": {"webhook_secret": SECRET},
        "spool": {"path": str(tmp_path / "spool"), "parked_retry_interval": RETRY_INTERVAL},
        "reconcile": {"enabled": False},
        "log": {"format": "json", "level": LOG_LEVEL},
    }
    bridge = BridgeProcess(tmp_path, sections)
    faults = Chaos(
        proxy,
        bridge,
        WORKERS,
        random.Random(rng.random()),
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        broker=private_broker,
        default_limit=default_limit,
    )
    stop_posting = asyncio.Event()
    answers: list[Answer] = []
    status: dict[str, Any] = {}
    quiet_since = ""
    try:
        await faults.set_limit(LOW_LIMIT)
        await bridge.start(wait_ready=False)
        senders = [
            asyncio.create_task(post_until(stop_posting, bridge.webhook_url, random.Random(n)))
            for n in range(SENDERS)
        ]
        await asyncio.sleep(1.0)  # some refused deliveries parked before the first fault
        for fault in plan:
            await faults.apply(fault)
        stop_posting.set()
        answers = list(itertools.chain.from_iterable(await asyncio.gather(*senders)))
        # A quiet while: no live deliveries, the link back, the limit low. What the log says from
        # now on is the forwarder's alone: a parked event tried each interval, no more.
        quiet_since = utc_now()
        await faults.heal()  # the link
        await faults.set_limit(LOW_LIMIT)
        await asyncio.sleep(QUIET)
        await faults.set_limit(default_limit)
        await faults.heal()
        healed = time.monotonic()

        async def drained() -> bool:
            """``/status`` says depth 0 (the worker that answered), and so does the metric
            (every worker's, with several)."""
            nonlocal status
            try:
                async with aiohttp.ClientSession() as http:
                    async with http.get(bridge.url + "/status") as response:
                        status = (await response.json())["spool"]
                    metrics = await scrape(http, bridge.url + "/metrics")
            except aiohttp.ClientError:
                return False
            return status["depth"] == 0 and value(metrics, "konpro_bridge_spool_depth") == 0

        try:
            await eventually(drained, within=60, every=0.25)
        except TimeoutError:
            pytest.fail(f"the spool was not forwarded after healing (seed {SEED}): {status}")
        drain_took = time.monotonic() - healed
        bridge.send(signal.SIGTERM)
        final_stop = await bridge.wait(within=SHUTDOWN_TIMEOUT + 15.0)
    finally:
        stop_posting.set()
        if bridge.process is not None and bridge.process.returncode is None:
            bridge.process.kill()
            await bridge.process.wait()
        await proxy.close()
        await asyncio.to_thread(
            private_broker.ctl,
            "eval",
            f"application:set_env(rabbit, max_message_size, {default_limit}).",
        )

    statuses = collections.Counter(answer.status for answer in answers)
    accepted = {a.event_id: a.body for a in answers if a.status in {200, 202}}
    large = {a.event_id for a in answers if a.large and a.status in {200, 202}}
    received = await drain_ids(private_queue, set(accepted), within=30)
    received_ids = [str(message.message_id) for message in received]
    bodies = {str(message.message_id): message.body for message in received}
    lines, strays = parse_lines(bridge.log_path.read_bytes())
    events = collections.Counter(line["event"] for line in lines)
    killed = {(worker, -signal.SIGKILL) for worker, _ in faults.killed}
    errors = [
        line
        for line in lines
        if line["level"] in {"error", "critical"}
        and line["event"] != "spool.event_parked"
        and not (
            line["event"] == "workers.exited" and (line["worker"], line["exit_code"]) in killed
        )
    ]
    # The forwarder backs off after failures: few spool.forward_failed lines in any second.
    # A refusal closes the channel; while the clients post, each too-large live delivery does
    # so, but once they have stopped, only the forwarder's tries do, each parking an event or
    # finding a parked one still refused.
    busy = {
        ("spool.forward_failed", "", BUSY_FAILURES_PER_SECOND): busiest_second(
            lines, "spool.forward_failed"
        )
    }
    quiet = collections.Counter(
        line["event"] for line in lines if str(line["timestamp"]) >= quiet_since
    )
    closes = quiet["amqp.channel_closed"]
    explained = quiet["spool.event_parked"] + quiet["spool.parked_still_refused"]
    print(
        f"\npark-chaos seed={SEED} seconds={SECONDS:g} workers={WORKERS} "
        f"publish_timeout={publish_timeout:g} answers={len(answers)} "
        f"accepted={len(accepted)} large_accepted={len(large)} spooled={statuses[202]} "
        f"refused={statuses[503]} connection_errors={statuses[None]} "
        f"parked={events['spool.event_parked']} "
        f"still_refused={events['spool.parked_still_refused']} "
        f"released={events['spool.parked_released']} "
        f"forward_failed={events['spool.forward_failed']} "
        f"channel_closed={events['amqp.channel_closed']} "
        f"connection_lost={events['amqp.connection_lost']} "
        f"busiest_forward_failed={[c for c, _ in busy.values()]} "
        f"quiet_closes={closes} quiet_parked_or_still_refused={explained} "
        f"received={len(received_ids)} duplicates={len(received_ids) - len(set(received_ids))} "
        f"drain_after_heal={drain_took:.1f}s faults={dict(faults.applied)} "
        f"plan={' '.join(map(str, plan))}"
    )

    missing = sorted(set(accepted) - set(bodies))
    cut_off = [a for a in answers if a.status is None and not faults.was_down(a)]
    wrong = [b for e, b in accepted.items() if e in bodies and bodies[e] != b]
    problems = [
        *(
            [
                f"{len(missing)} accepted events never reached the queue "
                f"(id, too large?): "
                f"{[(m, m in large) for m in missing[:10]]}"
            ]
            if missing
            else []
        ),
        *([f"{len(wrong)} bodies differ"] if wrong else []),
        *([f"statuses {statuses}"] if not set(statuses) <= {200, 202, 503, None} else []),
        *([f"connection errors while the bridge was up: {cut_off[:3]}"] if cut_off else []),
        *([f"lines that are not JSON: {strays[:5]}"] if strays else []),
        *([f"SIGTERM exit codes {faults.stop_codes}"] if any(faults.stop_codes) else []),
        *([f"final stop exit code {final_stop}"] if final_stop else []),
        *(
            f"{count} {name} lines at {second}"
            for (name, _, most), (count, second) in busy.items()
            if count > most
        ),
        *(
            [f"{closes} channel closes after the clients stopped, {explained} refusals"]
            if closes > explained + CLOSES_UNEXPLAINED
            else []
        ),
        *(
            [f"{len(errors)} error lines: {collections.Counter(map(gist, errors)).most_common(4)}"]
            if errors
            else []
        ),
    ]
    assert problems == [], f"seed {SEED} workers {WORKERS}: " + "; ".join(problems)
