"""``konpro-bridge``: the daemon and the operator's commands, all reading the same settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from bridge import __version__
from bridge.config import ConfigError, Settings, load_settings
from bridge.logs import configure_logging

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

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
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help="TOML settings file (default: $KONPRO_BRIDGE_CONFIG, else ./config.toml if present)",
    )
    parser = argparse.ArgumentParser(
        prog="konpro-bridge",
        description="Receive KonPro webhooks and republish them to RabbitMQ.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="run the bridge daemon")
    run.set_defaults(command=_run)

    check = commands.add_parser(
        "check-config", parents=[common], help="validate settings and print them, secrets masked"
    )
    check.set_defaults(command=_check_config)
    _add_operator_commands(commands, common)
    return parser


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


def _run_async(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed: it roughly doubles what one core can publish."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(coroutine)
    else:
        uvloop.run(coroutine)


# Operator commands: tail, send-test-event -----------------------------------------------------

_T = TypeVar("_T")


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
        return asyncio.run(work)
    except (OSError, aiormq.exceptions.AMQPError, aiohttp.ClientError) as exc:
        detail = Redactor(settings.secrets())(str(exc) or type(exc).__name__)
        print(f"konpro-bridge: {failure}: {detail}", file=sys.stderr)
        raise SystemExit(EXIT_FAILURE) from None
