"""``konpro-bridge``: the daemon and the operator's commands, all reading the same settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import resource
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from bridge import __version__
from bridge.config import ConfigError, Settings, load_settings
from bridge.events import DeliveryRefused
from bridge.konpro import (
    AuthenticationError,
    Endpoint,
    KonProClient,
    KonProError,
    NotFound,
    format_endpoints,
)
from bridge.logs import configure_logging
from bridge.reconcile import Reconciler, ReconcileResult
from bridge.secret_file import SECRET_FILE_NAME

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
_HEALTHCHECK_TIMEOUT = 2.0  # seconds; below the image's HEALTHCHECK --timeout

if TYPE_CHECKING:
    from bridge.publisher import Publisher
    from bridge.replay_mesh import ReplayLink
    from bridge.spool import Spool

T = TypeVar("T")
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
        parents=[_config_option(default=None)],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    # SUPPRESS: a command's own default must not overwrite a --config given before the command.
    common = _config_option(default=argparse.SUPPRESS)

    run = commands.add_parser("run", parents=[common], help="run the bridge daemon")
    run.set_defaults(command=_run)

    check = commands.add_parser(
        "check-config", parents=[common], help="validate settings and print them, secrets masked"
    )
    check.set_defaults(command=_check_config)
    _add_konpro_commands(commands, common)
    _add_spool_commands(commands, common)
    _add_operator_commands(commands, common)
    return parser


def _config_option(*, default: Any) -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--config",
        type=Path,
        default=default,
        metavar="PATH",
        help="TOML settings file (default: $KONPRO_BRIDGE_CONFIG, else ./config.toml if present)",
    )
    return options


def _run(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log, settings.secrets())
    _allow_all_open_files()
    if settings.server.workers > 1:
        from bridge.workers import Supervisor  # noqa: PLC0415

        return Supervisor(settings, _run_worker, preload=_load_worker_code).run()
    return _run_worker(settings, 0)


def _allow_all_open_files() -> None:
    """Raise the soft limit on open files to the hard one. Containers start programs at 1,024
    (Docker 25+, containerd 2), expecting those that need more to raise it themselves: at the
    limit, every new connection (KonPro's deliveries, its OPTIONS check, the probes) would be
    accepted and closed at once, with nothing said."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    structlog.get_logger(__name__).info("bridge.open_files_limit", limit=soft)


def _load_worker_code() -> None:
    """What ``_run_worker`` imports, for the supervisor to load before it forks the workers."""
    import bridge.app  # noqa: F401, PLC0415

    with contextlib.suppress(ImportError):  # as in _run_async
        import uvloop  # noqa: F401, PLC0415


def _run_worker(settings: Settings, worker: int, replay_link: ReplayLink | None = None) -> int:
    from bridge.app import StartupError, run  # noqa: PLC0415 - keep the network stack lazy
    from bridge.workers import CANNOT_START  # noqa: PLC0415

    try:
        _run_async(run(settings, worker, replay_link))
    except StartupError as exc:
        structlog.get_logger(__name__).error("bridge.cannot_start", error=str(exc))
        return CANNOT_START  # the supervisor of several workers then stops them all
    return EXIT_OK


def _check_config(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    for doubt in settings.doubts():
        print(f"warning: {doubt}", file=sys.stderr)
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
        help="how long to wait for the broker (default: %(default)g s)",
    )
    drain.set_defaults(command=_spool_drain)


def _spool_status(args: argparse.Namespace, settings: Settings) -> int:
    from bridge.spool import FILE_NAME, Spool, SpoolStatus, SpoolUnusable  # noqa: PLC0415
    from bridge.workers import spool_dirs  # noqa: PLC0415

    async def read(path: Path) -> SpoolStatus:
        if not (path / FILE_NAME).exists():
            return SpoolStatus(depth=0, bytes=0, oldest_age=None)
        async with await Spool.open(settings.spool.at(path), exclusive=False) as spool:
            return await spool.status()

    async def read_all() -> dict[Path, SpoolStatus]:
        return {path: await read(path) for path in spool_dirs(settings.spool.path)}

    try:
        statuses = _run_async(read_all())
    except SpoolUnusable as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except OSError as exc:  # say, the daemon's user's directory, mode 0700
        return _fail(f"cannot read the spool at {settings.spool.path}: {exc}", EXIT_FAILURE)
    spools = [{"path": str(path), **dataclasses.asdict(s)} for path, s in statuses.items()]
    every_worker = dataclasses.asdict(SpoolStatus.of_all(statuses.values()))
    total = {"path": str(settings.spool.path), **every_worker, "spools": spools}
    if args.json:
        print(json.dumps(total))
        return EXIT_OK
    oldest = total["oldest_age"]
    print(f"spool:  {total['path']}" + (f" ({len(spools)} workers)" if len(spools) > 1 else ""))
    print(f"depth:  {total['depth']} events")
    if total["parked"]:
        print(f"parked: {total['parked']} of them, refused by the broker (see the daemon's log)")
    print(f"size:   {total['bytes']} bytes")
    print(f"oldest: {'-' if oldest is None else f'{oldest:.0f} s ago'}")
    return EXIT_OK


def _spool_drain(args: argparse.Namespace, settings: Settings) -> int:
    configure_logging(settings.log.model_copy(update={"level": "warning"}), settings.secrets())
    from bridge.publisher import Publisher  # noqa: PLC0415
    from bridge.spool import Spool, SpoolLocked, SpoolUnusable  # noqa: PLC0415

    publisher = Publisher(settings.amqp, max_unsent_bytes=settings.server.max_bytes_in_flight)

    run = _DrainRun()

    async def drain_spools() -> tuple[int, int]:
        _stop_on_signals(run)
        async with contextlib.AsyncExitStack() as opened:
            try:
                spools = [
                    await opened.enter_async_context(await Spool.open(settings.spool.at(path)))
                    for path in _spools_to_drain(settings.spool.path)
                ]
            except OSError as exc:  # say, the daemon's user's directory, mode 0700
                message = f"cannot open the spool at {settings.spool.path}: {exc}"
                raise _CannotDrain(message) from None
            opened.push_async_callback(publisher.close)
            await publisher.start()
            try:
                async with asyncio.timeout(args.wait):
                    await publisher.until_ready()
            except TimeoutError:
                why = publisher.not_ready_reason() or "no answer"
                message = f"no usable broker within {args.wait:g} s ({why}); nothing was drained"
                raise _CannotDrain(message) from None
            return await _drain_for_good(spools, publisher, wait=args.wait, run=run)

    try:
        drained, still_refused = _run_async(drain_spools())
    except SpoolLocked:
        message = "the spool is in use: the daemon is running and drains it itself; stop it first"
        return _fail(message, EXIT_FAILURE)
    except (SpoolUnusable, _CannotDrain) as exc:
        return _fail(str(exc), EXIT_FAILURE)
    except DeliveryRefused as exc:
        return _fail(f"drain stopped: {exc.reason}; the rest stays in the spool", EXIT_FAILURE)
    except asyncio.CancelledError:  # a signal stopped it; an event being forwarded stays too
        print(f"drained {run.drained} events")
        signum = run.stopped_by or signal.SIGINT
        message = f"stopped by {signum.name}: the rest stays in the spool"
        return _fail(message, 128 + signum)
    print(f"drained {drained} events")
    if still_refused:
        message = (
            f"{still_refused} parked events stay in the spool: the broker still refuses them "
            "(raise its max_message_size)"
        )
        return _fail(message, EXIT_FAILURE)
    return EXIT_OK


class _CannotDrain(Exception):
    """Why ``spool drain`` cannot begin, in words for the operator."""


@dataclasses.dataclass
class _DrainRun:
    """How far a drain got, and the signal that stopped it part-way, if one did."""

    drained: int = 0
    stopped_by: signal.Signals | None = None


def _stop_on_signals(run: _DrainRun) -> None:
    """Turn the first SIGINT or SIGTERM into a cancellation of the running task: the drain then
    says how far it got, where a ``KeyboardInterrupt`` would print tracebacks. Later ones are
    let pass: the connection and the spools are being closed."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(signum: signal.Signals) -> None:
        if run.stopped_by is None:
            run.stopped_by = signum
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)


def _spools_to_drain(root: Path) -> list[Path]:
    """Every worker's spool that exists. None at all is more likely a mistyped ``spool.path``
    than a spool that never held anything (the daemon makes it when it starts): say so rather
    than make an empty one and report 0 events drained."""
    from bridge.spool import FILE_NAME  # noqa: PLC0415
    from bridge.workers import spool_dirs  # noqa: PLC0415

    paths = [path for path in spool_dirs(root) if (path / FILE_NAME).exists()]
    if not paths:
        raise _CannotDrain(f"no spool at {root}: nothing to drain (is spool.path right?)")
    return paths


async def _drain_for_good(
    spools: list[Spool], publisher: Publisher, *, wait: float, run: _DrainRun
) -> tuple[int, int]:
    """``forwarder.drain_for_good``, with a progress bar, counting in ``run``."""
    from tqdm import tqdm  # noqa: PLC0415 - a megabyte the daemon does not need

    from bridge.forwarder import drain_for_good, forwarding  # noqa: PLC0415

    async def usable() -> None:
        """Until the channel a refusal cost is back."""
        try:
            async with asyncio.timeout(wait):
                await publisher.until_ready()
        except TimeoutError:
            reason = f"the broker's channel did not come back within {wait:g} s"
            raise DeliveryRefused(reason) from None

    with tqdm(total=sum(s.depth for s in spools), unit="event", desc="draining") as bar:

        def progress(total: int) -> None:
            bar.update(total - run.drained)
            run.drained = total

        return await drain_for_good(
            spools, forwarding(publisher.publish), usable=usable, on_progress=progress
        )


def _run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop where it is installed, else on asyncio's own loop."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


# -- KonPro commands: the webhook registration by hand (issue #3) ------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Output:
    """What a KonPro command prints: ``text`` for people, ``data`` with ``--json``.

    ``error`` is a failure the command still has a report for (a failed reconciliation run).
    """

    text: str
    data: Any
    error: str | None = None


class _Unusable(Exception):
    """The settings or arguments lack what the command needs: exit 2, nothing was asked."""


KonProCall = Callable[[KonProClient, argparse.Namespace, Settings], Awaitable[_Output]]


def _add_konpro_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print one JSON document for scripts")
    leaf = [common, output]

    events = commands.add_parser("events", parents=leaf, help="event types KonPro can deliver")
    events.set_defaults(command=_konpro(_list_event_types))

    endpoints = commands.add_parser(
        "endpoints", parents=[common], help="list, add, update or delete webhook endpoints"
    )
    actions = endpoints.add_subparsers(required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=leaf, help="every endpoint on the account")
    listing.set_defaults(command=_konpro(_list_endpoints))

    add = actions.add_parser("add", parents=leaf, help="register a URL (KonPro checks it first)")
    add.add_argument("url", metavar="URL")
    add.add_argument(
        "--event",
        dest="events",
        action="append",
        metavar="E",
        help="subscribe to event type E (repeatable); without --event: ALL event types",
    )
    add.set_defaults(command=_konpro(_add_endpoint))

    update = actions.add_parser("update", parents=leaf, help="change an endpoint in place")
    update.add_argument("endpoint_id", metavar="ID")
    update.add_argument("--url", metavar="U", help="deliver to U instead (KonPro checks it)")
    subscription = update.add_mutually_exclusive_group()
    subscription.add_argument(
        "--event", dest="events", action="append", metavar="E", help="replace its event types"
    )
    subscription.add_argument("--all-events", action="store_true", help="subscribe to all")
    update.set_defaults(command=_konpro(_update_endpoint))

    delete = actions.add_parser("delete", parents=leaf, help="remove an endpoint")
    delete.add_argument("endpoint_id", metavar="ID")
    delete.set_defaults(command=_konpro(_delete_endpoint))

    reconcile = commands.add_parser(
        "reconcile", parents=leaf, help="make the registration match the settings, once"
    )
    reconcile.add_argument(
        "--once", action="store_true", required=True, help="one run (`run` keeps reconciling)"
    )
    reconcile.add_argument(
        "--dry-run", action="store_true", help="verify mode: print the planned actions only"
    )
    reconcile.set_defaults(command=_konpro(_reconcile_once))


def _konpro(call: KonProCall) -> Command:
    """A command that talks to KonPro: it needs the key; KonPro's refusals are one line, exit 1."""

    def command(args: argparse.Namespace, settings: Settings) -> int:
        if not settings.konpro.api_key.get_secret_value():
            message = "konpro.api_key is not set (config file or KONPRO_BRIDGE_KONPRO__API_KEY)"
            return _fail(message, EXIT_CONFIG)
        _configure_command_logging(settings)
        try:
            output = _run_async(_with_client(call, args, settings))
        except _Unusable as exc:
            return _fail(str(exc), EXIT_CONFIG)
        except AuthenticationError as exc:
            return _fail(f"KonPro refused the API key (konpro.api_key): {exc}", EXIT_FAILURE)
        except KonProError as exc:
            return _fail(str(exc), EXIT_FAILURE)
        print(json.dumps(output.data, indent=2) if args.json else output.text)
        return _fail(output.error, EXIT_FAILURE) if output.error else EXIT_OK

    return command


async def _with_client(call: KonProCall, args: argparse.Namespace, settings: Settings) -> _Output:
    konpro = settings.konpro
    client = KonProClient(konpro.api_url, konpro.api_key, timeout=konpro.request_timeout)
    async with client:
        return await call(client, args, settings)


def _configure_command_logging(settings: Settings) -> None:
    """A one-shot command says what went wrong in one line of its own; the log lines behind it
    (retries, the reconciler's) go to stderr only with ``log.level = "debug"``."""
    level = "debug" if settings.log.level == "debug" else "error"
    configure_logging(settings.log.model_copy(update={"level": level}), settings.secrets())


def _positive(text: str) -> int:
    """An argument that must be a whole number above 0 (argparse names the option)."""
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {text!r}")
    return number


def _fail(message: str, code: int) -> int:
    print(f"konpro-bridge: {message}", file=sys.stderr)
    return code


async def _list_event_types(
    client: KonProClient, args: argparse.Namespace, settings: Settings
) -> _Output:
    event_types = await client.list_event_types()
    return _Output("\n".join(event_types), event_types)


async def _list_endpoints(
    client: KonProClient, args: argparse.Namespace, settings: Settings
) -> _Output:
    endpoints = await client.list_endpoints()
    return _Output(format_endpoints(endpoints), [_as_json(e) for e in endpoints])


async def _add_endpoint(
    client: KonProClient, args: argparse.Namespace, settings: Settings
) -> _Output:
    return _one_endpoint(await client.add_endpoint(args.url, args.events))


async def _update_endpoint(
    client: KonProClient, args: argparse.Namespace, settings: Settings
) -> _Output:
    if args.url is None and args.events is None and not args.all_events:
        raise _Unusable("endpoints update: nothing to change; give --url, --event or --all-events")
    events: list[str] | None = None
    if args.events is not None:
        events = args.events
    elif not args.all_events:  # KonPro replaces the whole list: send the current one back
        events = (await _find_endpoint(client, args.endpoint_id)).events
    updated = await client.update_endpoint(args.endpoint_id, url=args.url, events=events)
    if updated is None:  # KonPro's answer did not describe it: ask for it as it is now
        updated = await _find_endpoint(client, args.endpoint_id)
    return _one_endpoint(updated)


async def _delete_endpoint(
    client: KonProClient, args: argparse.Namespace, settings: Settings
) -> _Output:
    await client.delete_endpoint(args.endpoint_id)
    return _Output(f"deleted {args.endpoint_id}", {"deleted": args.endpoint_id})


async def _reconcile_once(
    client: KonProClient, args: argparse.Namespace, settings: Settings
) -> _Output:
    """One run of the daemon's reconciler; ``--dry-run`` forces verify mode, which never writes."""
    if not settings.konpro.public_url:
        raise _Unusable("konpro.public_url is not set: there is no URL to keep registered")
    mode = "verify" if args.dry_run else settings.reconcile.mode
    schedule = settings.reconcile.model_copy(update={"mode": mode})
    reconciler = Reconciler(
        client, settings.konpro, schedule, settings.spool.path, preview=args.dry_run
    )
    result = await reconciler.run_once()
    text = _describe_run(result, mode, settings.spool.path / SECRET_FILE_NAME)
    return _Output(text, {"mode": mode, **result.to_dict()}, error=result.error)


async def _find_endpoint(client: KonProClient, endpoint_id: str) -> Endpoint:
    for endpoint in await client.list_endpoints():
        if endpoint.endpoint_id == endpoint_id:
            return endpoint
    raise NotFound(f"no endpoint {endpoint_id} on this account")


def _one_endpoint(endpoint: Endpoint) -> _Output:
    return _Output(format_endpoints([endpoint]), _as_json(endpoint))


def _as_json(endpoint: Endpoint) -> Any:
    return endpoint.model_dump(mode="json")  # the signing secret is masked


def _describe_run(result: ReconcileResult, mode: str, secret_file: Path) -> str:
    verify = mode == "verify"
    lines = [
        f"result: {result.kind}" + (" (verify mode: nothing was changed)" if verify else ""),
        f"endpoint: {result.endpoint_id or '-'}",
        ("planned actions:" if verify else "actions taken:") + ("" if result.actions else " none"),
        *(f"  {action}" for action in result.actions),
    ]
    if result.secret_stored:
        lines.append(f"signing secret stored in {secret_file}")
    return "\n".join(lines)


# Operator commands: tail, send-test-event -----------------------------------------------------


def _add_operator_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    tail = commands.add_parser(
        "tail", parents=[common], help="print events as the bridge publishes them"
    )
    watched = tail.add_mutually_exclusive_group()
    watched.add_argument(
        "--bind",
        dest="patterns",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATTERN",
        help="routing key patterns to watch, e.g. '*.fail' (repeatable; default: '#')",
    )
    watched.add_argument(
        "--unrouted",
        action="store_true",
        help="watch the events no queue is bound for (taking nothing away from "
        "<exchange>.unrouted) instead of the exchanges",
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument(
        "--max-events", type=_positive, metavar="N", help="stop after N events (N > 0)"
    )
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

    health = commands.add_parser(
        "healthcheck",
        parents=[common],
        help="ask this host's bridge whether it serves (exit 0) or not (exit 1): for HEALTHCHECK",
    )
    health.add_argument(
        "--ready", action="store_true", help="ask /readyz instead: can it publish right now?"
    )
    health.set_defaults(command=_healthcheck)


def _tail(args: argparse.Namespace, settings: Settings) -> int:
    from bridge import tools  # noqa: PLC0415 - keep check-config free of the network stack
    from bridge.publisher import unrouted_name  # noqa: PLC0415

    patterns = args.patterns or ["#"]

    def announce() -> None:
        if args.unrouted:
            watched = ", ".join(unrouted_name(name) for name in settings.amqp.exchanges)
            print(f"tailing {watched} (Ctrl-C to stop)", file=sys.stderr)
            return
        exchanges = ", ".join(settings.amqp.exchanges)
        print(f"tailing {exchanges} for {' '.join(patterns)} (Ctrl-C to stop)", file=sys.stderr)
        print(
            "while tail runs, events no other queue is bound for come to tail alone, not to "
            "<exchange>.unrouted; to watch those, use tail --unrouted",
            file=sys.stderr,
        )

    work = tools.tail(
        settings,
        patterns,
        args.json,
        sys.stdout,
        max_events=args.max_events,
        duration=args.duration,
        on_ready=announce,
        unrouted=args.unrouted,
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


def _healthcheck(args: argparse.Namespace, settings: Settings) -> int:
    """One GET with the standard library: a container runs this every few seconds."""
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    url = settings.server.local_url("/readyz" if args.ready else "/healthz")
    try:
        # This host's bridge, never through a proxy that HTTP_PROXY may name.
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with direct.open(url, timeout=_HEALTHCHECK_TIMEOUT) as response:
            print(f"{url}: {response.status} {response.read().decode(errors='replace')}")
            return EXIT_OK
    except urllib.error.HTTPError as exc:  # 503 from /readyz: the body says why
        print(f"{url}: {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
    except (OSError, ValueError) as exc:  # refused, timed out, nothing listening
        reason = getattr(exc, "reason", None) or exc
        print(f"{url}: not answering: {reason}", file=sys.stderr)
    return EXIT_FAILURE


def _run_tool(work: Coroutine[Any, Any, T], settings: Settings, failure: str) -> T:
    """Run a tool's coroutine; a network failure exits 1 with one line on stderr, secrets masked."""
    import aiohttp  # noqa: PLC0415
    import aiormq  # noqa: PLC0415

    from bridge.logs import redactor  # noqa: PLC0415

    configure_logging(settings.log, settings.secrets())  # libraries' lines too, secrets masked
    try:
        return _run_async(work)
    except (OSError, aiormq.exceptions.AMQPError, aiohttp.ClientError) as exc:
        detail = redactor(str(exc) or type(exc).__name__)  # knows the settings' secrets now
        raise SystemExit(_fail(f"{failure}: {detail}", EXIT_FAILURE)) from None
