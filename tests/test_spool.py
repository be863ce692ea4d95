"""The spool keeps every delivery it accepted, in order, across restarts and crashes."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import os
import shutil
import signal
import sqlite3
import stat
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

import bridge.spool as spool_module
from bridge.config import SpoolSettings
from bridge.events import Delivery, DeliveryRefused
from bridge.forwarder import BATCH_BYTES, Forwarder, drain, forwarding
from bridge.spool import (
    FILE_NAME,
    LOCK_NAME,
    Spool,
    SpoolError,
    SpoolFull,
    SpoolLocked,
    SpoolStatus,
    SpoolUnusable,
    _Database,
)
from tests.support import waiting
from tests.support.deliveries import RECEIVED_AT, delivery, envelope
from tests.support.observing import seen, shown
from tests.support.small_disk import fill_disk, small_disk


def settings(tmp_path: Path, **limits: Any) -> SpoolSettings:
    return SpoolSettings(path=tmp_path / "spool", **limits)


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    async with await Spool.open(settings(tmp_path)) as opened:
        yield opened


async def message_ids(spool: Spool) -> list[str]:
    return [entry.delivery.message_id for entry in await spool.peek(10_000)]


async def fill(spool: Spool, count: int) -> None:
    for n in range(count):
        await spool.append(delivery(n))


async def spool_until_refused(spool: Spool, size: int) -> tuple[int, SpoolError]:
    """Append events of ``size`` bytes until the spool refuses one: how many it took, and why."""
    count = 0
    while True:
        try:
            await spool.append(delivery(count, size=size))
        except SpoolError as refusal:
            return count, refusal
        count += 1


async def eventually(event: asyncio.Event) -> None:
    """Wait for something the code under test must do; the timeout only stops a hang."""
    async with asyncio.timeout(10):
        await event.wait()


class Broker:
    """A stand-in for the publisher: records what it was given, fails or hangs on request."""

    def __init__(self, expect: int = 0) -> None:
        self.published: list[str] = []
        self.connected = True
        self.failures_to_come = 0
        self.failure: BaseException = ConnectionError("broker went away")
        self.hang = False
        self.asked_if_connected = asyncio.Event()
        self.publishing = asyncio.Event()
        self.all_published = asyncio.Event()
        self._expect = expect

    def is_connected(self) -> bool:
        self.asked_if_connected.set()
        return self.connected

    async def publish(self, delivery: Delivery) -> None:
        self.publishing.set()
        if self.hang:
            await asyncio.Event().wait()
        if self.failures_to_come:
            self.failures_to_come -= 1
            raise self.failure
        self.published.append(delivery.message_id)
        if len(self.published) >= self._expect:
            self.all_published.set()


# --- the spool itself -------------------------------------------------------------------------


async def test_events_are_peeked_oldest_first_and_removed_by_id(spool: Spool) -> None:
    await fill(spool, 3)
    entries = await spool.peek(10)
    assert [e.delivery.message_id for e in entries] == ["evt_0", "evt_1", "evt_2"]
    await spool.remove([entries[0].id, entries[2].id])
    assert await message_ids(spool) == ["evt_1"]
    assert spool.depth == 1


async def test_peek_returns_at_most_limit_and_leaves_events_in_place(spool: Spool) -> None:
    await fill(spool, 3)
    assert [e.delivery.message_id for e in await spool.peek(2)] == ["evt_0", "evt_1"]
    assert spool.depth == 3


async def test_a_spooled_delivery_comes_back_exactly_as_it_went_in(spool: Spool) -> None:
    original = Delivery(
        event_type="video_translate.success",
        body=b'{"event_type": "video_translate.success", "event_data": {"x": "\xc3\xa9"}}',
        message_id="evt_42",
        headers={"KonPro-Event-Id": "evt_42", "X-Retry": "2"},
        received_at=1_700_000_123.456789,
    )
    await spool.append(original)
    [entry] = await spool.peek(1)
    assert entry.delivery == original
    assert entry.attempts == 0


async def test_removing_unknown_or_no_ids_changes_nothing(spool: Spool) -> None:
    await fill(spool, 1)
    await spool.remove([])
    await spool.remove([12345])
    assert spool.depth == 1
    assert await message_ids(spool) == ["evt_0"]


async def test_the_spool_directory_is_created_private(tmp_path: Path) -> None:
    nested = SpoolSettings(path=tmp_path / "var" / "spool")
    async with await Spool.open(nested):
        pass
    assert stat.S_IMODE(nested.path.stat().st_mode) == 0o700
    assert (nested.path / FILE_NAME).is_file()


async def test_the_file_is_sqlite_in_wal_mode(spool: Spool) -> None:
    with sqlite3.connect(spool.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_each_commit_is_synced_to_disk(tmp_path: Path) -> None:
    # synchronous=FULL: in WAL mode, NORMAL would let a power cut take back a committed event
    # (one a 202 was given for). It is a setting of the connection, so asked of the spool's own.
    database = _Database.open(tmp_path / "spool")
    try:
        assert database._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        database.close()


async def test_events_survive_close_and_reopen(tmp_path: Path) -> None:
    async with await Spool.open(settings(tmp_path)) as first:
        await fill(first, 3)
    async with await Spool.open(settings(tmp_path)) as second:
        assert await message_ids(second) == ["evt_0", "evt_1", "evt_2"]
        assert second.depth == 3
        assert (await second.status()).bytes == 3 * 16


CHILD = """
import asyncio, sys
from pathlib import Path
from bridge.config import SpoolSettings
from bridge.events import Delivery
from bridge.spool import Spool

async def main():
    spool = await Spool.open(SpoolSettings(path=Path(sys.argv[1])))
    await spool.append(Delivery("avatar_video.success", b"{}", "evt_from_child"))
    print("ok", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.slow
async def test_an_event_committed_by_a_process_then_killed_is_found(tmp_path: Path) -> None:
    path = settings(tmp_path).path
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    assert await child.stdout.readline() == b"ok\n"
    child.send_signal(signal.SIGKILL)
    assert await child.wait() == -signal.SIGKILL

    async with await Spool.open(settings(tmp_path)) as reopened:
        assert await message_ids(reopened) == ["evt_from_child"]
        assert reopened.depth == 1


async def test_a_full_spool_refuses_by_event_count_and_drops_nothing(tmp_path: Path) -> None:
    async with await Spool.open(settings(tmp_path, max_events=2)) as spool:
        await fill(spool, 2)
        with pytest.raises(SpoolFull):
            await spool.append(delivery(2))
        assert await message_ids(spool) == ["evt_0", "evt_1"]


async def test_a_full_spool_refuses_by_bytes_and_drops_nothing(tmp_path: Path) -> None:
    async with await Spool.open(settings(tmp_path, max_bytes=1024)) as spool:
        await spool.append(delivery(0, size=600))
        with pytest.raises(SpoolFull):
            await spool.append(delivery(1, size=600))
        await spool.append(delivery(2, size=424))  # exactly fills it
        assert await message_ids(spool) == ["evt_0", "evt_2"]
        assert (await spool.status()).bytes == 1024


async def test_spool_full_asks_konpro_to_retry_later(tmp_path: Path) -> None:
    async with await Spool.open(settings(tmp_path, max_events=1)) as spool:
        await fill(spool, 1)
        with pytest.raises(DeliveryRefused) as refused:
            await spool.append(delivery(1))
    assert isinstance(refused.value, SpoolFull)
    assert refused.value.retry_after == 30


async def test_removing_events_makes_room_again(tmp_path: Path) -> None:
    async with await Spool.open(settings(tmp_path, max_events=1)) as spool:
        await fill(spool, 1)
        [entry] = await spool.peek(1)
        await spool.remove([entry.id])
        await spool.append(delivery(1))
        assert await message_ids(spool) == ["evt_1"]


async def test_concurrent_appends_cannot_overshoot_the_limit(tmp_path: Path) -> None:
    async with await Spool.open(settings(tmp_path, max_events=3)) as spool:
        results = await asyncio.gather(
            *(spool.append(delivery(n)) for n in range(5)), return_exceptions=True
        )
        assert [type(r).__name__ for r in results] == ["NoneType"] * 3 + ["SpoolFull"] * 2
        assert spool.depth == 3


async def test_concurrent_appends_are_all_committed_in_call_order(spool: Spool) -> None:
    await asyncio.gather(*(spool.append(delivery(n)) for n in range(500)))
    assert await message_ids(spool) == [f"evt_{n}" for n in range(500)]
    assert spool.depth == 500


async def test_concurrent_appends_share_transactions(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    commits: list[int] = []
    insert = _Database.insert

    def counting_insert(self: _Database, deliveries: Sequence[Delivery]) -> None:
        commits.append(len(deliveries))
        insert(self, deliveries)

    monkeypatch.setattr(_Database, "insert", counting_insert)
    await asyncio.gather(*(spool.append(delivery(n)) for n in range(500)))
    assert sum(commits) == 500
    assert len(commits) < 500


async def test_a_failed_write_refuses_the_delivery_and_the_spool_recovers(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_insert(self: _Database, deliveries: Sequence[Delivery]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(_Database, "insert", failing_insert)
        with pytest.raises(SpoolError, match="disk I/O error") as refused:
            await spool.append(delivery(0))
    assert refused.value.retry_after == 30
    assert spool.depth == 0
    await spool.append(delivery(1))
    assert await message_ids(spool) == ["evt_1"]


async def test_status_reports_depth_bytes_and_age_of_the_oldest(tmp_path: Path) -> None:
    async with await Spool.open(settings(tmp_path), clock=lambda: RECEIVED_AT) as spool:
        assert await spool.status() == SpoolStatus(depth=0, bytes=0, oldest_age=None)
        await spool.append(delivery(0, size=10, received_at=RECEIVED_AT - 90))
        await spool.append(delivery(1, size=20, received_at=RECEIVED_AT - 30))
        assert await spool.status() == SpoolStatus(depth=2, bytes=30, oldest_age=90.0)


async def test_a_closed_spool_refuses_to_be_used(tmp_path: Path) -> None:
    spool = await Spool.open(settings(tmp_path))
    await spool.close()
    await spool.close()  # closing twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        await spool.append(delivery(0))


async def test_closing_waits_for_appends_in_flight(tmp_path: Path) -> None:
    spool = await Spool.open(settings(tmp_path))
    appends = asyncio.gather(*(spool.append(delivery(n)) for n in range(50)))
    await asyncio.sleep(0)  # let every append queue up
    await spool.close()
    await appends
    async with await Spool.open(settings(tmp_path)) as reopened:
        assert reopened.depth == 50


# --- a disk that fills up --------------------------------------------------------------------


async def test_the_spool_keeps_free_disk_space_in_reserve_and_says_so(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    async with await Spool.open(settings(tmp_path, min_free_bytes=free + 2**30)) as spool:
        assert (spool.why_full() or "").startswith("disk nearly full")
        with pytest.raises(SpoolFull, match="disk nearly full") as refused:
            await spool.append(delivery(0))
        assert refused.value.retry_after == 30
        assert spool.depth == 0
    async with await Spool.open(settings(tmp_path, min_free_bytes=0)) as spool:
        await spool.append(delivery(0))  # 0: no reserve
        assert spool.depth == 1


async def test_a_spool_that_fills_its_disk_stops_short_drains_and_takes_events_again(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "disk", 24 * 2**20) as disk:
        async with await Spool.open(SpoolSettings(path=disk / "spool")) as spool:
            spooled, refusal = await spool_until_refused(spool, size=65_536)
            assert isinstance(refusal, SpoolFull)
            assert "disk nearly full" in refusal.reason
            assert spooled > 0
            broker = Broker()
            assert await drain(spool, broker.publish) == spooled
            assert broker.published == [f"evt_{n}" for n in range(spooled)]
            assert spool.depth == 0
            # What the drained events left inside the file is reused: the spool takes them again.
            await fill(spool, spooled)
            assert spool.depth == spooled


async def test_on_a_full_disk_draining_publishes_each_event_once_and_removes_them_later(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "disk", 2 * 2**20) as disk:
        spool_settings = SpoolSettings(path=disk / "spool", min_free_bytes=0)
        async with await Spool.open(spool_settings) as spool:
            await fill(spool, 6)
            filler = fill_disk(disk)  # someone else filled the disk
            broker = Broker()
            with pytest.raises(SpoolError, match="full"):
                await drain(spool, broker.publish, batch=4)  # published 4, cannot remove them
            with pytest.raises(SpoolError, match="full"):
                await drain(spool, broker.publish, batch=4)  # the other 2, not the same again
            with pytest.raises(SpoolError, match="full"):
                await drain(spool, broker.publish, batch=4)  # nothing left but the deletes
            assert broker.published == [f"evt_{n}" for n in range(6)]
            assert spool.depth == 6  # nothing removed yet, nothing lost

            filler.unlink()
            assert await drain(spool, broker.publish, batch=4) == 0
            assert broker.published == [f"evt_{n}" for n in range(6)]
            assert spool.depth == 0
            await spool.append(delivery(6))  # and the spool writes again
        async with await Spool.open(spool_settings) as reopened:
            assert await message_ids(reopened) == ["evt_6"]


async def test_a_healthy_spool_on_a_full_disk_is_not_called_corrupt(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", 2**20) as disk:
        spool_settings = SpoolSettings(path=disk / "spool", min_free_bytes=0)
        async with await Spool.open(spool_settings) as spool:
            await fill(spool, 3)
        filler = fill_disk(disk)
        with pytest.raises(SpoolUnusable) as refused:
            await Spool.open(spool_settings)
        assert "its disk is full" in str(refused.value)
        assert "move it aside" not in str(refused.value)
        filler.unlink()
        async with await Spool.open(spool_settings) as spool:
            assert await message_ids(spool) == ["evt_0", "evt_1", "evt_2"]


# --- drain -----------------------------------------------------------------------------------


async def test_drain_publishes_oldest_first_and_empties_the_spool(spool: Spool) -> None:
    await fill(spool, 5)
    broker = Broker()
    progress: list[int] = []
    drained = await drain(spool, broker.publish, batch=2, on_progress=progress.append)
    assert drained == 5
    assert broker.published == [f"evt_{n}" for n in range(5)]
    assert progress == [2, 4, 5]
    assert spool.depth == 0
    assert await spool.peek(10) == []


async def test_draining_an_empty_spool_publishes_nothing(spool: Spool) -> None:
    broker = Broker()
    assert await drain(spool, broker.publish) == 0
    assert broker.published == []


async def test_drain_stops_at_the_first_failure_and_keeps_the_rest(spool: Spool) -> None:
    await fill(spool, 5)
    published: list[str] = []

    async def publish(delivery: Delivery) -> None:
        if delivery.message_id == "evt_2":
            raise ConnectionError("broker went away")
        published.append(delivery.message_id)

    with pytest.raises(ConnectionError):
        await drain(spool, publish)
    assert published == ["evt_0", "evt_1"]
    remaining = await spool.peek(10)
    assert [e.delivery.message_id for e in remaining] == ["evt_2", "evt_3", "evt_4"]
    assert [e.attempts for e in remaining] == [1, 0, 0]


async def test_drain_removes_an_event_only_after_it_was_published(spool: Spool) -> None:
    await fill(spool, 2)
    seen_in_spool: list[list[str]] = []

    async def publish(delivery: Delivery) -> None:
        seen_in_spool.append(await message_ids(spool))

    await drain(spool, publish, batch=1)
    assert seen_in_spool == [["evt_0", "evt_1"], ["evt_1"]]


# --- Forwarder -------------------------------------------------------------------------------


async def test_forwarder_drains_what_was_spooled_before_it_started(spool: Spool) -> None:
    await fill(spool, 3)
    broker = Broker(expect=3)
    forwarder = Forwarder(spool, broker.publish, is_connected=broker.is_connected)
    forwarder.start()
    await eventually(broker.all_published)
    await forwarder.stop()
    assert broker.published == ["evt_0", "evt_1", "evt_2"]
    assert spool.depth == 0


async def test_forwarder_drains_when_notified(spool: Spool) -> None:
    broker = Broker(expect=3)
    forwarder = Forwarder(spool, broker.publish, is_connected=broker.is_connected)
    forwarder.start()
    await fill(spool, 3)
    forwarder.notify()
    await eventually(broker.all_published)
    await forwarder.stop()
    assert broker.published == ["evt_0", "evt_1", "evt_2"]
    assert spool.depth == 0


async def test_forwarder_waits_while_the_broker_is_disconnected(spool: Spool) -> None:
    await fill(spool, 2)
    broker = Broker(expect=2)
    broker.connected = False
    forwarder = Forwarder(spool, broker.publish, is_connected=broker.is_connected)
    forwarder.start()
    await eventually(broker.asked_if_connected)
    broker.asked_if_connected.clear()
    forwarder.notify()
    await eventually(broker.asked_if_connected)  # a whole turn of its loop has gone by
    assert not broker.publishing.is_set()
    assert spool.depth == 2

    broker.connected = True
    forwarder.notify()  # as the publisher does on reconnect
    await eventually(broker.all_published)
    await forwarder.stop()
    assert broker.published == ["evt_0", "evt_1"]


async def test_forwarder_retries_after_a_failure_without_losing_order(spool: Spool) -> None:
    await fill(spool, 3)
    broker = Broker(expect=3)
    broker.failures_to_come = 2
    forwarder = Forwarder(
        spool, broker.publish, is_connected=broker.is_connected, retry_delay=0, max_retry_delay=0
    )
    forwarder.start()
    await eventually(broker.all_published)
    await forwarder.stop()
    assert broker.published == ["evt_0", "evt_1", "evt_2"]
    assert spool.depth == 0


async def test_a_broker_usable_again_ends_the_forwarders_back_off_at_once(spool: Spool) -> None:
    await fill(spool, 2)
    broker = Broker(expect=2)
    broker.failures_to_come = 1  # say, a publish that timed out during a memory alarm
    forwarder = Forwarder(spool, broker.publish, is_connected=broker.is_connected, retry_delay=60)
    forwarder.start()
    await eventually(broker.publishing)  # and failed: the back-off (a minute) has begun
    await asyncio.sleep(0.1)
    forwarder.notify()  # a delivery spooled meanwhile does not end the back-off
    await asyncio.sleep(0.1)
    assert broker.published == []

    forwarder.retry_now()  # as the publisher calls it when the link or channel is back

    await eventually(broker.all_published)
    await forwarder.stop()
    assert broker.published == ["evt_0", "evt_1"]


async def test_the_broker_back_ends_a_back_off_once_per_run_of_failures(spool: Spool) -> None:
    # A broker that closes the channel at each publish, which is then reopened at once.
    await fill(spool, 1)
    broker = Broker(expect=1)
    broker.failures_to_come = 2
    forwarder = Forwarder(spool, broker.publish, is_connected=broker.is_connected, retry_delay=60)
    forwarder.start()
    await eventually(broker.publishing)
    await asyncio.sleep(0.1)  # failed, and backing off
    broker.publishing.clear()
    forwarder.retry_now()
    await eventually(broker.publishing)  # the early retry, which fails too
    await asyncio.sleep(0.1)

    forwarder.retry_now()  # the channel reopened again
    await asyncio.sleep(0.2)

    assert (broker.failures_to_come, broker.published) == (0, [])  # no third attempt yet
    await forwarder.stop(grace=0)


async def test_a_broker_that_drops_the_link_at_each_publish_gets_no_busy_loop(
    spool: Spool,
) -> None:
    """Each publish of the spooled event takes the connection down (a frame the broker will
    not take), and the publisher reconnects a moment later, calling ``retry_now`` for the
    channel and again for the connection: a look that finds the link down is no success, and
    the back-off goes on."""
    await fill(spool, 1)  # while the broker was away
    broker = Broker()
    broker.connected, broker.failures_to_come = False, 100
    loop = asyncio.get_running_loop()

    def reconnected() -> None:
        broker.connected = True
        forwarder.retry_now()
        loop.call_soon(forwarder.retry_now)

    async def publish_and_lose_the_link(delivery: Delivery) -> None:
        await asyncio.sleep(0.001)  # the broker's answer is a frame away
        broker.connected = False
        loop.call_later(0.05, reconnected)
        await broker.publish(delivery)

    forwarder = Forwarder(
        spool, publish_and_lose_the_link, is_connected=broker.is_connected, retry_delay=60
    )
    forwarder.start()
    loop.call_later(0.05, reconnected)
    await asyncio.sleep(1.0)  # twenty reconnects
    await forwarder.stop(grace=0)

    assert 100 - broker.failures_to_come <= 2  # the first failure, and the one early retry


async def retry_delays(
    spool: Spool, count: int, make: Callable[..., Forwarder] = Forwarder
) -> list[float]:
    """The first ``count`` back-offs (``retry_in``) of a forwarder whose publishes all fail."""
    await fill(spool, 1)
    broker = Broker(expect=1)
    broker.failures_to_come = 100
    forwarder = make(spool, broker.publish, is_connected=broker.is_connected)
    with structlog.testing.capture_logs() as logs:
        forwarder.start()

        def failures() -> list[float]:
            return [e["retry_in"] for e in logs if e["event"] == "spool.forward_failed"]

        async with asyncio.timeout(10):
            while len(failures()) < count:  # noqa: ASYNC110 - log lines offer no event to await
                await asyncio.sleep(0.01)
        await forwarder.stop(grace=0)
    return failures()[:count]


async def test_failed_forwards_are_retried_after_1_s_then_2_s_by_default(spool: Spool) -> None:
    assert await retry_delays(spool, 2) == [1.0, 2.0]  # doubling up to a minute


async def test_the_forwarders_back_off_doubles_up_to_its_cap_and_stays_there(spool: Spool) -> None:
    capped = functools.partial(Forwarder, retry_delay=0.01, max_retry_delay=0.04)  # 1 s, 60 s
    delays = await retry_delays(spool, 5, capped)
    assert delays == [0.01, 0.02, 0.04, 0.04, 0.04]


async def test_forwarder_outlives_a_cancelled_error_that_was_not_meant_for_it(
    spool: Spool,
) -> None:
    # What a library raises when it cancels a future the publish awaited (aiormq does, for the
    # confirms of a connection it gives up); only cancelling the forwarder itself may end it.
    await fill(spool, 2)
    broker = Broker(expect=2)
    broker.failures_to_come, broker.failure = 1, asyncio.CancelledError()
    forwarder = Forwarder(
        spool, broker.publish, is_connected=broker.is_connected, retry_delay=0, max_retry_delay=0
    )
    forwarder.start()
    await eventually(broker.all_published)
    await forwarder.stop()
    assert broker.published == ["evt_0", "evt_1"]


async def test_a_publish_that_a_stop_abandons_is_not_reported_as_a_failure(spool: Spool) -> None:
    await fill(spool, 1)
    abandoned = asyncio.Event()

    async def publish(delivery: Delivery) -> None:
        await abandoned.wait()
        raise DeliveryRefused("publish failed: the bridge is stopping")

    forwarder = Forwarder(spool, publish, is_connected=lambda: True)
    forwarder.start()
    await asyncio.sleep(0.05)
    with structlog.testing.capture_logs() as logs:
        stopping = asyncio.create_task(forwarder.stop(grace=5))
        await asyncio.sleep(0.05)
        abandoned.set()  # as the bridge does with the confirms due when its grace runs out
        await asyncio.wait_for(stopping, 1)

    assert [entry["event"] for entry in logs] == []  # the stop's own lines say what is left
    assert spool.depth == 1


async def test_stopping_the_forwarder_is_bounded_and_keeps_the_event_in_flight(
    spool: Spool,
) -> None:
    await fill(spool, 1)
    broker = Broker()
    broker.hang = True
    forwarder = Forwarder(spool, broker.publish, is_connected=broker.is_connected)
    forwarder.start()
    await eventually(broker.publishing)
    await forwarder.stop(grace=0)
    [entry] = await spool.peek(10)
    assert entry.delivery.message_id == "evt_0"
    assert entry.attempts == 0  # being stopped is not a failure of the event


async def test_stopping_a_forwarder_not_running_is_harmless(spool: Spool) -> None:
    broker = Broker()
    forwarder = Forwarder(spool, broker.publish, is_connected=broker.is_connected)
    await forwarder.stop()
    forwarder.start()
    await forwarder.stop()
    await forwarder.stop()


async def test_a_spool_found_locked_leaves_no_descriptor_open(
    tmp_path: Path,
) -> None:
    """A left-behind spool still locked is tried again every second, for as long as another
    process holds it. ``Spool.open`` takes the lock before it opens the database: before, it
    opened the database first and left it open when the lock was taken, three descriptors a
    try."""
    settings = SpoolSettings(path=tmp_path / "worker-1")
    async with await Spool.open(settings):
        pass  # a spool a worker left behind
    holder = os.open(settings.path / LOCK_NAME, os.O_RDWR)  # as another process's worker would
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(30):  # half a minute of retries
            with pytest.raises(SpoolLocked):
                await Spool.open(settings)
        gc.collect()
        after = len(os.listdir("/proc/self/fd"))
    finally:
        os.close(holder)
    assert after - before <= 2, f"{after - before} descriptors left by 30 failed opens"


async def test_a_spool_open_cancelled_while_it_takes_the_lock_leaves_the_spool_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop during start-up cancels the open: the lock is taken at once, on the loop's
    thread, so no executor thread can take it after the open is gone and hold it for ever; and
    what the thread was opening is closed before the lock is let go, so that the next owner
    does not meet the file half made ("database is locked")."""
    settings = SpoolSettings(path=tmp_path / "spool")
    real_lock = spool_module._lock

    locking = threading.Event()

    def slow_lock(directory: Path) -> int:  # a slow volume (NFS, a busy disk)
        fd = real_lock(directory)
        locking.set()
        time.sleep(0.3)
        return fd

    monkeypatch.setattr(spool_module, "_lock", slow_lock)
    opening = asyncio.create_task(Spool.open(settings))
    await waiting.eventually(locking.is_set)  # the lock is held from here on, by whoever took it
    opening.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await opening
    monkeypatch.setattr(spool_module, "_lock", real_lock)

    async with await Spool.open(settings) as spool:
        assert spool.depth == 0


async def test_a_spool_whose_removals_failed_on_a_full_disk_says_when_they_went_through(
    tmp_path: Path,
) -> None:
    """Events published while the disk is full cannot be removed; once it has room, a line
    says forwarding goes through again, ending the run of failure lines."""
    published: list[str] = []

    async def publish(delivery: Delivery) -> None:
        published.append(delivery.message_id)

    with small_disk(tmp_path / "disk", 2 * 2**20) as disk:
        settings = SpoolSettings(path=disk / "spool", min_free_bytes=0)
        async with await Spool.open(settings) as spool:
            for n in range(6):
                await spool.append(
                    Delivery("avatar_video.success", envelope(f"v{n}"), f"hunt-obs-{n}")
                )
            filler = fill_disk(disk)
            forwarder = Forwarder(
                spool, publish, is_connected=lambda: True, retry_delay=0.05, max_retry_delay=0.2
            )
            with capture_logs() as logs:
                forwarder.start()
                try:
                    await waiting.eventually(lambda: len(seen(logs, "spool.forward_failed")) >= 2)
                    assert spool.depth == 6
                    filler.unlink()
                    await waiting.eventually(lambda: spool.depth == 0)
                    await asyncio.sleep(0.3)
                finally:
                    await forwarder.stop()
    assert sorted(published) == [f"hunt-obs-{n}" for n in range(6)]
    last_failure = max(
        i for i, entry in enumerate(logs) if entry["event"] == "spool.forward_failed"
    )
    after = [entry for entry in logs[last_failure + 1 :] if shown(entry)]
    assert after, "the spool emptied after disk-full failures without a line saying so"


async def test_the_oldest_age_is_the_earliest_stamp_not_the_first_rows(tmp_path: Path) -> None:
    """A clock that ran an hour ahead, then was stepped back: the event at the head is stamped
    in the future, those behind it by the right clock. An alert on the age must still see the
    ten minutes the oldest of those has waited."""
    now = RECEIVED_AT
    async with await Spool.open(settings(tmp_path), clock=lambda: now) as spool:
        for n, received_at in enumerate((now + 3600.0, now - 600.0, now - 300.0)):
            await spool.append(delivery(n, received_at=received_at))
        status = await spool.status()

    assert status.oldest_age == 600.0


async def test_an_event_larger_than_a_forwarding_batch_is_still_forwarded(spool: Spool) -> None:
    """The forwarder reads the spool in batches of at most BATCH_BYTES of bodies, "or the first
    event alone if it is larger": an event over that budget (server.max_body_bytes may be 16 MiB)
    must still come out of the spool, or it and every event behind it would wait for ever while
    the drain reports the spool empty."""
    await spool.append(delivery(0, size=BATCH_BYTES + 1))
    await spool.append(delivery(1))
    published: list[str] = []

    async def publish(event: Delivery) -> None:
        published.append(event.message_id)

    assert await drain(spool, publish) == 2
    assert published == ["evt_0", "evt_1"]
    assert spool.depth == 0


def test_commits_after_a_removal_are_still_synced_to_disk(tmp_path: Path) -> None:
    """Removals run with synchronous=NORMAL (a removal lost costs a duplicate); the events
    spooled after one must be committed with FULL again: in WAL mode NORMAL lets a power cut
    take back an event a 202 was given for. Asked of the spool's own connection, after a
    delete and the insert that follows it."""
    database = _Database.open(tmp_path / "spool")
    try:
        database.insert([delivery(0)])
        [event] = database.oldest(1)
        database.delete([event.id])
        database.insert([delivery(1)])
        assert database._db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        database.close()


async def test_a_spool_file_with_a_damaged_page_is_called_corrupt(tmp_path: Path) -> None:
    """A spool file whose pages are damaged (SQLITE_CORRUPT, where a file that is not a
    database at all is SQLITE_NOTADB) gets the advice that helps: move it aside and recover its
    events, not "check the volume"."""
    spool_settings = settings(tmp_path)
    async with await Spool.open(spool_settings) as spool:
        await spool.append(delivery(0))
    path = spool_settings.path / "spool.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    damaged = bytearray(path.read_bytes())
    damaged[100:600] = b"\xff" * 500  # the first page's b-tree: the schema
    path.write_bytes(bytes(damaged))

    with pytest.raises(SpoolUnusable, match="is not a usable spool") as caught:
        await Spool.open(spool_settings)

    assert "move it aside" in str(caught.value)


async def test_an_event_stamped_ahead_of_the_clock_is_reported_as_just_spooled(
    tmp_path: Path,
) -> None:
    """Every event in the spool was stamped while the clock ran ahead (then stepped back): the
    oldest age is 0, not a negative number of seconds for /status, `spool status` and alerts."""
    now = RECEIVED_AT
    async with await Spool.open(settings(tmp_path), clock=lambda: now) as spool:
        await spool.append(delivery(0, received_at=now + 3600.0))
        status = await spool.status()

    assert status.oldest_age == 0.0


def test_the_oldest_age_over_several_workers_spools_is_that_of_the_oldest_event() -> None:
    """/status and `spool status` add the workers' spools up; the age is the longest any event
    has waited (an empty spool has none), or an alert on it misses a worker stuck for an hour."""
    statuses = [
        SpoolStatus(depth=1, bytes=10, oldest_age=5.0),
        SpoolStatus(depth=0, bytes=0, oldest_age=None),
        SpoolStatus(depth=3, bytes=30, oldest_age=3600.0, parked=1),
    ]

    assert SpoolStatus.of_all(statuses) == SpoolStatus(
        depth=4, bytes=40, oldest_age=3600.0, parked=1
    )
    assert SpoolStatus.of_all([]) == SpoolStatus(depth=0, bytes=0, oldest_age=None)


async def test_a_forward_waits_up_to_60_s_for_its_confirm() -> None:
    """README: "A forward waits up to 60 s for its confirm, where a live delivery waits
    amqp.publish_timeout": a broker confirming slowly (a stalled disk) still gets the spool
    drained, each event once, rather than every forward timing out and being published again."""
    asked: list[float | None] = []

    async def publish(delivery: Delivery, within: float | None = None) -> None:
        asked.append(within)

    await forwarding(publish)(delivery(0))

    assert asked == [60.0]
