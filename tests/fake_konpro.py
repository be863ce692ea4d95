"""A fake KonPro webhook API on a real socket: the only KonPro the tests talk to.

It speaks the five calls of ``/work/shared/konpro/api-notes.md`` with their envelope and status
codes, verifies webhook URLs with an OPTIONS request as KonPro does, records every call it gets,
and lets a test program faults (401, 429, 5xx, hangs) or change the account "elsewhere".

Test modules load the fixtures with ``pytest_plugins = ("tests.fake_konpro",)``. They also
import names from here first, too early for pytest to rewrite this module's (absent) asserts:
PYTEST_DONT_REWRITE says so, and keeps pytest from warning about it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from bridge.events import DOCUMENTED_EVENT_TYPES

EVENT_TYPES: Final = DOCUMENTED_EVENT_TYPES
WRITE_CALLS: Final = frozenset({"endpoint.add", "endpoint.update", "endpoint.delete"})
PREFIX: Final = "/v1/webhook/"
JSON_BODY: Final = web.RequestKey("json_body", object)


@dataclass(frozen=True, slots=True)
class Call:
    """One request the fake received, faulted or not."""

    method: str
    path: str
    json: Any
    query: dict[str, str]
    at: float = 0.0  # time.monotonic() when it arrived

    @property
    def name(self) -> str:
        """The call's name as KonPro spells it, e.g. ``endpoint.add``."""
        return self.path.removeprefix(PREFIX)


@dataclass(frozen=True, slots=True)
class Fault:
    """How to answer one call instead of serving it; ``status=None`` means never answer."""

    status: int | None
    retry_after: str | None = None
    body: bytes | None = None
    served: bool = False  # carry the call out first, as behind a gateway that then failed
    only: str | None = None  # the name of the call it is for (None: whichever comes next)


@dataclass(frozen=True, slots=True)
class Answered:
    """How the fake answered one call: ``status`` None if it hung until the fake closed."""

    call: Call
    status: int | None
    retry_after: str | None
    at: float  # time.monotonic() when the answer left


@dataclass(slots=True)
class FakeKonPro:
    """KonPro's webhook API, in memory. ``endpoints`` is the account, keyed by endpoint id."""

    api_key: str = field(default_factory=lambda: "kp_test_" + secrets.token_hex(16))
    validation_timeout: float = 1.0  # KonPro's OPTIONS check allows one second
    list_shape: str = "array"  # or "object": {"endpoints": [...]}
    list_secrets: bool = True  # False: endpoint.list answers with "secret": null
    registration_delay: float = 0.0  # seconds endpoint.add takes after its OPTIONS check
    list_created_at_text: bool = False  # True: endpoint.list gives epoch created_at as ISO text
    username: str = "tester@example.com"
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    verified_urls: list[str] = field(default_factory=list)
    answers: list[Answered] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)  # ids endpoint.add created
    issued_secrets: list[str] = field(default_factory=list)  # every secret ever handed out
    url: str = ""
    _faults: deque[Fault] = field(default_factory=deque)
    _released: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    # -- programming the fake ---------------------------------------------------------------

    def answer_next(
        self,
        count: int,
        status: int,
        *,
        retry_after: str | None = None,
        body: bytes | None = None,
        call: str | None = None,
    ) -> None:
        """Answer the next ``count`` calls with ``status`` instead of serving them.

        The body is ``body`` if given, else KonPro's error envelope for that status; a
        ``Retry-After`` header is added if given. With ``call`` (e.g. ``"endpoint.add"``) only
        calls of that name are answered so; others pass.
        """
        self._faults.extend(Fault(status, retry_after, body, only=call) for _ in range(count))

    def serve_then_fail_next(self, count: int, status: int, *, call: str | None = None) -> None:
        """Carry out the next ``count`` calls, then answer ``status`` as if a gateway in front
        of KonPro had lost the answer: the caller cannot tell whether the call took effect."""
        self._faults.extend(Fault(status, served=True, only=call) for _ in range(count))

    def serve_then_answer_next(
        self, count: int, status: int, *, body: bytes, call: str | None = None
    ) -> None:
        """Carry out the next ``count`` calls, then answer ``status`` with ``body``: the notes
        only infer some answers' shapes, and KonPro may answer otherwise."""
        self._faults.extend(Fault(status, body=body, served=True, only=call) for _ in range(count))

    def hang_next(self, count: int, *, call: str | None = None) -> None:
        """Never answer the next ``count`` calls (until the fake closes)."""
        self._faults.extend(Fault(None, only=call) for _ in range(count))

    def add(
        self,
        url: str,
        events: list[str] | None = None,
        *,
        status: str = "enabled",
        created_at: int | str | None = None,
    ) -> str:
        """Register an endpoint as if someone did it elsewhere: no URL check, no call logged."""
        endpoint_id = secrets.token_hex(16)
        secret = "whsec_" + secrets.token_urlsafe(24)
        self.issued_secrets.append(secret)
        self.endpoints[endpoint_id] = {
            "endpoint_id": endpoint_id,
            "url": url,
            "status": status,
            "events": events,
            "secret": secret,
            "username": self.username,
            "created_at": int(time.time()) if created_at is None else created_at,
        }
        return endpoint_id

    def set_events(self, endpoint_id: str, events: list[str] | None) -> None:
        self.endpoints[endpoint_id]["events"] = events

    def disable(self, endpoint_id: str) -> None:
        self.endpoints[endpoint_id]["status"] = "disabled"

    def delete(self, endpoint_id: str) -> None:
        del self.endpoints[endpoint_id]

    def enable(self, endpoint_id: str) -> None:
        self.endpoints[endpoint_id]["status"] = "enabled"

    def set_url(self, endpoint_id: str, url: str) -> None:
        """Change an endpoint's URL as in the dashboard: no OPTIONS check."""
        self.endpoints[endpoint_id]["url"] = url

    def clear_faults(self) -> None:
        """Forget the faults programmed and not yet used (a call already hanging still hangs)."""
        self._faults.clear()

    @property
    def pending_faults(self) -> int:
        return len(self._faults)

    @property
    def writes(self) -> list[Call]:
        """The calls that asked to change the account."""
        return [call for call in self.calls if call.name in WRITE_CALLS]

    def count(self, name: str) -> int:
        return sum(call.name == name for call in self.calls)

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get(PREFIX + "webhook.list", self._webhook_list)
        app.router.add_get(PREFIX + "endpoint.list", self._endpoint_list)
        app.router.add_post(PREFIX + "endpoint.add", self._endpoint_add)
        app.router.add_patch(PREFIX + "endpoint.update", self._endpoint_update)
        app.router.add_delete(PREFIX + "endpoint.delete", self._endpoint_delete)
        self._runner = await _serve(app)
        self.url = _base_url(self._runner)

    async def close(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    # -- the API ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            body = await request.json() if request.can_read_body else None
        except ValueError:
            body = None
        request[JSON_BODY] = body
        call = Call(request.method, request.path, body, dict(request.query), time.monotonic())
        self.calls.append(call)
        fault = self._next_fault(call.name)
        answer: web.StreamResponse
        if fault is not None and not fault.served:
            answer = await self._fault(fault)
        elif request.headers.get("x-api-key") != self.api_key:
            answer = _error(401, 400112, "Unauthorized")
        else:
            answer = await handler(request)
            answer = answer if fault is None else await self._fault(fault)
        hung = fault is not None and fault.status is None
        status = None if hung else answer.status
        retry_after = answer.headers.get("Retry-After")
        self.answers.append(Answered(call, status, retry_after, time.monotonic()))
        return answer

    def _next_fault(self, name: str) -> Fault | None:
        """The first fault programmed for this call, taken from the queue."""
        for fault in self._faults:
            if fault.only in {None, name}:
                self._faults.remove(fault)
                return fault
        return None

    async def _fault(self, fault: Fault) -> web.Response:
        if fault.status is None:
            await self._released.wait()
            return _error(503, 503, "Fake closed while hanging")
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
        if fault.body is not None:
            return web.Response(status=fault.status, body=fault.body, headers=headers)
        messages = {401: "Unauthorized", 429: "Too Many Requests"}
        code = 400112 if fault.status == 401 else fault.status
        return _error(fault.status, code, messages.get(fault.status, "Internal error"), headers)

    async def _webhook_list(self, request: web.Request) -> web.Response:
        return _ok(list(EVENT_TYPES))

    async def _endpoint_list(self, request: web.Request) -> web.Response:
        listed = [
            {
                **endpoint,
                "secret": endpoint["secret"] if self.list_secrets else None,
                "created_at": _as_text(endpoint["created_at"])
                if self.list_created_at_text
                else endpoint["created_at"],
            }
            for endpoint in self.endpoints.values()
        ]
        return _ok(listed if self.list_shape == "array" else {"endpoints": listed})

    async def _endpoint_add(self, request: web.Request) -> web.Response:
        if not isinstance(body := request[JSON_BODY], dict):
            return _error(400, 40001, "The body must be a JSON object")
        url = body.get("url")
        if not isinstance(url, str) or not url:
            return _error(400, 40001, "Missing required parameter: url")
        if problem := _bad_events(body.get("events")) or await self._verify(url):
            return problem
        await asyncio.sleep(self.registration_delay)  # KonPro writing the registration
        endpoint_id = self.add(url, body.get("events"))
        self.registered.append(endpoint_id)
        return _ok(self.endpoints[endpoint_id])

    async def _endpoint_update(self, request: web.Request) -> web.Response:
        if not isinstance(body := request[JSON_BODY], dict):
            return _error(400, 40001, "The body must be a JSON object")
        endpoint = self.endpoints.get(body.get("endpoint_id", ""))
        if endpoint is None:
            return _error(404, 40004, "Endpoint not found")
        url = body.get("url")
        if url is not None and url != endpoint["url"] and (problem := await self._verify(url)):
            return problem
        if "events" in body and (problem := _bad_events(body["events"])):
            return problem
        if url is not None:
            endpoint["url"] = url
        if "events" in body:
            endpoint["events"] = body["events"]
        return _ok(endpoint)

    async def _endpoint_delete(self, request: web.Request) -> web.Response:
        endpoint_id = request.query.get("endpoint_id")
        if not endpoint_id:
            return _error(400, 40001, "Missing required parameter: endpoint_id")
        if self.endpoints.pop(endpoint_id, None) is None:
            return _error(404, 40004, "Endpoint not found")
        return _ok(None)

    async def _verify(self, url: str) -> web.Response | None:
        """KonPro's registration check: OPTIONS must answer 2xx within the timeout."""
        self.verified_urls.append(url)
        timeout = aiohttp.ClientTimeout(total=self.validation_timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.options(url, allow_redirects=False) as response,
            ):
                if 200 <= response.status < 300:
                    return None
                reason = f"OPTIONS answered HTTP {response.status}"
        except (TimeoutError, aiohttp.ClientError) as exc:
            reason = f"OPTIONS failed: {type(exc).__name__}"
        return _error(400, 400175, f"Invalid parameter: url could not be verified ({reason})")


@dataclass(slots=True)
class WebhookReceiver:
    """A stand-in for the bridge's public URL: answers KonPro's OPTIONS check, counts them."""

    path: str = "/webhooks/konpro"
    options_status: int = 200
    options_delay: float = 0.0  # seconds before each OPTIONS answer (KonPro waits one)
    options_seen: int = 0
    hold_until: int = 0  # answer no OPTIONS before this many have arrived (forces races)
    url: str = ""
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("OPTIONS", self.path, self._options)
        self._runner = await _serve(app)
        self.url = _base_url(self._runner) + self.path

    async def close(self) -> None:
        self._arrived.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _options(self, request: web.Request) -> web.Response:
        self.options_seen += 1
        if self.options_seen >= self.hold_until:
            self._arrived.set()
        await self._arrived.wait()
        if self.options_delay:
            await asyncio.sleep(self.options_delay)
        return web.Response(status=self.options_status)


def _ok(data: Any) -> web.Response:
    return web.json_response({"code": 100, "data": data, "message": "Success"})


def _error(
    status: int, code: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"code": code, "data": None, "message": message}
    return web.json_response(body, status=status, headers=headers)


def _as_text(created_at: Any) -> Any:
    """Epoch seconds as ISO-8601 text, as some KonPro answers give ``created_at``."""
    if isinstance(created_at, int | float):
        return datetime.fromtimestamp(created_at, UTC).isoformat()
    return created_at


def _bad_events(events: Any) -> web.Response | None:
    if events is None:
        return None
    if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
        return _error(400, 400175, "Invalid parameter: events must be a list of strings")
    if unknown := sorted(set(events) - set(EVENT_TYPES)):
        return _error(400, 400175, f"Invalid parameter: unknown events {unknown}")
    return None


async def _serve(app: web.Application) -> web.AppRunner:
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner


def _base_url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


@pytest.fixture
async def fake_konpro() -> AsyncIterator[FakeKonPro]:
    """A running fake KonPro with an empty account."""
    fake = FakeKonPro()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    """A running public URL that passes KonPro's OPTIONS check."""
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.close()
