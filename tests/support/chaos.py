"""What the randomised fault tests share: a step of a plan of faults, what a client's delivery
got, the faults applied to the link and to the bridge process, and its log read back."""

from __future__ import annotations

import asyncio
import collections
import math
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tests.support.process import BridgeProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually


@dataclass(frozen=True)
class Fault:
    """One step of the plan: ``kind`` for ``seconds``, then ``pause`` seconds of calm."""

    kind: str
    seconds: float
    pause: float
    detail: float = 0.0  # the slow link's delay per chunk; the wait before a kill in an outage

    def __str__(self) -> str:
        extra = f"/{self.detail:.2f}" if self.detail else ""
        return f"{self.kind}({self.seconds:.1f}{extra})"


def parse_lines(log: bytes) -> tuple[list[dict[str, Any]], list[bytes]]:
    """JSON log lines, and the lines that are not JSON (which should not exist)."""
    lines, strays = [], []
    for text in log.splitlines():
        if not text.strip():
            continue
        try:
            lines.append(orjson.loads(text))
        except orjson.JSONDecodeError:
            strays.append(text)
    return lines, strays


@dataclass
class Answer:
    """What one delivery got: a status, or (``status`` None) a connection error."""

    event_id: str
    body: bytes
    started: float
    ended: float
    status: int | None
    error: str = ""


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in {"Z", "X"}


Worker = int | None
"""A worker's index (``server.workers`` > 1), or None for a bridge that is one process."""


@dataclass
class Chaos:
    """Applies faults to the link (``proxy``) and to the bridge, and remembers when the bridge
    was down (from the signal until it listened again) and which of its processes SIGKILL
    ended. With ``server.workers`` > 1 a SIGKILL takes one worker, as the OOM killer would,
    and the supervisor starts it again; SIGTERM stops them all."""

    proxy: TcpProxy
    bridge: BridgeProcess
    workers: int
    rng: random.Random
    killed: set[tuple[Worker, int]] = field(default_factory=set)  # (worker, its generation)
    restarting: Worker = None
    down: list[list[float]] = field(default_factory=list)
    stop_codes: list[int] = field(default_factory=list)
    applied: collections.Counter[str] = field(default_factory=collections.Counter)
    shutdown_timeout: float = 3.0  # the bridge's server.shutdown_timeout

    async def start(self) -> None:
        await self.bridge.start(wait_ready=False)  # listening; the broker may be away

    async def stop(self) -> int:
        return await self.bridge.stop()

    async def apply(self, fault: Fault) -> None:
        step: Callable[[Fault], Awaitable[None]] = getattr(self, f"_{fault.kind}")
        await step(fault)
        self.applied[fault.kind] += 1
        await asyncio.sleep(fault.pause)

    async def _cut(self, fault: Fault) -> None:
        await self.proxy.cut()
        await asyncio.sleep(fault.seconds)
        await self.proxy.restore()

    async def _hold(self, fault: Fault) -> None:
        self.proxy.hold()
        await asyncio.sleep(fault.seconds)
        self.proxy.release()

    async def _slow(self, fault: Fault) -> None:
        self.proxy.delay = fault.detail
        await asyncio.sleep(fault.seconds)
        self.proxy.delay = 0.0

    async def _flap(self, fault: Fault) -> None:
        """A link that keeps breaking: reconnects that fail, or succeed and break at once."""
        rng = random.Random(fault.seconds)
        until = time.monotonic() + fault.seconds
        while time.monotonic() < until:
            await self.proxy.cut()
            await asyncio.sleep(rng.uniform(0.0, fault.detail))
            await self.proxy.restore()
            await asyncio.sleep(rng.uniform(0.0, fault.detail))

    async def _kill(self, fault: Fault) -> None:
        await self._signal(signal.SIGKILL)
        await asyncio.sleep(fault.seconds)
        await self._restart()

    async def _kill_in_outage(self, fault: Fault) -> None:
        """Killed while the spool fills, started again while the broker is still away."""
        await self.proxy.cut()
        await asyncio.sleep(fault.detail)
        await self._signal(signal.SIGKILL)
        await self._restart()
        await asyncio.sleep(fault.seconds)
        await self.proxy.restore()

    async def _kill_held(self, fault: Fault) -> None:
        """Killed while the broker is silent, started again while it still is: the first
        connect hangs, and the bridge listens before it is over."""
        self.proxy.hold()
        await asyncio.sleep(fault.detail)
        await self._signal(signal.SIGKILL)
        await self._restart()
        await asyncio.sleep(fault.seconds)
        self.proxy.release()

    async def _term(self, fault: Fault) -> None:
        await self._signal(signal.SIGTERM)
        await asyncio.sleep(fault.seconds)
        await self._restart()

    async def _term_held(self, fault: Fault) -> None:
        """Stopped while the broker is silent: the grace period runs out with confirms due."""
        self.proxy.hold()
        await asyncio.sleep(fault.detail)
        await self._signal(signal.SIGTERM)
        await asyncio.sleep(fault.seconds)
        self.proxy.release()
        await self._restart()

    async def _signal(self, signum: signal.Signals) -> None:
        self.down.append([time.monotonic(), math.inf])
        if signum == signal.SIGKILL and self.workers > 1:
            await self._kill_a_worker()
            return
        if signum == signal.SIGKILL:
            self.killed.add((None, self.generation(None)))
        self.bridge.send(signum)
        # A stop takes the grace period plus about 2 s for aiormq's close; more is a hang.
        code = await self.bridge.wait(within=self.shutdown_timeout + 10.0)
        if signum == signal.SIGTERM:
            self.stop_codes.append(code)
        else:
            assert code == -signal.SIGKILL

    async def _kill_a_worker(self) -> None:
        assert self.bridge.process is not None
        exited = len(self.lines("workers.exited"))
        os.kill(self.rng.choice(children(self.bridge.process.pid)), signal.SIGKILL)
        await eventually(lambda: len(self.lines("workers.exited")) > exited, within=5)
        worker = self.lines("workers.exited")[-1]["worker"]
        self.killed.add((worker, self.generation(worker)))
        self.restarting = worker

    async def _restart(self) -> None:
        if self.restarting is None:
            await self.start()
        else:  # the supervisor starts the worker again, after a back-off of 1 s and more
            worker, generation = self.restarting, self.generation(self.restarting)
            await eventually(lambda: self.generation(worker) > generation, within=40)
            self.restarting = None
        self.down[-1][1] = time.monotonic()

    def lines(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = parse_lines(self.bridge.log_path.read_bytes())[0]
        return [line for line in lines if event is None or line["event"] == event]

    def generation(self, worker: Worker) -> int:
        """How many times this worker (or the bridge) has started listening."""
        return sum(line.get("worker") == worker for line in self.lines("bridge.listening"))

    async def heal(self) -> None:
        """The link as it should be, whatever the last fault left."""
        self.proxy.delay = 0.0
        self.proxy.release()
        await self.proxy.restore()

    def was_down(self, answer: Answer) -> bool:
        return any(start <= answer.ended and answer.started <= end for start, end in self.down)

    def unanswered(self, answers: list[Answer]) -> list[tuple[str, int | None]]:
        """Answers the log says were given, which no client received: (event id, status).

        A process that SIGKILL ended may have logged an answer it had no time to send; one
        stopped with SIGTERM sends every answer it logs (README: deliveries still in flight when
        the grace period ends are spooled and answered 202, not cut off)."""
        received = collections.Counter((answer.event_id, answer.status) for answer in answers)
        logged: collections.Counter[tuple[str, int | None]] = collections.Counter()
        generation: collections.Counter[Worker] = collections.Counter()
        for line in self.lines():
            worker = line.get("worker")
            if line["event"] == "bridge.listening":
                generation[worker] += 1
            elif (worker, generation[worker]) in self.killed:
                continue
            elif line["event"] == "webhook.refused":
                logged[line["message_id"], 503] += 1
            elif line["event"] == "webhook.accepted":
                logged[line["message_id"], 202 if line["outcome"] == "spooled" else 200] += 1
        return sorted((logged - received).elements())
