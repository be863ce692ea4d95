"""``konpro-bridge``: the daemon and the operator's commands, all reading the same settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog
from tqdm import tqdm

from bridge import __version__
from bridge.config import ConfigError, Settings, load_settings
from bridge.events import DeliveryRefused
from bridge.logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

_T = TypeVar("_T")
Command = Callable[[argparse.Namespace, Settings], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"konpro-bridge: invalid configuration\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    command: Command = args.command
    return command(args, settings)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="konpro-bridge",
        description="Receive KonPro webhooks and republish them to RabbitMQ.",
    )
    _add_config_option(parser, default=None)
    # Each command takes --config too; SUPPRESS keeps it from undoing a --config given earlier.
    common = argparse.ArgumentParser(add_help=False)
    _add_config_option(common, default=argparse.SUPPRESS)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run the bridge daemon")
    run.set_defaults(command=_run)

    check = commands.add_parser(
        "check-config", parents=[common], help="validate settings and print them, secrets masked"
    )
    check.set_defaults(command=_check_config)

    _add_spool_commands(commands, common)
    _add_operator_commands(commands, common)
    return parser


def _add_config_option(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="PATH",
        help="TOML settings file (default: $KONPRO_BRIDGE_CONFIG, else ./config.toml if present)",
    )


def _run(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log, settings.secrets())
    from bridge.app import StartupError, run  # noqa: PLC0415 - keep the network stack lazy

    try:
        _run_async(run(settings))
    except StartupError as exc:
        structlog.get_logger(__name__).error("bridge.cannot_start", error=str(exc))
        return EXIT_FAILURE
    return EXIT_OK


def _check_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return EXIT_OK


# --- spool: inspect and drain the local spool, also while the daemon is stopped ---------------


def _add_spool_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    spool = commands.add_parser("spool", help="inspect or drain the local spool")
    spool_commands = spool.add_subparsers(required=True, metavar="SPOOL_COMMAND")
    status = spool_commands.add_parser(
        "status", parents=[common], help="events waiting in the spool: depth, oldest age, size"
    )
    status.add_argument("--json", action="store_true", help="one JSON object on stdout")
    status.set_defaults(command=_spool_status)
    drain = spool_commands.add_parser(
        "drain",
        parents=[common],
        help="publish the spooled events now (the daemon must be stopped)",
    )
    drain.add_argument(
        "--wait",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the broker",
    )
    drain.set_defaults(command=_spool_drain)


def _spool_status(args: argparse.Namespace, settings: Settings) -> int:
    from bridge.spool import Spool  # noqa: PLC0415

    async def read() -> dict[str, Any]:
        if not (settings.spool.path / "spool.sqlite3").exists():
            return {"path": str(settings.spool.path), "depth": 0, "bytes": 0, "oldest_age": None}
        async with await Spool.open(settings.spool, exclusive=False) as spool:
            status = await spool.status()
        return {"path": str(settings.spool.path), **dataclasses.asdict(status)}

    status = _run_async(read())
    if args.json:
        print(json.dumps(status))
        return EXIT_OK
    oldest = status["oldest_age"]
    print(f"spool:  {status['path']}")
    print(f"depth:  {status['depth']} events")
    print(f"size:   {status['bytes']} bytes")
    print(f"oldest: {'-' if oldest is None else f'{oldest:.0f} s ago'}")
    return EXIT_OK


def _spool_drain(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log.model_copy(update={"level": "warning"}), settings.secrets())
    from bridge.publisher import Publisher  # noqa: PLC0415
    from bridge.spool import Spool, SpoolLocked, drain  # noqa: PLC0415

    async def drain_spool() -> int:
        async with await Spool.open(settings.spool) as spool:
            publisher = Publisher(settings.amqp)
            await publisher.start()
            try:
                async with asyncio.timeout(args.wait):
                    await publisher.wait_ready()
                with tqdm(total=spool.depth, unit="event", desc="draining") as progress:
                    return await drain(spool, publisher.publish, on_progress=_advance(progress))
            finally:
                await publisher.close()

    try:
        drained = _run_async(drain_spool())
    except SpoolLocked:
        _fail("the spool is in use: the daemon is running and drains it itself; stop it first")
        return EXIT_FAILURE
    except TimeoutError:
        _fail(f"the broker did not answer within {args.wait:g} s; nothing was drained")
        return EXIT_FAILURE
    except DeliveryRefused as exc:
        _fail(f"drain stopped: {exc.reason}; the rest stays in the spool")
        return EXIT_FAILURE
    print(f"drained {drained} events")
    return EXIT_OK


def _advance(progress: tqdm[Any]) -> Callable[[int], None]:
    def update(drained: int) -> None:
        progress.update(drained - progress.n)

    return update


def _fail(message: str) -> None:
    print(f"konpro-bridge: {message}", file=sys.stderr)


def _run_async(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run on uvloop where it is installed: it roughly doubles what one core can publish."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# Operator commands: tail, send-test-event -----------------------------------------------------


def _add_operator_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    tail = commands.add_parser(
        "tail", parents=[common], help="print events as the bridge publishes them"
    )
    tail.add_argument(
        "patterns", nargs="*", metavar="PATTERN", help="routing key patterns (default: '#')"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument("--max-events", type=int, metavar="N", help="stop after N events")
    tail.add_argument("--duration", type=float, metavar="SECONDS", help="stop after SECONDS")
    tail.set_defaults(command=_tail)

    send = commands.add_parser(
        "send-test-event",
        parents=[common],
        help="post a sample delivery, signed as KonPro signs, and print the answer",
    )
    send.add_argument("event_type", metavar="EVENT_TYPE", help="e.g. avatar_video.success")
    send.add_argument("--url", help="where to post (default: this host's bridge)")
    send.add_argument(
        "--secret", help="signing secret (default: konpro.webhook_secret; visible in ps)"
    )
    send.set_defaults(command=_send_test_event)


def _tail(args: argparse.Namespace, settings: Settings) -> int:
    from bridge import tools  # noqa: PLC0415 - keep check-config free of the network stack

    patterns = args.patterns or ["#"]

    def announce() -> None:
        exchanges = ", ".join(settings.amqp.exchanges)
        print(f"tailing {exchanges} for {' '.join(patterns)} (Ctrl-C to stop)", file=sys.stderr)

    work = tools.tail(
        settings,
        patterns,
        args.json,
        sys.stdout,
        max_events=args.max_events,
        duration=args.duration,
        on_ready=announce,
    )
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how tail normally ends
        _run_tool(work, settings, "cannot tail the broker")
    return EXIT_OK


def _send_test_event(args: argparse.Namespace, settings: Settings) -> int:
    from bridge import tools  # noqa: PLC0415

    work = tools.send_test_event(settings, args.event_type, url=args.url, secret=args.secret)
    answer = _run_tool(work, settings, "cannot deliver the test event")
    print(answer.status, answer.body)
    return EXIT_OK if 200 <= answer.status < 300 else EXIT_FAILURE


def _run_tool(work: Coroutine[Any, Any, _T], settings: Settings, failure: str) -> _T:
    """Run a tool's coroutine; a network failure exits 1 with one line on stderr, secrets masked."""
    import aiohttp  # noqa: PLC0415
    import aiormq  # noqa: PLC0415

    from bridge.logs import Redactor  # noqa: PLC0415

    configure_logging(settings.log, settings.secrets())  # libraries' lines too, secrets masked
    try:
        return _run_async(work)
    except (OSError, aiormq.exceptions.AMQPError, aiohttp.ClientError) as exc:
        detail = Redactor(settings.secrets())(str(exc) or type(exc).__name__)
        print(f"konpro-bridge: {failure}: {detail}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None
