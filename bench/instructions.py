"""Instructions per request under callgrind: ``python -m bench.instructions [--only NAME,...]``.

Throughput on a shared 2-core machine moves by 10-20% from run to run, more than most single
changes are worth. Instructions do not: valgrind's callgrind counts them, repeatably within about
1% for the same code and load, whatever else the machine does. Each HTTP contender runs under
callgrind with counting switched on only while wrk posts at low concurrency (4 connections by
default); the total over the 2xx answers is the figure. It prices a change before the side-by-side
benchmark (``bench.run``) tells what it is worth in requests per second. It does not see the
kernel's work (socket writes) or cache misses, and a process under valgrind runs about 50x slower,
so every request is a wake-up of its own: compare contenders and versions, not seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench.contenders import CONTENDERS, Contender
from bench.run import (
    Broker,
    Json,
    Options,
    ensure_wrk,
    log,
    make_slots,
    run_wrk,
    spawned,
    wait_ready,
)

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
READY_WITHIN = 180.0  # seconds: the interpreter starts about 50x slower under valgrind


async def count(contender: Contender, opts: Options, wrk: str, workdir: Path, seconds: int) -> Json:
    """Start ``contender`` under callgrind, post for ``seconds``; instructions per 2xx."""
    out = workdir / f"{contender.name}.callgrind"
    traced = dataclasses.replace(
        contender,
        command=(
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={out}.%p",
            *contender.command,
        ),
    )
    slots = make_slots(traced, opts, workdir=workdir, tag=contender.name, inflight=1)
    broker = Broker(opts.amqp_url)
    await broker.connect()
    try:
        await broker.prepare(contender, slots)
        post_url = slots.fill(contender.post_url)
        log_path = workdir / f"{contender.name}.log"
        async with spawned(traced, slots, log_path) as proc:
            await wait_ready(slots.fill(contender.ready_url), proc, READY_WITHIN, log_path)

            async def post(phase: str, duration: int) -> Json:
                return await run_wrk(
                    wrk,
                    post_url,
                    connections=opts.connections,
                    threads=1,
                    duration=duration,
                    run_id=f"{contender.name}-{phase}",
                )

            if opts.warmup:  # first calls: imports, caches, the first publish
                await post("warm", opts.warmup)
            await _callgrind_control("--instr=on", proc.pid)
            load = await post("load", seconds)
            await _callgrind_control("--instr=off", proc.pid)
        # The counts are written when the process exits (on SIGTERM, above).
    finally:
        await broker.close()
    answered = int(load["ok"])
    total = await asyncio.to_thread(_instructions_in, workdir, out.name)
    return {
        "contender": contender.name,
        "requests": answered,
        "instructions_per_request": round(total / answered) if answered else None,
    }


async def _callgrind_control(switch: str, pid: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control",
        switch,
        str(pid),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {switch} {pid} failed")


def _instructions_in(workdir: Path, prefix: str) -> int:
    """All the instructions the dumps named ``<prefix>.<pid>`` counted."""
    return sum(_instructions(path) for path in workdir.glob(f"{prefix}.*"))


def _instructions(dump: Path) -> int:
    """The event count of one callgrind dump: its ``totals:`` line (``summary:`` can say 0)."""
    counts = [
        int(line.split()[1])
        for line in dump.read_text(errors="replace").splitlines()
        if line.startswith(("summary:", "totals:"))
    ]
    return max(counts, default=0)


def markdown(results: list[Json], reference: str) -> str:
    by_name = {r["contender"]: r["instructions_per_request"] for r in results}
    base = by_name.get(reference)
    lines = [
        f"| contender | requests | instructions / request | vs {reference} |",
        "|---|---|---|---|",
    ]
    for result in results:
        per_request = result["instructions_per_request"]
        ratio = f"{per_request / base:.2f}x" if per_request and base else "-"
        shown = f"{per_request:,}" if per_request else "-"
        lines.append(f"| {result['contender']} | {result['requests']:,} | {shown} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--only", default="konpro-bridge,lean,naive", metavar="NAME[,NAME]")
    parser.add_argument("--seconds", type=int, default=20, help="posting, counted (20)")
    parser.add_argument("--connections", type=int, default=4, help="wrk connections (4)")
    parser.add_argument("--warmup", type=int, default=3, help="posting, not counted (3)")
    parser.add_argument("--json-out", type=Path, help="also write the results here")
    parser.add_argument("--amqp-url", default=AMQP_URL)
    return parser.parse_args(argv)


async def main_async(args: argparse.Namespace) -> int:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        log("valgrind is required: apt-get install -y valgrind")
        return 2
    wrk = ensure_wrk()
    if wrk is None:
        return 2
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    known = {c.name: c for c in CONTENDERS if c.kind == "http"}
    if unknown := [name for name in names if name not in known]:
        log(f"unknown HTTP contender(s) {unknown}; known: {sorted(known)}")
        return 2
    opts = Options(
        duration=args.seconds,
        rounds=1,
        connections=args.connections,
        latency_connections=args.connections,
        threads=1,
        warmup=args.warmup,
        inflight=1,
        options_rate=0,
        amqp_url=args.amqp_url,
        ready_timeout=READY_WITHIN,
        settle=0,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
        for name in names:
            if why := known[name].unavailable():
                log(f"skipping {name}: {why}")
                continue
            log(f"{name}: under callgrind, {args.seconds} s at {args.connections} connections")
            results.append(await count(known[name], opts, wrk, Path(tmp), args.seconds))
            log(f"  {name}: {results[-1]['instructions_per_request']} instructions a request")
    print(markdown(results, reference=names[0]))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
