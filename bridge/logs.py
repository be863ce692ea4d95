"""structlog configuration: one renderer for our own lines and for aiohttp's and aio-pika's.

Every rendered line passes through a redactor that knows the secrets in force, so a secret that
slips into an exception message or a URL is masked before it reaches the stream. Per-delivery
logging sits on the hot path, so the bound logger filters by level before doing any work, and
JSON lines are written once per event-loop turn rather than once each (``LineWriter``).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import select
import sys
import zlib
from collections.abc import Callable, Iterable
from typing import IO, Any, Final, TextIO

import orjson
import structlog
import structlog.tracebacks
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.web import RequestPayloadError
from structlog.typing import EventDict, Processor, WrappedLogger

from bridge.config import MASK, LogSettings

_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_CHATTY_LIBRARIES = ("aiormq", "aio_pika", "asyncio")
_CLIENT_FAULTS = (BadHttpMessage, RequestPayloadError, zlib.error)
"""What aiohttp's server logs as errors although the client caused it."""
_ATOMIC_WRITE: Final = select.PIPE_BUF
"""The most bytes one ``write`` to a pipe puts there whole, never interleaved with another's."""


SHORTEST_SECRET_MASKED_ANYWHERE: Final = 8
"""A shorter secret (an AMQP password such as ``guest`` or ``konpro``) is masked where a URL
carries it, ``:secret@``: masked anywhere, it would mask the bridge's own words that happen to
be spelt the same (``***.api_key is not set``). KonPro's secrets and keys are far longer."""


class Redactor:
    """Replaces every known secret in a rendered line; secrets can be added while running."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._replacements: dict[str, str] = {}
        self._encoded: dict[bytes, bytes] = {}
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str) -> None:
        if not secret:
            return
        escaped = orjson.dumps(secret).decode()[1:-1]  # as it appears inside a JSON string
        for form in {secret, escaped}:
            if len(secret) >= SHORTEST_SECRET_MASKED_ANYWHERE:
                self._replacements[form] = MASK
            else:
                self._replacements[f":{form}@"] = f":{MASK}@"
        self._encoded = {
            needle.encode(): replacement.encode()
            for needle, replacement in self._replacements.items()
        }

    def __call__(self, line: str) -> str:
        for needle, replacement in self._replacements.items():
            if needle in line:
                line = line.replace(needle, replacement)
        return line

    def redact_bytes(self, line: bytes) -> bytes:
        for needle, replacement in self._encoded.items():
            if needle in line:
                line = line.replace(needle, replacement)
        return line


class _RedactingRenderer:
    """The final processor for text output (the console, and the standard library's records)."""

    def __init__(self, renderer: Processor, redactor: Redactor) -> None:
        self._renderer = renderer
        self._redactor = redactor

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        rendered = self._renderer(logger, name, event_dict)
        return self._redactor(rendered if isinstance(rendered, str) else str(rendered))


class LineWriter:
    """Writes the lines logged during one event-loop turn together, at the end of that turn.

    A system call per line was about half of what a delivery's log line cost under load. Lines
    logged while a loop runs wait for the end of its turn (``call_soon``), so they reach the
    stream within the turn they were logged in; a line logged where no loop runs (start-up,
    another thread) is written at once; lines still waiting when the process exits are written
    by ``logging.shutdown()`` through the handler: the standard library runs it at exit, and a
    forked worker, which ends without ``atexit``, calls it itself.
    Each write holds whole lines and at most ``PIPE_BUF`` bytes, so that the lines of several
    worker processes sharing a pipe never interleave mid-line.
    """

    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._waiting: list[bytes] = []
        self._booked: asyncio.AbstractEventLoop | None = None  # whose turn ends with a flush

    def write_line(self, line: bytes) -> None:
        """``line`` ends with a newline."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([line])
            return
        self._waiting.append(line)
        if self._booked is not loop:
            self._booked = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        lines, self._waiting, self._booked = self._waiting, [], None
        if lines:
            self._write(lines)

    def _write(self, lines: list[bytes]) -> None:
        try:
            for chunk in _whole_lines_in_chunks(lines, _ATOMIC_WRITE):
                self._out.write(chunk)
                self._out.flush()
        except (OSError, ValueError):  # the stream is gone (a closed pipe): nowhere to say so
            pass


def _whole_lines_in_chunks(lines: list[bytes], most: int) -> Iterable[bytes]:
    """The lines joined in order, at most ``most`` bytes a chunk (a longer line alone)."""
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > most:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


class _LineWriterLogger:
    """structlog's logger for JSON lines: each rendered line to the ``LineWriter``."""

    def __init__(self, writer: LineWriter) -> None:
        self._writer = writer

    def msg(self, message: bytes) -> None:
        self._writer.write_line(message + b"\n")

    log = debug = info = warn = warning = err = error = critical = exception = failure = fatal = msg


class _LineWriterHandler(logging.Handler):
    """The standard library's records into the same ``LineWriter``, so that the lines keep the
    order they were logged in."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self._writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode(errors="backslashreplace") + b"\n"
            self._writer.write_line(line)
        except Exception:  # noqa: BLE001 - a logging handler reports its own failures
            self.handleError(record)

    def flush(self) -> None:
        """What ``logging.shutdown()`` calls: the lines still waiting are written now."""
        self._writer.flush()


class _RedactingJsonBytes:
    """The final processor for JSON lines: orjson's bytes, redacted, with no decode and encode
    per line on the hot path."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> bytes:
        return self._redactor.redact_bytes(_dumps_bytes(event_dict))


redactor = Redactor()
"""The process-wide redactor; ``configure_logging`` fills it, reconciliation adds learnt secrets."""


def configure_logging(
    settings: LogSettings, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Route structlog and the standard library through one redacting renderer to ``stream``."""
    stream = stream or sys.stderr
    for secret in secrets:
        redactor.add(secret)
    level = _LEVELS[settings.level]
    renderer = _RedactingRenderer(_renderer(settings, stream), redactor)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _stamper(settings, stream),
    ]
    binary = getattr(stream, "buffer", None) if _wants_json(settings, stream) else None
    writer = None if binary is None else LineWriter(binary)
    final: Processor = renderer if writer is None else _RedactingJsonBytes(redactor)
    factory: Callable[..., WrappedLogger] = (
        structlog.PrintLoggerFactory(stream) if writer is None else _logger_factory(writer)
    )
    tracebacks = _format_exceptions(settings, stream)
    structlog.configure(
        processors=[*shared, tracebacks, final],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream) if writer is None else _LineWriterHandler(writer)
    _route_standard_logging(handler, shared, [tracebacks, renderer], level)


def _logger_factory(writer: LineWriter) -> Callable[..., WrappedLogger]:
    logger = _LineWriterLogger(writer)
    return lambda *_: logger


def _renderer(settings: LogSettings, stream: TextIO) -> Processor:
    if _wants_json(settings, stream):
        return structlog.processors.JSONRenderer(serializer=_dumps)
    # Plain tracebacks even where rich is installed: rich's would show every frame's variables.
    return structlog.dev.ConsoleRenderer(
        colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
    )


def _stamper(settings: LogSettings, stream: TextIO) -> Processor:
    """ISO 8601 UTC times; for JSON, orjson renders them, at a quarter of TimeStamper's cost."""
    if _wants_json(settings, stream):
        return _stamp_utc_now
    return structlog.processors.TimeStamper(fmt="iso", utc=True)


def _stamp_utc_now(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    event_dict["timestamp"] = dt.datetime.now(dt.UTC)
    return event_dict


_TRACEBACKS_WITHOUT_LOCALS: Final = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)
"""Frames without their variables: those hold request bodies, and structlog cuts long values
short, so a secret inside one could reach the line as a fragment the redactor cannot know."""


def _format_exceptions(settings: LogSettings, stream: TextIO) -> Processor:
    if _wants_json(settings, stream):
        return _TRACEBACKS_WITHOUT_LOCALS
    return _passthrough


def _passthrough(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    return event_dict


def _wants_json(settings: LogSettings, stream: TextIO) -> bool:
    if settings.format == "auto":
        return not stream.isatty()
    return settings.format == "json"


def _dumps(obj: Any, **_: Any) -> str:
    return _dumps_bytes(obj).decode()


def _dumps_bytes(obj: Any) -> bytes:
    # OPT_UTC_Z: "2026-11-27T05:06:47.509874Z", as TimeStamper(fmt="iso", utc=True) writes it.
    return orjson.dumps(obj, default=str, option=orjson.OPT_UTC_Z)


def _bad_requests_as_warnings(record: logging.LogRecord) -> bool:
    """aiohttp logs every malformed request (a duplicate Host header, a bad Transfer-Encoding,
    a gzip body that is not) as an error with a traceback: anyone can fill the log that way. It
    has answered already; one warning line saying why is enough."""
    exc = record.exc_info[1] if record.exc_info else None
    if record.name == "aiohttp.server" and isinstance(exc, _CLIENT_FAULTS):
        reason = _first_words(exc)
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg, record.args = "bad HTTP request from %s: %s", (remote, reason)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = record.exc_text = None
    return True


_LINK_ECHOES: Final = {
    "aiormq.connection": (
        "error when creating transport",
        "Unexpected connection close from remote",
        "Cancelling cause reader exited abnormally",
        "Server connection %r was stuck",
    ),
    "aio_pika.robust_connection": ("Connection to %s closed.", 'Connection attempt to "%s"'),
}
"""What aiormq and aio-pika say, in their own words, about a broker link going down and each
attempt to bring it back (some of it as errors): the bridge's ``amqp.*`` lines tell the same
story once, with the outage's length. By message template, so that a reworded one is kept."""


class _LinkEchoesAtDebug:
    """Keeps the libraries' account of a broker outage for the debug level only."""

    def __init__(self, level: int) -> None:
        self._shown = level <= logging.DEBUG

    def __call__(self, record: logging.LogRecord) -> bool:
        if not _is_link_echo(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return self._shown


def _is_link_echo(record: logging.LogRecord) -> bool:
    template = record.msg if isinstance(record.msg, str) else ""
    if template.startswith(_LINK_ECHOES.get(record.name, ())):
        return True
    args = record.args if isinstance(record.args, tuple) else ()
    if record.name == "aio_pika.robust_connection" and template.startswith("Reconnect attempt"):
        # aiormq's bare Exception for a link that ended without an error (it flaps): an outage
        # like any other. A named error (a topology the broker refuses) stays an error.
        return len(args) >= 3 and args[1] == "Exception" and str(args[2]) == ""
    # A robust channel's close callback racing the connection's loss: it tries to reopen the
    # channel on a transport that is gone, or the broker ends the connection as it does (after
    # a refusal, aiormq may write a publish on the channel being closed: CHANNEL_ERROR); the
    # robust connection reopens it once reconnected, and amqp.connection_lost says so.
    callback = getattr(args[0], "callback", None) if args else None
    return (
        record.name == "aio_pika.tools"
        and template.startswith("Callback %r error")
        and getattr(callback, "__qualname__", "") == "RobustChannel._on_close"
        and args[1:2] in _LINK_LOST_UNDER_A_CHANNEL
    )


_LINK_LOST_UNDER_A_CHANNEL: Final = frozenset(
    (name,)
    for name in (
        "ChannelInvalidStateError",
        "RuntimeError",
        "ConnectionChannelError",
        "AMQPConnectionError",
    )
)


def _first_words(exc: BaseException) -> str:
    """aiohttp's "400, message:\n  Duplicate 'Host' header found." as its second line."""
    text = str(getattr(exc, "message", "") or exc)
    lines = (line.strip() for line in text.splitlines())
    return next((line for line in lines if line and not line.endswith("message:")), repr(exc))


def _route_standard_logging(
    handler: logging.Handler, shared: list[Processor], last: list[Processor], level: int
) -> None:
    """The standard library's records (aiohttp's, aio-pika's) through ``shared``, then ``last``."""
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *last],
        )
    )
    handler.addFilter(_bad_requests_as_warnings)
    handler.addFilter(_LinkEchoesAtDebug(level))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
