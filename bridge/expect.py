"""``Expect: 100-continue`` for every route the bridge serves.

aiohttp's own handler answers any other expectation with a 417 that quotes the header, and a
header of invalid UTF-8 (which aiohttp hands over as surrogates) turns that 417 into a 500.
"""

from __future__ import annotations

import orjson
import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

log = structlog.get_logger(__name__)

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def expect_continue(request: web.Request) -> web.Response | None:
    """Let the client send its body (``None``), or answer now: 413 for a body over the limit,
    before it is sent; 417 for any expectation but ``100-continue``."""
    if request.version != HttpVersion11:
        return None  # HTTP/1.0 has no 100 Continue; aiohttp ignores the header there too
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return _refuse(request, 417, "expectation_failed", "only Expect: 100-continue is supported")
    limit = request.client_max_size
    if request.content_length is not None and request.content_length > limit:
        return _refuse(request, 413, "body_too_large", f"body exceeds {limit} bytes")
    await request.writer.write(_CONTINUE)
    request.writer.output_size = 0  # as aiohttp's handler does: the answer has not begun
    return None


def _refuse(request: web.Request, status: int, error: str, detail: str) -> web.Response:
    log.warning(
        "http.expect_refused", status=status, error=error, path=request.path, remote=request.remote
    )
    body = orjson.dumps({"error": error, "detail": detail})
    return web.Response(body=body, status=status, content_type="application/json")
