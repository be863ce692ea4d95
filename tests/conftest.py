"""Fixtures that start real things: the bridge on a free port, RabbitMQ queues, a TCP proxy."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue, AbstractRobustConnection

from bridge.app import Bridge
from tests.support.harness import (
    AMQP_URL,
    BROKER_HOST,
    BROKER_PORT,
    BridgeFactory,
    QueueFactory,
    make_settings,
    proxied_amqp_url,
)
from tests.support.private_broker import PrivateBroker, can_run_a_private_broker
from tests.support.tcp_proxy import TcpProxy


@pytest.fixture(scope="session")
def private_broker() -> Iterator[PrivateBroker]:
    """A RabbitMQ node of the suite's own, for faults and users the shared broker must not see."""
    if reason := can_run_a_private_broker():
        pytest.skip(reason)
    broker = PrivateBroker()
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture
async def private_queue(
    private_broker: PrivateBroker, exchange_name: str
) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A queue on the private node, bound ``#`` to the test's exchange (declared as the bridge
    declares it)."""
    connection = await aio_pika.connect_robust(private_broker.url)
    channel = await connection.channel()
    exchange = await channel.declare_exchange(
        exchange_name,
        aio_pika.ExchangeType.TOPIC,
        durable=True,
        arguments={"alternate-exchange": f"{exchange_name}.unrouted"},
    )
    queue = await channel.declare_queue(exclusive=True)
    await queue.bind(exchange, "#")
    yield queue
    await connection.close()


@pytest.fixture
async def exchange_name() -> AsyncIterator[str]:
    """The test's own exchange name; what the bridge declares under it is deleted afterwards."""
    name = f"test.{uuid.uuid4().hex[:12]}"
    yield name
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for base in (name, f"{name}.other"):
        for entity in (base, f"{base}.unrouted"):
            await channel.exchange_delete(entity)
            await channel.queue_delete(entity)
    await connection.close()


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


@pytest.fixture
async def channel(amqp: AbstractRobustConnection) -> AbstractChannel:
    """A channel for the test's own queues (exclusive: they go with the connection)."""
    return await amqp.channel()


@pytest.fixture
def bind_queue(channel: AbstractChannel, exchange_name: str) -> QueueFactory:
    """Declares an exclusive queue bound to an exchange (the test's own by default), with the
    queue ``arguments`` given (``FULL_AT_ONE``: one that refuses publishes once it holds one)."""

    async def bind(
        routing_key: str = "#", exchange: str | None = None, arguments: dict[str, Any] | None = None
    ) -> AbstractQueue:
        target = exchange or exchange_name
        await channel.declare_exchange(
            target,
            aio_pika.ExchangeType.TOPIC,
            durable=True,
            arguments={"alternate-exchange": f"{target}.unrouted"},
        )
        queue = await channel.declare_queue(exclusive=True, arguments=arguments)
        await queue.bind(target, routing_key)
        return queue

    return bind


@pytest.fixture
def start_bridge(tmp_path: Path, exchange_name: str) -> BridgeFactory:
    """Starts a bridge in this event loop; waits for the broker unless told not to."""

    @asynccontextmanager
    async def start(
        *, wait_ready: bool = True, **sections: dict[str, Any]
    ) -> AsyncIterator[Bridge]:
        bridge = Bridge(make_settings(tmp_path, exchange_name, **sections))
        await bridge.start()
        try:
            if wait_ready:
                await asyncio.wait_for(bridge.publisher.until_ready(), 10)
            yield bridge
        finally:
            await bridge.stop()

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        yield session


@pytest.fixture
async def broker_proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy(BROKER_HOST, BROKER_PORT) as proxy:
        yield proxy


@pytest.fixture
def start_proxied_bridge(start_bridge: BridgeFactory, broker_proxy: TcpProxy) -> BridgeFactory:
    """Starts a bridge whose link to the broker runs through ``broker_proxy``, for the test to
    cut, hold or slow; its ``amqp`` section adds to the proxied URL."""

    def start(
        *, wait_ready: bool = True, **sections: dict[str, Any]
    ) -> AbstractAsyncContextManager[Bridge]:
        amqp = {"url": proxied_amqp_url(broker_proxy), **sections.pop("amqp", {})}
        return start_bridge(wait_ready=wait_ready, amqp=amqp, **sections)

    return start


@pytest.fixture
def start_bridge_cut_off(
    start_proxied_bridge: BridgeFactory, broker_proxy: TcpProxy
) -> BridgeFactory:
    """Starts a bridge whose link to the broker runs through ``broker_proxy``, cut: the broker
    is down as far as the bridge can tell, until the test calls ``broker_proxy.restore()``."""

    @asynccontextmanager
    async def start(**sections: dict[str, Any]) -> AsyncIterator[Bridge]:
        await broker_proxy.cut()
        async with start_proxied_bridge(wait_ready=False, **sections) as bridge:
            yield bridge

    return start
