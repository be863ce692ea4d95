"""The HTTP side: KonPro's deliveries in, an honest answer out.

A delivery is answered 2xx only once the sink has taken responsibility for it (the broker
confirmed it, or it is durably spooled). Input that is not a KonPro event gets a 4xx naming the
problem and a log line; it never reaches the sink. OPTIONS on any path is answered at once:
KonPro's registration check gives up after one second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Final, Protocol

import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler

from bridge.config import ServerSettings
from bridge.events import (
    EVENT_ID_HEADER,
    Delivery,
    DeliveryRefused,
    InvalidEvent,
    Outcome,
    claimed_event_id,
    forwarded_headers,
    message_id_for,
    parse_event_type,
)
from bridge.expect import add_fallback_routes, add_route
from bridge.metrics import Metrics, NotAccepted
from bridge.signatures import Authenticator, SignatureRejected
from bridge.tasks import this_task_is_cancelled

log = structlog.get_logger(__name__)

_JSON_TYPES: Final = frozenset({"application/json", "application/octet-stream"})
_ALLOW: Final = "POST, OPTIONS"


class EventSink(Protocol):
    """Takes responsibility for a delivery, or refuses it with ``DeliveryRefused``."""

    async def deliver(self, delivery: Delivery) -> Outcome: ...


ReadinessProbe = Callable[[], str | None]
"""Returns why the bridge cannot take deliveries now, or ``None`` when it can."""


class _Rejected(Exception):
    def __init__(
        self,
        status: int,
        error: str,
        detail: str,
        *,
        log_detail: str = "",
        outcome: NotAccepted = "invalid",
    ) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail
        self.log_detail = log_detail or detail
        self.outcome = outcome


class BodiesInFlight:
    """Bounds the bytes of requests held at once: their bodies (being read, checked or published)
    and header fields.

    Each body held costs the process about two and a half times its size (the read buffer, the
    body, its AMQP frames), so a flood of large bodies would otherwise grow the bridge until a
    memory limit kills it. A delivery whose body would pass the bound is refused.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise DeliveryRefused(
                f"{self.held} bytes of requests in flight, {size} more would pass "
                f"server.max_bytes_in_flight ({self.limit})"
            )
        self.held += size

    def give_back(self, size: int) -> None:
        self.held -= size


class WebhookHandler:
    """``POST {webhook_path}``: read, validate, hand to the sink, answer."""

    def __init__(
        self,
        settings: ServerSettings,
        sink: EventSink,
        authenticator: Authenticator,
        metrics: Metrics,
        bodies: BodiesInFlight,
    ) -> None:
        self._settings = settings
        self._sink = sink
        self._authenticator = authenticator
        self._metrics = metrics
        self._bodies = bodies

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        delivery: Delivery | None = None
        try:
            self._check_content_type(request)
            body, held = await self._read_body(request)
            try:
                delivery = self._delivery(body, request)
                outcome = await self._sink.deliver(delivery)
            finally:
                self._bodies.give_back(held)
        except _Rejected as rejected:
            self._metrics.delivery(None, rejected.outcome)
            return self._reject(request, rejected, started)
        except DeliveryRefused as refused:
            return self._refuse(delivery, refused, started)
        self._metrics.delivery(delivery.event_type, outcome)
        log.info(
            "webhook.accepted",
            event_type=delivery.event_type,
            message_id=delivery.message_id,
            outcome=outcome.value,
            duration_ms=_elapsed_ms(started),
        )
        return _json(
            {"status": "accepted", "outcome": outcome.value, "message_id": delivery.message_id},
            status=202 if outcome is Outcome.SPOOLED else 200,
        )

    def rejected_early(self, request: web.Request, status: int, error: str, detail: str) -> None:
        """A delivery rejected before its body was sent (``Expect: 100-continue``) is counted
        and logged as one rejected after."""
        self._metrics.delivery(None, "invalid")
        self._log_rejection(request, status, error, detail, duration_ms=0.0)

    def _delivery(self, body: bytes, request: web.Request) -> Delivery:
        if not body:
            raise _Rejected(400, "invalid_event", "body is empty")
        try:
            self._authenticator.verify(body, request.headers)
        except SignatureRejected as exc:
            # The reason is for our log only: an attacker learns nothing from the answer.
            raise _Rejected(
                401, "unauthorized", "", log_detail=exc.reason, outcome="rejected_signature"
            ) from None
        try:
            event_type = parse_event_type(body)
            message_id = message_id_for(body, request.headers.get(EVENT_ID_HEADER))
            headers = forwarded_headers(request.headers)
        except InvalidEvent as exc:
            raise _Rejected(400, "invalid_event", str(exc)) from None
        return Delivery(event_type, body, message_id, headers)

    def _check_content_type(self, request: web.Request) -> None:
        content_type = request.content_type  # aiohttp's default when absent: octet-stream
        if content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            raise _Rejected(415, "unsupported_media_type", "content type must be application/json")

    async def _read_body(self, request: web.Request) -> tuple[bytes, int]:
        """The body, and what it holds of the bytes in flight, for the caller to give back."""
        limit = self._settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise _body_too_large(limit)
        try:
            if request.content.is_eof():  # it all came with the headers: nothing to wait for
                body = await request.read()
                self._bodies.take(len(body))
                return body, len(body)
            async with asyncio.timeout(self._settings.body_timeout):
                return await self._read_as_it_arrives(request, limit)
        except web.HTTPRequestEntityTooLarge:
            raise _body_too_large(limit) from None
        except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip, and it is not
            encoding = request.headers.get(hdrs.CONTENT_ENCODING, "none")
            raise _Rejected(
                400,
                "undecodable_body",
                f"body could not be decoded (Content-Encoding: {encoding})",
                log_detail=str(exc.__cause__ or exc),
            ) from None
        except TimeoutError:
            raise _Rejected(408, "body_timeout", "request body not received in time") from None
        except ConnectionResetError:  # the client hung up: the answer only goes to the log
            raise _Rejected(
                400, "client_disconnected", "the connection closed before the body was complete"
            ) from None
        except asyncio.CancelledError:
            if this_task_is_cancelled():
                raise
            # aiohttp ends a body still coming when a stop's grace runs out: say so, and answer.
            raise DeliveryRefused(
                "the bridge is stopping: the body did not arrive in time"
            ) from None

    async def _read_as_it_arrives(self, request: web.Request, limit: int) -> tuple[bytes, int]:
        """Counts each part as it arrives: a slow sender holds only what it has sent, and
        cannot keep KonPro's deliveries out by announcing large bodies. The request's header
        fields count too while it waits: up to 128 of ``max_header_bytes``, a megabyte, twice
        that once parsed, held for as long as the sender takes."""
        fields = _header_bytes(request)
        self._bodies.take(fields)
        # One buffer, not a part each: a body sent a byte at a time would otherwise hold some
        # forty bytes of objects for each byte it counts.
        body = bytearray()
        size = 0
        try:
            async for part in request.content.iter_any():
                self._bodies.take(len(part))
                size += len(part)
                if size > limit:
                    raise _body_too_large(limit)
                body += part
        except BaseException:
            self._bodies.give_back(fields + size)
            raise
        return bytes(body), fields + size

    def _refuse(
        self, delivery: Delivery | None, refused: DeliveryRefused, started: float
    ) -> web.Response:
        """503: ``delivery`` is ``None`` when it was refused while its body was read."""
        event_type = delivery.event_type if delivery is not None else None
        self._metrics.delivery(event_type, "refused")
        log.warning(
            "webhook.refused",
            event_type=event_type,
            message_id=delivery.message_id if delivery is not None else None,
            reason=refused.reason,
            duration_ms=_elapsed_ms(started),
        )
        return _json(
            {"status": "unavailable", "detail": "retry later"},
            status=503,
            headers={"Retry-After": str(refused.retry_after)},
        )

    @staticmethod
    def _log_rejection(
        request: web.Request, status: int, error: str, detail: str, *, duration_ms: float
    ) -> None:
        log.warning(
            "webhook.rejected",
            status=status,
            error=error,
            detail=detail,
            event_id=claimed_event_id(request.headers),
            remote=request.remote,
            duration_ms=duration_ms,
        )

    @classmethod
    def _reject(cls, request: web.Request, rejected: _Rejected, started: float) -> web.Response:
        cls._log_rejection(
            request,
            rejected.status,
            rejected.error,
            rejected.log_detail,
            duration_ms=_elapsed_ms(started),
        )
        answer = {"error": rejected.error}
        if rejected.detail:
            answer["detail"] = rejected.detail
        return _json(answer, status=rejected.status)


async def drop_stalled_readers(server: web.Server, *, after: float) -> None:
    """Abort the connections whose client has taken nothing of an answer for ``after`` seconds
    (a client that pipelines requests and reads none of the answers; what it took shows only
    as the transport's buffer shrinks, so one that reads far slower than the kernel's send
    buffer empties looks the same). aiohttp waits to write
    for as long as such a client likes, and the keep-alive timer spares a connection that is
    writing: each would hold a file descriptor, what aiohttp parsed ahead, and a stop, which
    waits for its handlers. Aborted, not closed: a close would wait for the same unsent data."""
    waiting: dict[RequestHandler, tuple[int, float]] = {}  # unsent bytes, and since when
    while True:
        await asyncio.sleep(max(after / 2, 0.5))  # whatever keepalive_timeout: no busy sweep
        now = time.monotonic()
        still: dict[RequestHandler, tuple[int, float]] = {}
        for handler in server.connections:
            if not (unsent := _unsent(handler)):
                continue
            before = waiting.get(handler)
            if before is None or before[0] != unsent:  # new, or the client took some
                still[handler] = (unsent, now)
            elif now - before[1] < after:
                still[handler] = before
            else:
                _drop(handler, unsent, waited_s=after)
        waiting = still


def drop_unsent(server: web.Server) -> None:
    """Abort every connection with an answer its client has not taken: at the end of a stop's
    grace, aiohttp would otherwise wait for it a second time."""
    for handler in server.connections:
        if unsent := _unsent(handler):
            _drop(handler, unsent)


def _unsent(handler: RequestHandler) -> int:
    """Bytes of answers on the connection its client has not taken yet."""
    transport = handler.transport
    return transport.get_write_buffer_size() if transport is not None else 0


def _drop(handler: RequestHandler, unsent: int, **why: float) -> None:
    log.info("http.stalled_reader_dropped", unsent_bytes=unsent, **why)
    if handler.transport is not None:
        handler.transport.abort()


def create_app(
    settings: ServerSettings,
    sink: EventSink,
    readiness: ReadinessProbe,
    authenticator: Authenticator,
    *,
    metrics: Metrics | None = None,
    bodies: BodiesInFlight | None = None,
) -> web.Application:
    """The aiohttp application; the caller owns running it."""
    app = web.Application(client_max_size=settings.max_body_bytes)
    add_fallback_routes(app, options=_options)  # OPTIONS on any path: KonPro's check
    handler = WebhookHandler(
        settings,
        sink,
        authenticator,
        metrics or Metrics(),
        bodies or BodiesInFlight(settings.max_bytes_in_flight),
    )
    add_route(app, "POST", settings.webhook_path, handler.handle, rejected=handler.rejected_early)
    add_route(app, "GET", "/healthz", _healthz)
    add_route(app, "GET", "/readyz", _readyz(readiness))
    return app


async def _options(request: web.Request) -> web.Response:
    return web.Response(status=200, headers={"Allow": _ALLOW})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


def _readyz(readiness: ReadinessProbe) -> Handler:
    async def readyz(request: web.Request) -> web.Response:
        reason = readiness()
        if reason is None:
            return _json({"status": "ready"})
        return _json({"status": "not ready", "reason": reason}, status=503)

    return readyz


def _header_bytes(request: web.Request) -> int:
    """What the request's header fields take, as received (names and values)."""
    return sum(len(name) + len(value) for name, value in request.raw_headers)


def _body_too_large(limit: int) -> _Rejected:
    return _Rejected(413, "body_too_large", f"body exceeds {limit} bytes")


def _json(
    data: Mapping[str, object], *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, headers=headers, content_type="application/json"
    )


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
