"""Publishing to RabbitMQ with publisher confirms, and knowing when that is possible.

One robust connection, one confirming channel, many publishes in flight on it. ``publish``
returns only once the broker has confirmed the message; every other ending raises
``PublishFailed`` so that the caller never mistakes "written to a socket" for "stored".

Topology, declared on every (re)connect: each target exchange is a durable topic exchange whose
alternate exchange ``<exchange>.unrouted`` (fanout) feeds a durable queue of the same name, so an
event no service has bound a queue for is kept instead of silently dropped.

Self-healing, for what operators and brokers do to a running bridge: a channel the broker closed
is reopened with its topology (nothing publishes meanwhile), and rebuilt on a new connection if
it does not come back; a message returned as unroutable means part of the topology was deleted,
so it is declared again.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast
from urllib.parse import unquote

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
    ExchangeType,
)
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

from bridge.config import AmqpSettings, Route, masked_url
from bridge.contract import APP_ID, ContractProperties
from bridge.events import Delivery, MessageRefused, PublishAbandoned, PublishFailed
from bridge.metrics import Metrics
from bridge.tasks import cancel_and_wait, this_task_is_cancelled

log = structlog.get_logger(__name__)

UNROUTED_SUFFIX = ".unrouted"
_FIRST_RETRY_DELAY = 0.5
_MAX_CONNECT_DELAY = 30.0
CONNECT_TIMEOUT = 10.0
_CHANNEL_RESTORE_GRACE = 5.0  # seconds a channel the broker closed may take to come back
_REDECLARE_INTERVAL = 5.0  # seconds at least between declaring the topology again after a return
_STILL_DOWN_AT_LEAST_EVERY = 600.0  # seconds at most between reports of a broker link still down
DEFAULT_MAX_UNSENT_BYTES = 64 * 2**20  # server.max_bytes_in_flight's default
_UNSENT_LOOK_INTERVAL = 0.25  # seconds between looks at what the broker has not read yet
_CLOSE_WITHIN = 2.0  # seconds for a close; a broker that reads nothing has its socket aborted


class BrokerUnavailable(PublishFailed):
    """There is no usable broker connection right now."""


def unrouted_name(exchange: str) -> str:
    return exchange + UNROUTED_SUFFIX


class Router:
    """Maps an event type to its exchange: the first matching route's glob wins."""

    def __init__(self, default_exchange: str, routes: tuple[Route, ...]) -> None:
        self._default = default_exchange
        self._routes = routes
        # Bounded: event types come from the network, a hostile sender could invent many.
        self.exchange_for: Callable[[str], str] = functools.lru_cache(maxsize=4096)(self._match)

    def _match(self, event_type: str) -> str:
        for route in self._routes:
            if fnmatch.fnmatchcase(event_type, route.match):
                return route.exchange
        return self._default


class Topology:
    """What the bridge declares on a channel: each target exchange, durable topic, whose
    alternate exchange ``<exchange>.unrouted`` (fanout) feeds a durable queue of that name.

    The robust channel keeps what is declared through it and declares it again after a
    reconnect; one ``Topology`` belongs to one connection's channel.
    """

    def __init__(self, channel: AbstractRobustChannel, exchanges: tuple[str, ...]) -> None:
        self._channel = channel
        self._exchanges = exchanges
        self._unrouted_queues: dict[str, AbstractRobustQueue] = {}

    async def declare(self) -> None:
        """Declare everything; safe to repeat, after someone deleted part of it."""
        for name in self._exchanges:
            await self._channel.declare_exchange(
                unrouted_name(name), ExchangeType.FANOUT, durable=True
            )
            await self._bind(await self._unrouted_queue(name), unrouted_name(name))
            await self._channel.declare_exchange(
                name,
                ExchangeType.TOPIC,
                durable=True,
                arguments={"alternate-exchange": unrouted_name(name)},
            )

    async def _unrouted_queue(self, exchange: str) -> AbstractRobustQueue:
        queue = self._unrouted_queues.get(exchange)
        if queue is None:
            queue = await self._channel.declare_queue(unrouted_name(exchange), durable=True)
            self._unrouted_queues[exchange] = queue
        else:
            # The same queue object again: the robust channel keeps every queue object it
            # hands out, to declare it after a reconnect.
            await queue.declare()
        return queue

    @staticmethod
    async def _bind(queue: AbstractRobustQueue, exchange: str) -> None:
        # By name: the queue keeps its bindings by exchange, and each declaration of an exchange
        # returns a new object.
        await queue.bind(exchange, routing_key="#")


@dataclass
class Outage:
    """A broker link that went down and has not come back, for the log's account of it.

    aio-pika retries every ``reconnect_interval`` and calls back on each failed attempt; the log
    reports the loss once, then attempts 1, 2, 4, 8, ... (and at least every ten minutes), then
    the return with how long it took: an hour's outage at the default interval is under twenty
    lines, not one (with aio-pika's and aiormq's, four) for each of 1,800 attempts.
    """

    started: float
    attempts: int = 0
    reported_at: float = 0.0

    def failed_attempt(self, now: float) -> bool:
        """Count one; whether this one is worth a line."""
        self.attempts += 1
        power_of_two = self.attempts & (self.attempts - 1) == 0
        if power_of_two or now - self.reported_at >= _STILL_DOWN_AT_LEAST_EVERY:
            self.reported_at = now
            return True
        return False

    def lasted(self, now: float) -> float:
        return round(now - self.started, 1)


class _KeptTransport(TransportFactory):
    """aiormq's own TCP or TLS transport, kept in sight. What the broker has not read of what
    the bridge sent is, on this side, the one sign of a broker that blocks publishers (a memory
    or disk alarm: it stops reading), and a close that cannot be written is ended by aborting.
    Publishing does not wait for its frames to be written (see ``Publisher.publish``), so
    without a look here they would pile up unsent for as long as the alarm lasts."""

    def __init__(self, url: URL) -> None:
        tls = url.scheme == "amqps"
        self._opens: TransportFactory = TLSTransportFactory() if tls else TCPTransportFactory()
        self._transport: asyncio.WriteTransport | None = None

    async def create(
        self, url: URL, **kwargs: Any
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._opens.create(url, **kwargs)
        self._transport = writer.transport
        return reader, writer

    def unsent(self) -> int:
        """Bytes written to the current connection that the broker has not taken yet."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return 0
        return transport.get_write_buffer_size()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class Publisher:
    """Owns the AMQP connection; safe to call ``publish`` from many tasks at once.

    At most ``max_unsent_bytes`` of frames the broker has not read are kept: past that (a broker
    that blocks publishers reads nothing), publishes are refused, so spooled, until it reads.
    """

    def __init__(
        self,
        settings: AmqpSettings,
        metrics: Metrics | None = None,
        *,
        max_unsent_bytes: int = DEFAULT_MAX_UNSENT_BYTES,
    ) -> None:
        self._settings = settings
        self._max_unsent = max_unsent_bytes
        self._link: _KeptTransport | None = None
        self._not_reading_since: float | None = None  # wall clock
        self._reading_watch: asyncio.Task[None] | None = None
        self._metrics = metrics or Metrics(exchanges=settings.exchanges)
        self._router = Router(settings.exchange, settings.routes)
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._underlay: aiormq.Channel | None = None
        self._topology_declared = False
        self._why_not_ready: str | None = "connecting to the broker"
        self._connect_task: asyncio.Task[None] | None = None
        self._restore_watch: asyncio.Task[None] | None = None
        self._channel_closed_at = 0.0  # monotonic: when the broker last closed the channel
        self._topology: Topology | None = None
        self._redeclare: asyncio.Task[None] | None = None
        self._redeclared_at = 0.0
        self._on_ready: list[Callable[[], None]] = []
        self._outage: Outage | None = None
        self._abandoned_because: str | None = None
        self._confirms_missed = False  # since the last confirm
        self._confirms_late_since: float | None = None  # wall clock; a publish timed out since
        # Message ids with a publish in flight, each with the publishes waiting for it to end.
        self._in_flight: dict[str, list[asyncio.Future[None]]] = {}
        self._first_attempt_over = asyncio.Event()
        self._became_ready = asyncio.Event()
        self.link_changed_at = time.time()
        """When the link last came up or went down (wall clock), for ``/status``."""

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time the broker becomes usable: the first connect, reconnects,
        a channel restored, and the first confirm after publishes that got none."""
        self._on_ready.append(callback)

    async def start(self) -> None:
        """Begin connecting in the background: a broker that is down at start is not fatal."""
        self._connect_task = asyncio.create_task(self._connect_until_ready(), name="amqp-connect")

    async def until_first_attempt(self) -> None:
        """Until the first attempt to connect has succeeded or failed: from then on, whether a
        delivery can be published is known."""
        await self._first_attempt_over.wait()

    async def until_ready(self) -> None:
        """Until publishing can succeed again: after a channel the broker closed (refusing a
        message, say), or a reconnect."""
        while not self.is_ready:
            self._became_ready.clear()
            await self._became_ready.wait()

    @property
    def is_ready(self) -> bool:
        connection, channel = self._connection, self._channel
        return (
            self._topology_declared
            and connection is not None
            and connection.connected.is_set()
            and channel is not None
            and not channel.is_closed
        )

    def not_ready_reason(self) -> str | None:
        """Why publishing cannot succeed now, or ``None`` when it can."""
        if self.is_ready:
            return None
        return self._why_not_ready or "broker connection lost; reconnecting"

    async def publish(self, delivery: Delivery, within: float | None = None) -> None:
        """Publish and wait for the broker's confirm, all within ``within`` seconds
        (``amqp.publish_timeout`` unless given)."""
        started = time.perf_counter()
        timeout = self._settings.publish_timeout if within is None else within
        message_id = delivery.message_id
        if message_id in self._in_flight:
            timeout = await self._wait_for_same_id(message_id, within=timeout)
        # After any wait: the link may have gone meanwhile, and a reconnect is never waited for.
        channel = self._channel
        if channel is None or not self.is_ready:
            raise BrokerUnavailable(self.not_ready_reason() or "broker unavailable")
        if self._abandoned_because is not None:  # the stop's grace is over: no new confirm waits
            raise PublishAbandoned(self._abandoned_because)
        if self._link is not None and self._link.unsent() > self._max_unsent:
            raise BrokerUnavailable(self._broker_not_reading(self._link))
        exchange_name = self._router.exchange_for(delivery.event_type)
        self._in_flight[message_id] = []
        try:
            # aiormq's timeout covers the whole publish, confirm included; a reconnect is never
            # waited for, since publishing is refused above while the broker is not ready.
            underlay = await self._underlay_of(channel)
            await underlay.basic_publish(
                delivery.body,
                exchange=exchange_name,
                routing_key=delivery.event_type,
                properties=ContractProperties(delivery),
                mandatory=True,
                timeout=timeout,
                # Waiting for the socket write would hold the channel's lock until then and
                # serialise the publishes; the confirm is what matters.
                wait=False,
            )
        except asyncio.CancelledError:
            if this_task_is_cancelled():
                raise
            # The confirm's future was cancelled, not this task: by aiormq when it gave the
            # connection up, or by abandon_confirm_waits.
            raise self._confirm_missed(None, exchange_name) from None
        except Exception as exc:  # noqa: BLE001 - not confirmed, whatever the reason: spooled
            raise self._confirm_missed(exc, exchange_name) from None
        finally:
            for waiting in self._in_flight.pop(message_id):
                if not waiting.done():
                    waiting.set_result(None)
        self._metrics.published(exchange_name, time.perf_counter() - started)
        if self._confirms_missed:
            # A broker silent for a while without disconnecting (a memory alarm, a stalled
            # disk) is back: no reconnect says so, and the forwarder may be backing off.
            self._confirms_missed = False
            self._confirms_resumed()
            self._notify_ready()

    async def _underlay_of(self, channel: AbstractRobustChannel) -> aiormq.Channel:
        """The aiormq channel under the robust one, kept between publishes: aio-pika's Message
        and Exchange layers cost more per publish than the HTTP round trip's own Python work."""
        underlay = self._underlay
        if underlay is None or underlay.is_closed:  # first publish, or after a reconnect
            underlay = self._underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
        return underlay

    async def _wait_for_same_id(self, message_id: str, *, within: float) -> float:
        """Wait until no publish with ``message_id`` is in flight; what is left of ``within``.

        aiormq tells a returned message's publish by its message id, the latest one with it:
        were two in flight (two bodies under one KonPro event id), the return of the first
        would fail the second, and the first's ack would then count as its confirm.
        """
        deadline = time.monotonic() + within
        try:
            async with asyncio.timeout(within):
                while (waiting := self._in_flight.get(message_id)) is not None:
                    turn = asyncio.get_running_loop().create_future()
                    waiting.append(turn)
                    await turn
        except TimeoutError:
            raise PublishFailed("broker did not confirm in time") from None
        return max(0.0, deadline - time.monotonic())

    @property
    def confirms_late_reason(self) -> str | None:
        """Why publishes do not succeed although the link is up, while that lasts: a broker
        that blocks publishers (a memory or disk alarm) keeps the connection and says nothing
        the bridge can see but its silence."""
        if self._confirms_late_since is None:
            return None
        return (
            "the broker has not confirmed publishes in time since "
            f"{_iso_utc(self._confirms_late_since)}: it may block publishers (a memory or disk "
            "alarm; see its log) or be overloaded; deliveries are spooled meanwhile"
        )

    @property
    def not_reading_reason(self) -> str | None:
        """Why publishes are refused although the link is up, while the broker reads nothing."""
        if self._not_reading_since is None:
            return None
        return (
            f"the broker has not read what the bridge sent since "
            f"{_iso_utc(self._not_reading_since)} (over {self._max_unsent} bytes unsent): it "
            "blocks publishers (a memory or disk alarm; see its log) or the link stalls; "
            "deliveries are spooled until it reads again"
        )

    def _broker_not_reading(self, link: _KeptTransport) -> str:
        if self._not_reading_since is None:
            self._not_reading_since = time.time()
            log.warning(
                "amqp.broker_not_reading",
                unsent_bytes=link.unsent(),
                detail=self.not_reading_reason,
            )
            self._reading_watch = asyncio.create_task(
                self._until_reading_again(link), name="amqp-reading-watch"
            )
        return self.not_reading_reason or "the broker reads nothing"

    async def _until_reading_again(self, link: _KeptTransport) -> None:
        """Publish again once the broker has read half of what waited; on another link (a
        reconnect), the new link's state tells."""
        # A look now and then: nothing tells when the transport's buffer drains.
        while link is self._link and link.unsent() > self._max_unsent // 2:  # noqa: ASYNC110
            await asyncio.sleep(_UNSENT_LOOK_INTERVAL)
        since, self._not_reading_since = self._not_reading_since, None
        if link is self._link and since is not None:
            log.warning(
                "amqp.broker_reading_again", not_reading_for_s=round(time.time() - since, 3)
            )
            self._notify_ready()

    def _confirms_late(self) -> None:
        if self._confirms_late_since is None:
            self._confirms_late_since = time.time()
            log.warning("amqp.confirms_late", detail=self.confirms_late_reason)

    def _confirms_resumed(self) -> None:
        if self._confirms_late_since is not None:
            late_for = time.time() - self._confirms_late_since
            self._confirms_late_since = None
            log.warning("amqp.confirms_resumed", late_for_s=round(late_for, 3))

    def _why_not_connected(self, exc: BaseException) -> str:
        return _describe_connect_failure(exc, self._settings.url.get_secret_value())

    def _confirm_missed(self, exc: Exception | None, exchange_name: str) -> PublishFailed:
        """Note that a publish got no confirm (the next confirm then wakes the forwarder; a
        returned message has the topology declared again), and say why, as the error to raise.
        ``exc`` is ``None`` when the wait for the confirm was cancelled under it."""
        self._confirms_missed = True
        if exc is None:
            return self._cancelled_under_the_wait()
        if isinstance(exc, TimeoutError):
            self._confirms_late()
            return PublishFailed("broker did not confirm in time")
        if isinstance(exc, aiormq.exceptions.PublishError):
            # Returned: unroutable although every exchange has an alternate exchange, so part
            # of the topology is gone (say, someone deleted "<exchange>.unrouted").
            self._declare_topology_again()
            return PublishFailed(
                f"broker returned the message: no route on {exchange_name!r}, "
                f"not even to {unrouted_name(exchange_name)!r}"
            )
        if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
            named = _TOO_LARGE.search(str(exc))
            return MessageRefused(
                f"broker refused the message: {_describe(exc)}",
                size=None if named is None else int(named[1]),
            )
        if isinstance(exc, aiormq.exceptions.DeliveryError):
            return PublishFailed(f"broker refused the message: {_describe(exc)}")
        return PublishFailed(f"publish failed: {_describe(exc)}")

    def _cancelled_under_the_wait(self) -> PublishFailed:
        if self._abandoned_because is not None:
            return PublishAbandoned(self._abandoned_because)
        return PublishFailed(f"publish failed: {_LINK_GIVEN_UP}")

    def abandon_confirm_waits(self, reason: str) -> int:
        """Stop waiting for the confirms not yet received: each of those publishes fails with
        ``reason`` (the broker may still store the message). How many there were.

        For a shutdown whose grace period has run out: the deliveries behind them are then
        spooled and answered instead of cut off. A confirm that has arrived is not undone.
        Publishes after this are refused (``PublishAbandoned``), so spooled too: one that was
        waiting its turn behind another with its message id must not wait on.
        """
        underlay = self._underlay
        confirmations = underlay.confirmations.values() if underlay is not None else ()
        waits = [c for c in confirmations if isinstance(c, asyncio.Future) and not c.done()]
        self._abandoned_because = reason
        for confirmation in waits:
            confirmation.cancel()  # as aiormq does when it gives a connection up
        return len(waits)

    async def close(self) -> None:
        for task in (self._redeclare, self._restore_watch, self._connect_task):
            await cancel_and_wait(task)
        await self._discard_connection()
        self._topology_declared = False
        self._why_not_ready = "publisher closed"

    async def _connect_until_ready(self) -> None:
        delay = _FIRST_RETRY_DELAY
        while True:
            try:
                await self._connect_once()
            # Any failure to connect is retried, even a CancelledError out of a library's future
            # (aiormq cancels a channel being opened when it gives the connection up); only this
            # task's own cancellation ends it.
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and this_task_is_cancelled():
                    raise
                self._first_attempt_over.set()
                error = self._why_not_connected(exc)
                self._why_not_ready = f"cannot connect to the broker: {error}"
                log.warning(
                    "amqp.connect_failed",
                    url=masked_url(self._settings.url.get_secret_value()),
                    error=error,
                    retry_in=round(delay, 2),
                )
                await self._discard_connection()
                await asyncio.sleep(delay)
                delay = min(delay * 2, _MAX_CONNECT_DELAY) * random.uniform(0.8, 1.2)
            else:
                self._first_attempt_over.set()
                return

    async def _connect_once(self) -> None:
        # Built here rather than by connect_robust() so that close() can reach a connection that
        # is still connecting: its reconnect task must not outlive the publisher.
        url = aio_pika.connection.make_url(self._settings.url.get_secret_value())
        connection = aio_pika.RobustConnection(
            url,
            client_properties={"connection_name": APP_ID},
            reconnect_interval=self._settings.reconnect_interval,
        )
        # aiormq opens the socket through this (aio-pika hands its connection's kwargs on).
        self._link = connection.kwargs["transport_factory"] = _KeptTransport(url)
        self._connection = connection
        await connection.connect(timeout=CONNECT_TIMEOUT)
        connection.close_callbacks.add(self._connection_lost)
        connection.reconnect_callbacks.add(self._reconnected)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        channel.close_callbacks.add(self._channel_closed)
        channel.reopen_callbacks.add(self._channel_reopened)
        self._topology = Topology(channel, self._settings.exchanges)
        await self._topology.declare()
        self._outage = None
        self._mark_ready()
        log.info(
            "amqp.connected",
            url=masked_url(self._settings.url.get_secret_value()),
            exchanges=list(self._settings.exchanges),
        )

    def _declare_topology_again(self) -> None:
        """Declare the topology again in the background, at most every few seconds."""
        topology = self._topology
        busy = self._redeclare is not None and not self._redeclare.done()
        recent = time.monotonic() - self._redeclared_at < _REDECLARE_INTERVAL
        if topology is None or busy or recent:
            return
        self._redeclared_at = time.monotonic()
        self._redeclare = asyncio.create_task(
            self._redeclare_topology(topology), name="amqp-redeclare"
        )

    async def _redeclare_topology(self, topology: Topology) -> None:
        try:
            await topology.declare()
        except Exception as exc:  # noqa: BLE001 - a failure closes the channel; it is restored
            log.warning("amqp.declare_failed", error=_describe(exc))
            return
        log.warning(
            "amqp.topology_declared_again",
            detail="a message was returned as unroutable: an exchange or queue had been deleted",
            exchanges=list(self._settings.exchanges),
        )
        self._notify_ready()  # the forwarder retries the returned events now

    def _mark_ready(self) -> None:
        self._topology_declared = True
        self._link_changed(None)
        self._notify_ready()

    def _link_changed(self, error: str | None) -> None:
        """The link came up (``None``) or went down for ``error``; ``/status`` shows since when."""
        self._why_not_ready = error
        self.link_changed_at = time.time()

    def _notify_ready(self) -> None:
        self._became_ready.set()
        for callback in self._on_ready:
            callback()

    async def _discard_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        link, self._link = self._link, None
        self._underlay, self._topology = None, None
        await cancel_and_wait(self._reading_watch)
        self._reading_watch = self._not_reading_since = None
        if connection is None:
            return
        # A broker that reads nothing (a memory or disk alarm) would have aiormq wait three
        # heartbeat timeouts to write its Connection.Close: past a moment, the socket is
        # aborted. Nothing unsent is owed: each delivery behind it was spooled when its confirm
        # did not come.
        aborting = None
        if link is not None:
            loop = asyncio.get_running_loop()
            aborting = loop.call_later(_CLOSE_WITHIN, _abort_unread, link)
        try:
            await connection.close()
        except Exception:  # noqa: BLE001, S110 - a connection being let go of
            pass
        finally:
            if aborting is not None:
                aborting.cancel()

    def _connection_lost(self, connection: object, exc: BaseException | None = None) -> None:
        """The link went down, or (with an outage under way) a reconnect attempt failed."""
        if connection is not self._connection:
            return  # closed by us: _discard_connection lets go of it first
        # aiormq closes a connection it gave up on (missed heartbeats) with a CancelledError,
        # and one whose stream simply ended (the broker's end closed cleanly) with nothing.
        error = _LINK_ENDED if exc is None else _describe(exc)
        now = time.monotonic()
        outage = self._outage
        if outage is None:
            self._outage = Outage(started=now, reported_at=now)
            self._link_changed(f"broker connection lost: {error}")
            log.warning(
                "amqp.connection_lost", error=error, retry_every=self._settings.reconnect_interval
            )
            return
        self._why_not_ready = f"broker connection lost; reconnecting failed: {error}"
        if outage.failed_attempt(now):
            log.warning(
                "amqp.still_down",
                error=error,
                attempts=outage.attempts,
                down_for_s=outage.lasted(now),
            )
        else:
            log.debug("amqp.reconnect_failed", error=error, attempts=outage.attempts)

    def _channel_closed(self, channel: object, exc: BaseException | None = None) -> None:
        # The broker closes a channel on an error it blames on a publish (a deleted exchange:
        # NOT_FOUND); the robust channel then opens a new one and declares the topology again.
        # Nothing may publish until it has: a publish to the missing exchange would close the
        # channel again mid-restore, and aio-pika does not restore it a second time.
        if channel is not self._channel:
            return  # a channel of a connection already discarded
        self._topology_declared = False
        connection = self._connection
        if exc is None or connection is None or not connection.connected.is_set():
            return  # closed by us, or with the connection (logged as amqp.connection_lost)
        self._link_changed(f"broker closed the channel: {_describe(exc)}")
        self._channel_closed_at = time.monotonic()
        log.warning("amqp.channel_closed", error=_describe(exc), detail="reopening")
        if self._restore_watch is None or self._restore_watch.done():
            self._restore_watch = asyncio.create_task(
                self._reconnect_unless_restored(), name="amqp-restore-watch"
            )

    def _channel_reopened(self, _: object) -> None:
        self._mark_ready()  # the forwarder may have given up on a closed channel: wake it

    async def _reconnect_unless_restored(self) -> None:
        """Start over with a new connection when the robust channel does not come back within
        the grace after the latest close. A broker that closes it again and again (refusing one
        message after another), and has it back each time, is no channel that stays closed."""
        while True:
            since_closed = time.monotonic() - self._channel_closed_at
            if since_closed < _CHANNEL_RESTORE_GRACE:
                await asyncio.sleep(_CHANNEL_RESTORE_GRACE - since_closed)
                continue
            connection = self._connection
            if self.is_ready or connection is None or not connection.connected.is_set():
                return  # restored, or the connection is down and reconnecting on its own
            break
        log.error(
            "amqp.channel_not_restored",
            error=self._why_not_ready,
            detail="reconnecting with a new connection",
        )
        await self._discard_connection()
        self._connect_task = asyncio.create_task(self._connect_until_ready(), name="amqp-connect")

    def _reconnected(self, _: object) -> None:
        # The robust channel has re-declared the exchanges, queues and bindings it made.
        outage, self._outage = self._outage, None
        self._mark_ready()
        if outage is None:
            log.info("amqp.reconnected")
        else:
            down_for = outage.lasted(time.monotonic())
            # At the level the loss was told at: a log read at warning tells its end too.
            log.warning("amqp.reconnected", down_for_s=down_for, failed_attempts=outage.attempts)


def _abort_unread(link: _KeptTransport) -> None:
    if unsent := link.unsent():
        log.warning(
            "amqp.close_aborted",
            unsent_bytes=unsent,
            detail=f"the broker read nothing for {_CLOSE_WITHIN:g} s: the connection is cut",
        )
    link.abort()


_LINK_GIVEN_UP = "no frames from the broker within the heartbeat timeout (connection given up)"
_LINK_ENDED = "the connection ended"
_TOO_LARGE = re.compile(r"message size (\d+) is larger than configured max size")  # RabbitMQ's


def _describe_connect_failure(exc: BaseException, url: str) -> str:
    """Why a connection could not be opened. aiormq reports a broker that closes the connection
    while it is being opened (RabbitMQ's answer to a vhost it does not have, or one the user may
    not use) as a frame it did not expect, and keeps the broker's words from it."""
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        vhost = unquote(URL(url).raw_path[1:]) or "/"
        return (
            f"the broker closed the connection as it was opened: most likely the vhost "
            f"{vhost!r} (the path of amqp.url, / is %2F) does not exist, or the user may not use it"
        )
    if isinstance(exc, TimeoutError):
        return (
            f"no answer from the broker within {CONNECT_TIMEOUT:g} s: no TCP connection, or "
            "no AMQP handshake on it (a broker starting up or frozen, a firewall or proxy that "
            "holds the connection)"
        )
    parsed = URL(url)
    tls = parsed.scheme == "amqps"  # aiormq reads the TLS files for amqps:// only
    if tls and isinstance(exc, OSError) and (unreadable := _unreadable_tls_file(parsed)):
        return unreadable
    text = _describe(exc)
    if "WRONG_VERSION_NUMBER" in text:  # OpenSSL, for a peer that answered without TLS
        return f"{text}: the port answers without TLS (use amqp://, or the broker's TLS port)"
    if parsed.scheme == "amqp" and "reset" in text.lower():
        return f"{text} (if the port expects TLS, use amqps://; its usual port is 5671)"
    return text


def _unreadable_tls_file(url: URL) -> str | None:
    """The TLS file ``amqp.url`` names that cannot be read, if one cannot: ``ssl`` says only
    ``No such file or directory``, naming no file."""
    for parameter in ("cafile", "certfile", "keyfile"):
        if path := url.query.get(parameter):
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                return f"amqp.url {parameter}={path} cannot be read: {exc.strerror or exc}"
    return None


def _describe(exc: BaseException) -> str:
    if type(exc) is Exception and not str(exc):
        # What aiormq fails pending futures with when a connection ends without an error.
        return _LINK_ENDED
    if isinstance(exc, asyncio.CancelledError):  # aiormq's, of the futures of a link given up
        return _LINK_GIVEN_UP
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300]


def _iso_utc(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")
