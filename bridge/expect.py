"""``Expect: 100-continue`` for every request the bridge answers, 404s and 405s included.

aiohttp's own handler answers any other expectation with a 417 that quotes the header, and a
header of invalid UTF-8 (which aiohttp hands over as surrogates) turns that 417 into a 500.
Routes are added with ``add_route``, which gives each ``expect_continue``; ``add_fallback_routes``
gives the paths and methods no route serves a route of their own, since aiohttp's 404 and 405
use its own handler.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.typedefs import Handler

log = structlog.get_logger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

Rejection = Callable[[web.Request, int, str, str], None]
"""Says a request was rejected before its body was sent: request, status, error, detail."""


def _log_rejection(request: web.Request, status: int, error: str, detail: str) -> None:
    log.warning(
        "http.expect_refused", status=status, error=error, path=request.path, remote=request.remote
    )


async def expect_continue(
    request: web.Request, rejected: Rejection = _log_rejection
) -> web.Response | None:
    """Let the client send its body (``None``), or answer now: 413 for a body over the limit,
    before it is sent; 417 for any expectation but ``100-continue``."""
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no 100 Continue; aiohttp ignores the header there too
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        detail = "only Expect: 100-continue is supported"
        return _reject(request, rejected, 417, "expectation_failed", detail)
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        return _reject(request, rejected, 413, "body_too_large", f"body exceeds {limit} bytes")
    await request.writer.write(_CONTINUE)
    request.writer.output_size = 0  # as aiohttp's handler does: the answer has not begun
    return None


def _reject(
    request: web.Request, rejected: Rejection, status: int, error: str, detail: str
) -> web.Response:
    rejected(request, status, error, detail)
    body = orjson.dumps({"error": error, "detail": detail})
    rejection = web.Response(body=body, status=status, content_type="application/json")
    # The body was not asked for. Kept open, the connection would wait for it (aiohttp lingers
    # up to 10 s to drain an unread body), and whatever the client sent next would be read as
    # the rest of this request.
    rejection.force_close()
    return rejection


def add_route(
    app: web.Application,
    method: str,
    path: str,
    handler: Handler,
    rejected: Rejection = _log_rejection,
) -> None:
    """How every route of the bridge is added: with ``expect_continue`` (whose rejections go to
    ``rejected``), and a ``GET`` with ``HEAD`` too, as aiohttp's ``add_get`` does."""
    resource = app.router.add_resource(path)
    expect = partial(expect_continue, rejected=rejected)
    if method == hdrs.METH_GET:
        resource.add_route(hdrs.METH_HEAD, handler, expect_handler=expect)
    resource.add_route(method, handler, expect_handler=expect)


def add_fallback_routes(app: web.Application, options: Handler | None = None) -> None:
    """Route every path (``OPTIONS`` to ``options`` if given) and every method no other route
    takes, to answer 404 or 405 as aiohttp would, but with ``expect_continue``."""
    everything = app.router.add_resource("/{path:.*}")
    if options is not None:
        everything.add_route(hdrs.METH_OPTIONS, options, expect_handler=expect_continue)

    async def not_routed(request: web.Request) -> web.StreamResponse:
        # Every path takes OPTIONS when ``options`` is given: then 405, as aiohttp says.
        allowed = {hdrs.METH_OPTIONS} if options is not None else set()
        for resource in app.router.resources():
            if resource is not everything:
                allowed |= (await resource.resolve(request))[1]
        status = web.HTTPMethodNotAllowed.status_code if allowed else web.HTTPNotFound.status_code
        # A POST is a delivery gone astray (a public_url whose path is not the webhook path, a
        # proxy that rewrites it): KonPro would retry it for a day with nothing else to say so.
        report = log.warning if request.method == hdrs.METH_POST else log.info
        report(
            "http.not_routed",
            method=request.method,
            path=request.path,
            status=status,
            remote=request.remote,
        )
        if not allowed:
            raise web.HTTPNotFound
        raise web.HTTPMethodNotAllowed(request.method, allowed)

    everything.add_route(hdrs.METH_ANY, not_routed, expect_handler=expect_continue)
