"""What the fixtures and the tests share: the test broker, a test bridge's settings, the
fixtures' factory types, and draining a queue."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Final

from aio_pika.abc import AbstractQueue

from bridge.app import Bridge
from bridge.config import Settings
from tests.support.tcp_proxy import TcpProxy

AMQP_URL = os.environ.get("KONPRO_BRIDGE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BROKER_HOST, BROKER_PORT = "127.0.0.1", 5672

FULL_AT_ONE: Final = {"x-max-length": 1, "x-overflow": "reject-publish"}
"""Arguments of a consumer's queue that holds one message and refuses more: the broker then nacks
each publish routed to it."""

BridgeFactory = Callable[..., AbstractAsyncContextManager[Bridge]]
QueueFactory = Callable[..., Awaitable[AbstractQueue]]


def make_settings(tmp_path: Path, exchange: str, **sections: dict[str, Any]) -> Settings:
    """Settings for a test bridge: a free port, its own exchange and spool, no reconciliation."""
    data: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout": 5.0},
        "amqp": {"url": AMQP_URL, "exchange": exchange, "reconnect_interval": 0.2},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
        "log": {"format": "json"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return Settings.model_validate(data)


def process_sections(
    tmp_path: Path, exchange: str, *, amqp_url: str = AMQP_URL, **sections: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The settings of a bridge run as a process (``BridgeProcess``), as ``make_settings`` gives
    them in-process: its own exchange and spool, no reconciliation, JSON log lines. Each keyword
    adds to its section."""
    data: dict[str, dict[str, Any]] = {
        "amqp": {"url": amqp_url, "exchange": exchange},
        "spool": {"path": str(tmp_path / "spool")},
        "reconcile": {"enabled": False},
        "log": {"format": "json"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return data


def proxied_amqp_url(proxy: TcpProxy) -> str:
    return f"amqp://guest:guest@127.0.0.1:{proxy.port}/"


async def drain(queue: AbstractQueue, *, expect: int, within: float = 5.0) -> list[Any]:
    """Collects exactly ``expect`` messages (acking them), then checks nothing else arrives."""
    messages: list[Any] = []
    deadline = asyncio.get_running_loop().time() + within
    while len(messages) < expect and asyncio.get_running_loop().time() < deadline:
        message = await queue.get(fail=False)
        if message is None:
            await asyncio.sleep(0.02)
            continue
        await message.ack()
        messages.append(message)
    await asyncio.sleep(0.1)
    while (extra := await queue.get(fail=False)) is not None:
        await extra.ack()
        messages.append(extra)
    return messages
