"""Requests no client library would send: bytes written as given, the whole answer read."""

from __future__ import annotations

import asyncio


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection to ``127.0.0.1:port``; read until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    answer = await reader.read()
    writer.close()
    return answer


async def answer_head(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; read the answer's status line and headers only
    (the connection may stay open), then close it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()
