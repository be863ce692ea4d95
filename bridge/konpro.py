"""An async client for KonPro's webhook-management API (``/v1/webhook/*``).

Every answer arrives in an envelope, ``{"code": 100, "data": ..., "message": ...}``; the client
unwraps it and turns every failure into one of the ``KonProError`` subclasses below, so callers
never see an aiohttp exception. Transient failures (5xx, 429, timeouts, broken connections) are
retried here with capped exponential back-off and full jitter; the rest are raised at once, since
repeating them cannot help.

The API key lives in a ``SecretStr`` and is read only to build a request header: it never reaches
a log line, an exception or ``repr``.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal, Self

import aiohttp
import orjson
import structlog
from pydantic import (
    BaseModel,
    ConfigDict,
    SecretStr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_serializer,
    field_validator,
)
from yarl import URL

from bridge.config import MASK

log = structlog.get_logger(__name__)

SUCCESS_CODE: Final = 100
AUTH_CODES: Final = frozenset({400112, 40009})
API_KEY_HEADER: Final = "x-api-key"
_MAX_MESSAGE_LENGTH: Final = 300


class KonProError(Exception):
    """KonPro could not do what was asked; the message is safe to log and names the call."""

    retryable: bool = False
    may_have_acted: bool = False
    """Whether KonPro may have done what was asked all the same: repeating a call that is not
    idempotent (``endpoint.add``) could then do it twice."""

    def __init__(
        self,
        message: str,
        *,
        call: str = "",
        status: int | None = None,
        code: int | None = None,
    ) -> None:
        self.message = message
        self.call = call
        self.status = status
        self.code = code
        super().__init__(self._describe())

    def _describe(self) -> str:
        where = f"{self.call}: " if self.call else ""
        http = f"HTTP {self.status} " if self.status is not None else ""
        code = f"code {self.code} " if self.code is not None else ""
        detail = f"{http}{code}".strip()
        return f"{where}{self.message}" + (f" ({detail})" if detail else "")


class AuthenticationError(KonProError):
    """The API key was refused: nothing will work until an operator replaces it."""


class NotFound(KonProError):
    """The endpoint (or the call itself) does not exist on KonPro's side."""


class ValidationFailed(KonProError):
    """KonPro rejected the parameters, including a webhook URL it could not verify."""


class RateLimited(KonProError):
    """HTTP 429; ``retry_after`` is KonPro's requested pause in seconds (0.0 when it gave none)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float, **kwargs: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kwargs)


class ServerError(KonProError):
    """KonPro failed (HTTP 5xx); worth retrying. A gateway may answer 5xx for a call that KonPro
    carried out."""

    retryable = True
    may_have_acted = True


class TransportError(KonProError):
    """No usable answer: timeout, connection failure, or a body that is not a KonPro envelope.

    Only a connection that was never made (``may_have_acted`` false) shows that KonPro did not
    see the call.
    """

    retryable = True

    def __init__(self, message: str, *, may_have_acted: bool = True, **kwargs: Any) -> None:
        self.may_have_acted = may_have_acted
        super().__init__(message, **kwargs)


EndpointStatus = Literal["enabled", "disabled"] | str


class UnexpectedAnswer(KonProError):
    """KonPro answered, in a shape this client does not know: asking again will not help."""


class Endpoint(BaseModel):
    """A registered webhook endpoint, as KonPro describes it; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, hide_input_in_errors=True)

    endpoint_id: str
    url: str
    status: EndpointStatus = "enabled"
    events: list[str] | None = None
    secret: SecretStr | None = None
    username: str | None = None
    created_at: datetime | None = None

    @field_validator("created_at", mode="wrap")
    @classmethod
    def _aware_or_unknown(
        cls, value: Any, handler: ValidatorFunctionWrapHandler
    ) -> datetime | None:
        """A time in a form pydantic does not read (``20250302T094107Z``) is unknown, not an
        error: it only ranks duplicates, and another service's endpoint would otherwise stop
        every reconciliation run. ISO text without an offset is UTC: "oldest" compares it with
        epoch times."""
        try:
            parsed: datetime | None = handler(value)
        except ValidationError:
            return None
        if parsed is not None and parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed

    @field_serializer("secret", when_used="json")
    def _masked_secret(self, value: SecretStr | None) -> str | None:
        return MASK if value is not None and value.get_secret_value() else None

    @property
    def enabled(self) -> bool:
        return self.status == "enabled"


def format_endpoints(endpoints: Sequence[Endpoint]) -> str:
    """A plain-text table for operators; secrets are never shown."""
    header = ("ENDPOINT ID", "STATUS", "CREATED", "EVENTS", "URL")
    rows = [header]
    for endpoint in endpoints:
        created = endpoint.created_at.isoformat(timespec="seconds") if endpoint.created_at else "-"
        events = "all" if endpoint.events is None else ",".join(endpoint.events) or "-"
        rows.append((endpoint.endpoint_id, endpoint.status, created, events, endpoint.url))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    )


class KonProClient:
    """KonPro's webhook API over one ``aiohttp.ClientSession``, which the client owns.

    Use it as an async context manager, or call ``close()`` when done.
    """

    def __init__(
        self,
        api_url: str,
        api_key: SecretStr,
        *,
        timeout: float = 10.0,
        max_attempts: int = 4,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._base = URL(api_url)
        self._api_key = api_key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(api_url={str(self._base)!r})"

    async def __aenter__(self) -> Self:
        self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def list_event_types(self) -> list[str]:
        """The event types KonPro can deliver."""
        data = await self._call("GET", "webhook.list")
        if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
            raise UnexpectedAnswer("expected a list of event types", call="webhook.list")
        return data

    async def list_endpoints(self) -> list[Endpoint]:
        """Every endpoint registered on the account, whichever URL it points to."""
        data = await self._call("GET", "endpoint.list")
        if isinstance(data, dict):  # some deployments wrap the list
            if "endpoints" not in data:  # not an empty account: an answer not understood
                raise UnexpectedAnswer("expected a list of endpoints", call="endpoint.list")
            data = data["endpoints"]
        if data is None:  # an empty account may answer with no list at all
            return []
        if not isinstance(data, list):
            raise UnexpectedAnswer("expected a list of endpoints", call="endpoint.list")
        return [_endpoint(item, "endpoint.list") for item in data]

    async def add_endpoint(self, url: str, events: Sequence[str] | None) -> Endpoint:
        """Register ``url``; ``events=None`` subscribes it to every event type.

        KonPro first sends the URL an OPTIONS request and refuses (``ValidationFailed``) unless it
        answers 2xx within a second. The answer carries the endpoint's signing ``secret``.
        """
        body = {"url": url, "events": _events(events)}
        data = await self._call("POST", "endpoint.add", json=body, idempotent=False)
        return _endpoint(data, "endpoint.add")

    async def update_endpoint(
        self,
        endpoint_id: str,
        *,
        url: str | None = None,
        events: Sequence[str] | None,
    ) -> Endpoint | None:
        """Change an endpoint in place; ``events`` replaces the whole list (``None``: all).
        The endpoint as KonPro answers it, or ``None`` when the answer does not describe it:
        the notes only infer that it does, and the change is made either way."""
        body: dict[str, Any] = {"endpoint_id": endpoint_id, "events": _events(events)}
        if url is not None:
            body["url"] = url
        data = await self._call("PATCH", "endpoint.update", json=body)
        try:
            return Endpoint.model_validate(data)
        except ValidationError:
            return None

    async def delete_endpoint(self, endpoint_id: str) -> None:
        """Remove an endpoint; KonPro stops delivering to it.

        ``NotFound`` means it did not exist, unless an earlier attempt of this call may have
        deleted it (a 5xx from a gateway, a timeout): then the endpoint is gone, as asked.
        """
        params = {"endpoint_id": endpoint_id}
        await self._call("DELETE", "endpoint.delete", params=params, gone_is_done=True)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            # trust_env: HTTPS_PROXY, HTTP_PROXY and NO_PROXY, where egress goes through a proxy.
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=True)
        return self._session

    async def _call(
        self,
        method: str,
        name: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        idempotent: bool = True,
        gone_is_done: bool = False,
    ) -> Any:
        """One API call, retried while the failure is transient and attempts remain; a call that
        is not ``idempotent`` only while KonPro certainly did not act on it. With
        ``gone_is_done`` (a delete), a ``NotFound`` after an attempt that may have acted is the
        call's success."""
        may_have_acted = False
        for attempt in range(1, self._max_attempts + 1):
            try:
                return await self._attempt(method, name, json=json, params=params)
            except NotFound:
                if gone_is_done and may_have_acted:
                    return None
                raise
            except KonProError as exc:
                may_have_acted = may_have_acted or exc.may_have_acted
                delay = self._retry_delay(exc, attempt, idempotent=idempotent)
                if delay is None:
                    raise
                log.warning(
                    "konpro.retry",
                    call=name,
                    attempt=attempt,
                    max_attempts=self._max_attempts,
                    delay=round(delay, 3),
                    error=str(exc),
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt either returns or raises")

    def _retry_delay(self, exc: KonProError, attempt: int, *, idempotent: bool) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` to give up now."""
        if not exc.retryable or attempt >= self._max_attempts:
            return None
        if exc.may_have_acted and not idempotent:
            return None  # the caller looks again before it asks again (the reconciler lists)
        ceiling = min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1))
        delay = random.uniform(0, ceiling)  # full jitter: replicas do not retry in lockstep
        if isinstance(exc, RateLimited):
            if exc.retry_after > self._backoff_max:
                return None  # a long pause belongs to the caller's schedule, not to this call
            delay = max(delay, exc.retry_after)
        return delay

    async def _attempt(
        self,
        method: str,
        name: str,
        *,
        json: Any,
        params: dict[str, str] | None,
    ) -> Any:
        session = self._open()
        url = self._base / "v1" / "webhook" / name
        headers = {API_KEY_HEADER: self._api_key.get_secret_value(), "Accept": "application/json"}
        started = time.monotonic()
        try:
            # Redirects are not followed: aiohttp would forward the API key to the new host.
            async with session.request(
                method, url, json=json, params=params, headers=headers, allow_redirects=False
            ) as response:
                body = await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            # ``from None``: some aiohttp errors hold the request headers, and with them the key.
            unsent = isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
            raise TransportError(
                _exception_text(exc), call=name, may_have_acted=not unsent
            ) from None
        log.debug(
            "konpro.response",
            call=name,
            method=method,
            status=response.status,
            duration=round(time.monotonic() - started, 3),
        )
        return self._unwrap(name, response.status, response.headers, body)

    def _unwrap(self, name: str, status: int, headers: Mapping[str, str], body: bytes) -> Any:
        envelope = _envelope(body)
        code = envelope.get("code") if envelope else None
        code = code if isinstance(code, int) else None
        # Masked before it is cut: a key across the cut would no longer be whole to mask.
        message = self._scrub(_message(envelope, status))[:_MAX_MESSAGE_LENGTH]
        context: dict[str, Any] = {"call": name, "status": status, "code": code}
        success = 200 <= status < 300
        if success and code == SUCCESS_CODE:
            return envelope.get("data") if envelope else None
        if status == 429:
            retry_after = parse_retry_after(headers.get("Retry-After"))
            raise RateLimited(message, retry_after=retry_after, **context)
        if status >= 500:
            raise ServerError(message, **context)
        if status in {401, 403} or code in AUTH_CODES:
            raise AuthenticationError(message, **context)
        if success and code is None:
            raise TransportError("the answer is not a KonPro envelope", **context)
        if status == 404 or "not found" in message.lower():
            raise NotFound(message, **context)
        if success or 400 <= status < 500:
            raise ValidationFailed(message, **context)
        raise KonProError(f"unexpected answer: {message}", **context)

    def _scrub(self, text: str) -> str:
        """Remove the key from text KonPro wrote, in case an error message echoes it."""
        key = self._api_key.get_secret_value()
        return text.replace(key, MASK) if key else text


def parse_retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); 0.0 when unusable."""
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _events(events: Sequence[str] | None) -> list[str] | None:
    return None if events is None else list(events)


def _endpoint(data: Any, call: str) -> Endpoint:
    try:
        return Endpoint.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc'])) or 'object'}: {item['msg']}"
            for item in exc.errors(include_input=False, include_url=False)
        )
        raise TransportError(f"malformed endpoint object ({problems})", call=call) from exc


def _envelope(body: bytes) -> dict[str, Any] | None:
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return decoded if isinstance(decoded, dict) else None


def _message(envelope: dict[str, Any] | None, status: int) -> str:
    message = envelope.get("message") if envelope else None
    if not isinstance(message, str) or not message:
        error = envelope.get("error") if envelope else None
        message = error if isinstance(error, str) and error else f"HTTP {status}"
    return message


def _exception_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer before the timeout"
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
