"""Forwarding the spool to the broker: in the background (``Forwarder``) and for ``spool drain``.

Events leave the spool oldest first, each removed only once the broker has confirmed it, so a
stop or a failure part-way costs at most a duplicate under the same message id, never an event.
An event the broker refuses for good is parked (see ``Spool.note_refusal``), so that the events
behind it go on; parked events are tried again now and then, the smallest first.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import structlog

from bridge.config import SpoolSettings
from bridge.events import (
    Delivery,
    DeliveryRefused,
    MessageRefused,
    PublishAbandoned,
    publishable,
)
from bridge.spool import (
    Spool,
    SpooledEvent,
    SpoolError,
    SpoolOpenFailed,
    delete_spool_files,
)
from bridge.tasks import cancel_and_wait, this_task_is_cancelled

Publish = Callable[[Delivery], Awaitable[None]]


class PublishWithin(Protocol):
    """``Publisher.publish``: a delivery, and ``within`` seconds for its confirm."""

    def __call__(self, delivery: Delivery, within: float | None = None) -> Awaitable[None]: ...


FORWARD_WITHIN: Final = 60.0
"""Seconds a spooled event's publish may wait for its confirm. Nobody waits for the answer, unlike
a live delivery's (``amqp.publish_timeout``, kept under KonPro's 10 s): were a broker confirming
more slowly than that to time every forward out, the spool would never drain, and the event at
its head, stored each time all the same, would reach the bus once a retry."""

BATCH_BYTES: Final = 4 * 2**20
"""The most body bytes of the spool read into memory at once to be forwarded (or one event, if
it is larger): a hundred events of 16 MiB would be more than a container has."""

LEFT_BEHIND_POLL_SECONDS: Final = 1.0
"""How soon a left-behind spool is forwarded once the broker is up, or tried again once free."""

_log = structlog.get_logger(__name__)


def forwarding(publish: PublishWithin) -> Publish:
    """``publish`` as the forwarder and ``spool drain`` use it: with ``FORWARD_WITHIN``, and an
    event spooled by an older version made publishable first (see ``events.publishable``),
    rather than fail every time and hold up the events behind it."""

    async def forward(delivery: Delivery) -> None:
        delivery, changes = publishable(delivery)
        if changes:
            _log.warning("spool.event_adjusted", message_id=delivery.message_id, changes=changes)
        await publish(delivery, within=FORWARD_WITHIN)

    return forward


async def drain(
    spool: Spool,
    publish: Publish,
    *,
    batch: int = 100,
    alone: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Publish spooled events oldest first, removing each as soon as ``publish`` returned.

    One at a time, so that the original order holds even across failures, and removed at once,
    so that a process killed part-way publishes again only the event in flight. Returns how many
    were drained. If ``publish`` raises, the drain stops there: that event and all later ones
    stay in the spool, and the exception propagates. An event the broker refuses
    (``MessageRefused``: naming its size, or ``PARK_AFTER`` times; once, when nothing else
    publishes on the channel, ``alone``) is parked first, so that the next drain goes on past
    it. A removal that fails (a full disk) does not stop the drain: the spool counts the event
    as forwarded, and its removal is retried with the next, and at the end, where a failure
    raises. ``on_progress`` is called with the running total after each batch.
    """
    drained = 0
    while entries := await spool.peek(batch, max_bytes=BATCH_BYTES):
        # Once a removal failed (a full disk), the rest of the batch is not tried one by one:
        # it is removed, or counted as forwarded by the spool, at the batch's end.
        held: list[int] = []
        try:
            for entry in entries:
                try:
                    await publish(entry.delivery)
                except Exception as exc:
                    await _note_failure(spool, entry, exc, alone=alone)
                    raise
                drained += 1
                if held or not await _removed(spool, entry.id):
                    held.append(entry.id)
        finally:
            if held:
                with suppress(SpoolError):  # counted as forwarded: retried below
                    await spool.remove(held)
            if on_progress is not None:
                on_progress(drained)
    await spool.retry_removals()  # all published: only deletes that failed are left
    return drained


async def _removed(spool: Spool, event_id: int) -> bool:
    """Remove a forwarded event; whether that worked (if not, the spool counts it forwarded)."""
    try:
        await spool.remove([event_id])
    except SpoolError:
        return False
    return True


async def drain_parked(
    spool: Spool,
    publish: Publish,
    *,
    usable: Callable[[], Awaitable[None]],
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Publish the parked events, oldest first, removing each once published: for
    ``spool drain``, which empties a spool for good. One the broker still refuses stays parked,
    and the next is tried once ``usable()`` returns (the refusal cost the channel). Returns how
    many were drained and how many the broker still refuses; other failures propagate."""
    drained = refused = last = 0
    refused_from = sys.maxsize  # a size the broker refused: any as large would be refused too
    while entries := await spool.peek_parked(100, after=last):
        for entry in entries:
            last, size = entry.id, len(entry.delivery.body)
            if size >= refused_from:
                refused += 1
                continue
            await usable()
            try:
                await publish(entry.delivery)
            except MessageRefused as exc:
                if exc.blames(entry.delivery.body) is False:
                    raise  # not this one's refusal: no verdict, and no usable channel either
                if exc.size is not None:
                    refused_from = min(refused_from, size)
                refused += 1
                continue
            await spool.remove([entry.id])
            drained += 1
            if on_progress is not None:
                on_progress(drained)
    return drained, refused


async def drain_for_good(
    spools: Sequence[Spool],
    publish: Publish,
    *,
    usable: Callable[[], Awaitable[None]],
    on_progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Empty ``spools``: every spool's events, then their parked ones (the broker refused those
    before). For ``spool drain``, the only publisher on its channel: an event the broker
    refuses is parked, and the drain goes on past it once ``usable()`` returns (the refusal cost
    the channel). Returns how many were drained, and how many parked events the broker still
    refuses; ``on_progress`` gets the running total over all the spools."""
    tally = _Tally(on_progress)
    for spool in spools:
        await _drain_past_refusals(spool, publish, usable=usable, tally=tally)
    still_refused = 0
    for spool in spools:
        progress = tally.one_drain()
        _, refused = await drain_parked(spool, publish, usable=usable, on_progress=progress)
        still_refused += refused
    return tally.total, still_refused


async def _drain_past_refusals(
    spool: Spool,
    publish: Publish,
    *,
    usable: Callable[[], Awaitable[None]],
    tally: _Tally,
) -> None:
    while True:
        parked = spool.parked
        try:
            await drain(spool, publish, alone=True, on_progress=tally.one_drain())
            return
        except MessageRefused:
            if spool.parked == parked:
                raise  # the spool could not mark it parked (a full disk): stop here
            await usable()


class _Tally:
    """One running total over several drains, each of which reports its own from 0."""

    def __init__(self, on_progress: Callable[[int], None] | None) -> None:
        self._on_progress = on_progress
        self.total = 0

    def one_drain(self) -> Callable[[int], None]:
        start = self.total

        def update(drained: int) -> None:
            self.total = start + drained
            if self._on_progress is not None:
                self._on_progress(self.total)

        return update


async def _note_failure(
    spool: Spool, entry: SpooledEvent, failure: Exception, *, alone: bool
) -> None:
    """Count the attempt, and park an event the broker keeps refusing: the events behind it
    would otherwise wait until someone changes the broker's settings. A refusal is this event's
    when the broker names its size, or when it was the only publish on the channel."""
    if isinstance(failure, PublishAbandoned):
        return  # the stop's doing: no attempt against the event
    with suppress(SpoolError):  # the count is a hint; the failure is the news
        await spool.record_attempt(entry.id)
    if not isinstance(failure, MessageRefused):
        return
    blamed = failure.blames(entry.delivery.body)
    if blamed is False:
        return  # the broker refused another message in flight on the channel
    try:
        certain = blamed is True or alone
        parked = await spool.note_refusal(entry.id, failure.reason, certain=certain)
    except SpoolError as exc:  # not parked this time; the next refusal tries again
        _log.warning("spool.park_failed", message_id=entry.delivery.message_id, error=exc.reason)
        return
    if parked:
        _log.error(
            "spool.event_parked",
            message_id=entry.delivery.message_id,
            event_type=entry.delivery.event_type,
            bytes=len(entry.delivery.body),
            reason=failure.reason,
            parked=spool.parked,
            detail="the broker refuses it: kept in the spool, set aside so that the events "
            "behind it go on, and tried again later",
        )


class Forwarder:
    """Drains the spool to the broker in the background, whenever there is something to drain
    and the broker is connected; otherwise sleeps until ``notify()``.

    Call ``notify()`` after spooling a delivery, and ``retry_now()`` when the broker becomes
    usable again (a reconnect, a channel restored, a confirm after publishes that got none),
    which also ends a back-off after failures, once per run of them.
    A periodic look every ``poll_interval`` seconds is only a safety net for a missed
    notification. Every ``parked_retry_interval`` seconds (and at the first look) a parked
    event is tried again; once the broker takes one, every parked event is back in line.
    """

    def __init__(
        self,
        spool: Spool,
        publish: Publish,
        *,
        is_connected: Callable[[], bool],
        batch: int = 100,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        poll_interval: float = 30.0,
        parked_retry_interval: float = 600.0,
    ) -> None:
        self._spool = spool
        self._publish = publish
        self._is_connected = is_connected
        self._batch = batch
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._poll_interval = poll_interval
        self._parked_retry = _ParkedRetry(parked_retry_interval)
        self._head: Delivery | None = None  # the event being published, named if it fails
        self._failures_told = 0  # spool.forward_failed lines since forwarding last went through
        self._wake = asyncio.Event()
        self._cut_short = asyncio.Event()  # ends a back-off: a stop, or the broker back
        self._early_retry_spent = False
        self._stopping = asyncio.Event()
        self._emptied = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """An event was spooled: look again now, unless backing off after a failure (each
        delivery spooled while publishing fails would otherwise be one more failed attempt)."""
        self._wake.set()

    def retry_now(self) -> None:
        """The broker is usable again (a reconnect, a channel restored): look again now, even in
        a back-off after failures, but once per run of failures: a broker that closes the
        channel at each publish, and has it reopened at once, would otherwise make a busy loop."""
        self._wake.set()
        if not self._early_retry_spent:
            self._cut_short.set()

    async def until_empty(self) -> None:
        """Return once the forwarder has found the spool empty (after draining it, say)."""
        await self._emptied.wait()

    def start(self) -> None:
        if self._task is None:
            self._stopping.clear()
            self._task = asyncio.create_task(self._run(), name="spool-forwarder")

    async def stop(self, grace: float = 10.0) -> None:
        """Let a drain in progress run for up to ``grace`` seconds, then cancel it.

        Cancelling is safe: an event is removed only after it was published, so the worst case
        is one event published again after restart, under the same message id.
        """
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wake.set()
        self._cut_short.set()
        _done, pending = await asyncio.wait([task], timeout=grace)
        if pending:
            task.cancel()
            await asyncio.wait([task])
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error

    async def _run(self) -> None:
        delay = self._retry_delay
        while not self._stopping.is_set():
            # Before looking, so that a notify() or retry_now() from now on is not lost.
            self._wake.clear()
            self._cut_short.clear()
            parked = self._spool.parked
            try:
                tried = await self._forward()
            # The forwarder outlives any failure, even a CancelledError out of a library's
            # future; only its own cancellation ends it.
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and this_task_is_cancelled():
                    raise
                if self._stopping.is_set() or isinstance(exc, PublishAbandoned):
                    return  # no retry: what is left is the stop's to report (and the next start's)
                if self._parked_meanwhile(before=parked):
                    delay = self._retry_delay  # the event at fault is out of the way now
                else:
                    self._log_failure(exc, retry_in=delay)
                await _wait(self._cut_short, delay)
                self._early_retry_spent = self._early_retry_spent or self._cut_short.is_set()
                delay = min(2 * delay, self._max_retry_delay)
            else:
                if tried:  # a look that found the link down does not end a run of failures
                    delay = self._retry_delay
                    self._early_retry_spent = False
                    self._tell_recovered()
                await _wait(self._wake, self._next_look_in())

    def _log_failure(self, exc: BaseException, *, retry_in: float) -> None:
        """``spool.forward_failed``, naming the event that failed when a publish did: its type
        is the routing key, which leads to the queue that refuses it, if one does."""
        head = self._head
        self._failures_told += 1
        _log.warning(
            "spool.forward_failed",
            error=exc.reason if isinstance(exc, DeliveryRefused) else repr(exc),
            retry_in=retry_in,
            **({"message_id": head.message_id, "event_type": head.event_type} if head else {}),
        )

    def _tell_recovered(self) -> None:
        """End a run of ``spool.forward_failed`` lines with one saying forwarding goes through
        again, at their level: a log read at warning then tells the end of what it told."""
        if self._failures_told:
            _log.warning(
                "spool.forward_recovered",
                failed_attempts=self._failures_told,
                depth=self._spool.depth,
            )
            self._failures_told = 0

    async def _publish_head(self, delivery: Delivery) -> None:
        self._head = delivery
        await self._publish(delivery)
        self._head = None

    def _parked_meanwhile(self, *, before: int) -> bool:
        """Whether the failure parked an event (``spool.event_parked`` says so). If it did, the
        channel's return ends the wait, and the first one parked schedules a retry of parked
        events: were each new one to postpone it, a broker that keeps refusing deliveries
        would never see one tried again."""
        if self._spool.parked <= before:
            return False
        self._early_retry_spent = False
        if not before:
            self._parked_retry.postpone()
        return True

    def _next_look_in(self) -> float:
        """The poll interval, or less when a retry of parked events falls due sooner. One that
        is overdue waits for the link: the broker's return wakes the forwarder."""
        parked_retry_in = self._parked_retry.due_in()
        if self._spool.parked and parked_retry_in > 0:
            return min(self._poll_interval, parked_retry_in)
        return self._poll_interval

    async def _forward(self) -> bool:
        """Drain what there is; ``False`` when there is but the broker is not connected, so
        that nothing was tried."""
        if self._spool.depth:
            if not self._is_connected():
                return False
            # The others first: a parked event is tried once the line behind it is through,
            # and so with no removal pending (see Spool.peek).
            self._head = None
            drained = await drain(self._spool, self._publish_head, batch=self._batch)
            try:
                if self._parked_retry.taken or (
                    self._spool.parked and self._parked_retry.due_in() <= 0
                ):
                    if await self._retry_parked_refused():
                        return True  # the channel is gone: its return wakes the forwarder
                    drained += await drain(self._spool, self._publish_head, batch=self._batch)
            finally:
                if drained:
                    _log.info("spool.drained", count=drained, depth=self._spool.depth)
        if not self._spool.depth:
            self._emptied.set()
        return True

    async def _retry_parked_refused(self) -> bool:
        """Try a parked event again, and if the broker takes it now (its ``max_message_size``
        raised, say), put every parked event back in line. Whether the broker refused it again,
        which cost the channel.

        The next try falls due only after the broker's answer, so a failure of another kind
        (the link, a full disk) is tried again after the usual back-off, not an interval later.
        """
        retry = self._parked_retry
        if not retry.taken:
            event = await self._spool.next_parked(retry.tried)
            if event is None:
                return False
            if await self._still_refused(event):
                return True
            retry.taken = True
            await self._spool.remove([event.id])
        released = await self._spool.unpark_all()
        retry.taken, retry.tried = False, None
        retry.postpone()
        _log.info("spool.parked_released", back_in_line=released)
        return False

    async def _still_refused(self, event: SpooledEvent) -> bool:
        """Publish a parked event; whether the broker refused it again (other failures raise)."""
        try:
            await self._publish(event.delivery)
        except MessageRefused as exc:
            if exc.blames(event.delivery.body) is False:
                raise  # another message in flight was refused: no answer about this one
            # Refused by size: every larger one would be too, so the smallest again next time;
            # after a refusal that names none, the next one in turn.
            named = exc.size is not None
            retry = self._parked_retry
            retry.tried = None if named else (len(event.delivery.body), event.id)
            retry.postpone()
            _log.warning(
                "spool.parked_still_refused",
                parked=self._spool.parked,
                message_id=event.delivery.message_id,
                error=exc.reason,
                retry_in=retry.interval,
            )
            return True
        return False


@dataclass(slots=True)
class _ParkedRetry:
    """When a parked event is tried again, and which: the broker's answer to the last try
    decides the next."""

    interval: float  # spool.parked_retry_interval
    at: float = 0.0  # monotonic; parked events left by the last run: at once
    tried: tuple[int, int] | None = None  # (size, id) of the last one refused, naming no size
    taken: bool = False  # the broker took a parked event; the others wait to be put back in line

    def due_in(self) -> float:
        return self.at - time.monotonic()

    def postpone(self) -> None:
        self.at = time.monotonic() + self.interval


class LeftBehindSpools:
    """Forwards, then deletes, the spools of workers that no longer run (``server.workers`` was
    lowered): a 2xx promised their events too.

    All at once: one whose parked events the broker still refuses must not hold up the others.
    A spool still locked (its old worker still stopping, or a ``spool drain``) is tried again
    every ``LEFT_BEHIND_POLL_SECONDS`` until it is free; one that cannot be used is left, with a
    warning: a restart would not fix it either.
    """

    def __init__(
        self,
        paths: Iterable[Path],
        settings: SpoolSettings,
        publish: PublishWithin,
        *,
        is_connected: Callable[[], bool],
    ) -> None:
        self._paths = list(paths)
        self._settings = settings
        self._publish = forwarding(publish)
        self._is_connected = is_connected
        self._forwarders: dict[Spool, Forwarder] = {}  # the spools open now
        self._task: asyncio.Task[None] | None = None

    @property
    def spools(self) -> list[Spool]:
        """The left-behind spools being forwarded now."""
        return list(self._forwarders)

    def start(self) -> None:
        self._task = asyncio.create_task(self._forward_all(), name="forward-left-behind")

    async def stop(self, grace: float) -> None:
        """Let each forward finish within ``grace`` seconds in all; an event still being
        published then stays in its spool, for the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        for forwarder in list(self._forwarders.values()):
            await forwarder.stop(grace=max(0.0, deadline - loop.time()))
        await cancel_and_wait(self._task)
        self._task = None

    async def _forward_all(self) -> None:
        await asyncio.gather(*(self._forward_when_free(path) for path in self._paths))

    async def _forward_when_free(self, path: Path) -> None:
        try:
            spool = await Spool.open_when_free(
                self._settings.at(path),
                poll_interval=LEFT_BEHIND_POLL_SECONDS,
                on_locked=lambda exc: _log.info(
                    "spool.left_behind_locked", path=str(path), error=str(exc)
                ),
            )
            await self._forward(path, spool)
        except (OSError, SpoolOpenFailed) as exc:
            _log.warning("spool.left_behind_skipped", path=str(path), error=str(exc))

    async def _forward(self, path: Path, spool: Spool) -> None:
        async with spool:
            if spool.depth:
                _log.warning(
                    "spool.left_behind",
                    path=str(path),
                    depth=spool.depth,
                    detail="spooled by a worker that no longer runs; forwarding",
                )
            forwarder = Forwarder(
                spool,
                self._publish,
                is_connected=self._is_connected,
                poll_interval=LEFT_BEHIND_POLL_SECONDS,
                parked_retry_interval=self._settings.parked_retry_interval,
            )
            forwarder.start()
            self._forwarders[spool] = forwarder  # for stop(), with what is left of the grace
            try:
                await forwarder.until_empty()
            finally:
                del self._forwarders[spool]
                await forwarder.stop(grace=0.0)  # returns at once if stop() has stopped it
        delete_spool_files(path)
        _log.info("spool.left_behind_forwarded", path=str(path))


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Wait until ``event`` is set, or ``seconds`` have passed, whichever comes first."""
    with suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
