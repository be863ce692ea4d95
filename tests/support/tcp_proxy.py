"""A TCP proxy the tests control, to break the link to the shared broker without touching it."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import Self


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; can cut, hold or slow the link on demand.

    - ``cut()``: drop every connection and refuse new ones, like a broker that went away.
    - ``hold()``: keep connections open but forward nothing, like a broker that stopped answering.
    - ``mute()``: forward to the target, but nothing back: a broker that takes the messages and
      whose confirms do not arrive.
    - ``delay``: seconds added before each forwarded chunk, like a slow network.
    - ``sent_upstream``: bytes the clients have sent towards the target, held ones included.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._answering = asyncio.Event()
        self._answering.set()
        self.port = 0
        self.delay = 0.0
        self.sent_upstream = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await self._drop_links()
        if server is not None:  # after the links: from Python 3.12 on it waits for them
            await server.wait_closed()

    async def restore(self) -> None:
        self.release()
        if self._server is None:
            await self.start()

    def hold(self) -> None:
        self._flowing.clear()

    def mute(self) -> None:
        self._answering.clear()

    def release(self) -> None:
        self._flowing.set()
        self._answering.set()

    async def close(self) -> None:
        await self.cut()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _drop_links(self) -> None:
        for task in list(self._links):
            task.cancel()
        for task in list(self._links):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            self._links.discard(task)
            return
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, upstream=True),
                self._pump(up_reader, writer, upstream=False),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            pass  # cut: the link ends (Python 3.11 logs a cancelled connection handler as an error)
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
            self._links.discard(task)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        while chunk := await reader.read(65536):
            if upstream:
                self.sent_upstream += len(chunk)
            await self._flowing.wait()
            if not upstream:
                await self._answering.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            writer.write(chunk)
            await writer.drain()
        writer.transport.abort()
