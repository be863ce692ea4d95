"""A durable local spool: where a delivery waits while the broker cannot take it.

Answering KonPro 2xx is a promise that the event will reach the bus. When publishing fails, the
delivery is committed here (and fsynced) *before* the answer; the forwarder (``bridge.forwarder``)
later drains the spool to the broker in original order.

SQLite in WAL mode with ``synchronous=FULL`` does the durable part. All SQLite work runs on one
dedicated thread that owns the connection, so the event loop never waits on the disk. Appends
that arrive while a commit is in flight are gathered into the next transaction (group commit):
under a burst one fsync covers many deliveries, yet each caller resumes only once its own row is
on disk.

Depth and size are counted in memory and read back at ``open``. One process at a time owns a
spool (the daemon, or ``spool drain`` while the daemon is stopped): an exclusive lock on
``spool.lock`` enforces it. Reading the status needs no lock.
"""

from __future__ import annotations

import asyncio
import contextvars
import fcntl
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Final, Self, TypeVar

import orjson
import structlog

from bridge.config import SpoolSettings
from bridge.events import Delivery, DeliveryRefused

FILE_NAME: Final = "spool.sqlite3"
LOCK_NAME: Final = "spool.lock"
RETRY_AFTER: Final = 30

_T = TypeVar("_T")
_log = structlog.get_logger(__name__)

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type  TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    body        BLOB    NOT NULL,
    headers     TEXT    NOT NULL,
    received_at REAL    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    parked      TEXT
)
"""
_ADD_PARKED: Final = "ALTER TABLE events ADD COLUMN parked TEXT"  # spools of versions before
_INDEX_RECEIVED_AT: Final = (
    "CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at)"  # the oldest age
)
SCHEMA_VERSION: Final = 1
"""The spool's schema (SQLite's ``user_version``): 1 has ``parked``. A spool of an older schema is
brought up to date when opened to write; one of a newer schema is refused, not misread."""
PARK_AFTER: Final = 3
"""Refusals (``MessageRefused``) of one event before it is parked, when the broker's text does not
name the size it refused: each refusal closes the channel and fails every publish in flight on
it, so one does not prove which message was at fault."""
_MAX_SQL_PARAMETERS: Final = 500  # well below SQLite's historical limit of 999
_CORRUPTION: Final = frozenset({11, 26})  # SQLITE_CORRUPT, SQLITE_NOTADB (primary result codes)
_LOW_DISK: Final = 1 << 20  # below this much free space, a failed open is blamed on the disk


class SpoolError(DeliveryRefused):
    """The spool cannot take responsibility for a delivery; KonPro should retry it later."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, retry_after=RETRY_AFTER)


class SpoolOpenFailed(RuntimeError):
    """The spool cannot be opened by this process; the message says why."""


class SpoolLocked(SpoolOpenFailed):
    """Another process owns the spool."""


class SpoolUnusable(SpoolOpenFailed):
    """The spool's file cannot be opened as a spool (corrupt, not a database, unreadable, or its
    disk cannot take a write); the message says which, and what to do."""


class SpoolClosed(RuntimeError):
    """The spool was used after ``close()``."""


class SpoolFull(SpoolError):
    """Taking the delivery would exceed ``max_events`` or ``max_bytes``, or leave the disk with
    less than ``min_free_bytes``; nothing is dropped."""


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    """A delivery waiting in the spool; ``id`` gives its place in the original order."""

    id: int
    delivery: Delivery
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class SpoolStatus:
    """How much is waiting: events (``parked`` of them set aside, refused by the broker), their
    body bytes, and the age in seconds of the oldest."""

    depth: int
    bytes: int
    oldest_age: float | None
    parked: int = 0

    @classmethod
    def of_all(cls, statuses: Iterable[SpoolStatus]) -> SpoolStatus:
        """Several spools (one a worker) as one: their sums, and the oldest event's age."""
        statuses = list(statuses)
        ages = [status.oldest_age for status in statuses if status.oldest_age is not None]
        return cls(
            depth=sum(status.depth for status in statuses),
            bytes=sum(status.bytes for status in statuses),
            oldest_age=max(ages, default=None),
            parked=sum(status.parked for status in statuses),
        )


class Spool:
    """An append-only queue of deliveries on local disk. Create it with ``await Spool.open()``."""

    def __init__(
        self,
        settings: SpoolSettings,
        database: _Database,
        executor: ThreadPoolExecutor,
        clock: Callable[[], float],
        lock_fd: int | None = None,
    ) -> None:
        self.path = settings.path / FILE_NAME
        self._settings = settings
        self._db = database
        self._executor = executor
        self._clock = clock
        self._depth, self._bytes = database.totals  # committed rows
        self._parked = database.parked_count
        self._refusals: dict[int, int] = {}  # event id -> refusals since this process opened it
        self._queued_events = self._queued_bytes = 0  # accepted, not yet committed
        self._queue: list[tuple[Delivery, asyncio.Future[None]]] = []
        # Forwarded, but their removal failed (say, the disk is full): skipped by peek() so that
        # they are not published again, and removed with the next remove().
        self._forwarded: set[int] = set()
        self._committer: asyncio.Task[None] | None = None
        self._closed = False
        self._lock_fd = lock_fd

    @classmethod
    async def open(
        cls,
        settings: SpoolSettings,
        *,
        exclusive: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> Self:
        """Open (creating if need be) ``<settings.path>/spool.sqlite3``.

        ``exclusive`` takes the spool's lock, and raises ``SpoolLocked`` if another process holds
        it: two processes draining one spool would publish every event twice.
        """
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spool")
        loop = asyncio.get_running_loop()
        lock_fd = None
        opening: asyncio.Future[_Database] | None = None
        try:
            # The lock first, a spool another process owns is not even opened; and at once, on
            # this thread: taken in the executor, a cancelled open would leave it held.
            if exclusive:
                lock_fd = _lock(settings.path)
            # Whoever takes the lock will write: a file it may not write is an error now.
            opening = loop.run_in_executor(
                executor, partial(_Database.open, settings.path, writing=exclusive)
            )
            database = await asyncio.shield(opening)
        except BaseException as exc:
            if opening is not None:
                await _close_when_opened(opening, executor)
            executor.shutdown(wait=False)
            if lock_fd is not None:
                os.close(lock_fd)
            if isinstance(exc, sqlite3.DatabaseError):
                raise _unusable(settings.path, exc) from exc
            raise
        return cls(settings, database, executor, clock, lock_fd)

    @classmethod
    async def open_when_free(
        cls,
        settings: SpoolSettings,
        *,
        poll_interval: float,
        on_locked: Callable[[SpoolLocked], None],
        give_up_after: float | None = None,
    ) -> Self:
        """Open the spool once the process that holds its lock lets go (a worker still stopping
        gracefully), calling ``on_locked`` the first time it is found held. After
        ``give_up_after`` seconds, if given, ``SpoolLocked`` is raised."""
        loop = asyncio.get_running_loop()
        deadline = None if give_up_after is None else loop.time() + give_up_after
        told = False
        while True:
            try:
                return await cls.open(settings)
            except SpoolLocked as exc:
                if deadline is not None and loop.time() >= deadline:
                    raise
                if not told:
                    on_locked(exc)
                    told = True
            await asyncio.sleep(poll_interval)

    async def close(self) -> None:
        """Finish the commits in flight, then close the file. Appends after this raise."""
        if self._closed:
            return
        self._closed = True
        if self._committer is not None:
            await asyncio.shield(self._committer)
        await self._call(self._db.close)
        self._executor.shutdown(wait=False)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def depth(self) -> int:
        """Committed events waiting, without touching the disk; parked ones included."""
        return self._depth

    @property
    def parked(self) -> int:
        """Events set aside because the broker refused them; ``peek`` leaves them out."""
        return self._parked

    async def append(self, delivery: Delivery) -> None:
        """Return once ``delivery`` is durably committed; raise ``SpoolError`` if it cannot be.

        ``SpoolFull`` is raised up front, before anything is written, when the limits would be
        exceeded.
        """
        self._check_open()
        self._reserve(len(delivery.body))
        committed = asyncio.get_running_loop().create_future()
        self._queue.append((delivery, committed))
        if self._committer is None:
            self._committer = asyncio.create_task(self._commit_queue(), name="spool-commit")
        await committed

    async def peek(self, limit: int, max_bytes: int | None = None) -> list[SpooledEvent]:
        """Up to ``limit`` events, oldest first, left in place (those already forwarded whose
        removal failed, and parked ones, are left out); no more than ``max_bytes`` of bodies,
        or the first event alone if it is larger."""
        self._check_open()
        # Forwarded events are always the oldest ones not parked: drain() publishes in order and
        # parks only the event at its head, and parked events are put back in line only once
        # every removal has gone through.
        after = max(self._forwarded, default=0)
        return await self._call(partial(self._db.oldest, limit, after, max_bytes=max_bytes))

    async def remove(self, ids: Sequence[int]) -> None:
        """Delete these events durably; ids no longer present are ignored.

        If the delete fails (``SpoolError``), the events count as forwarded all the same:
        ``peek`` leaves them out and the next ``remove`` deletes them too. A spool that cannot
        write for a while (a full disk) thus goes on draining without publishing an event twice;
        only a restart before the delete succeeds publishes them again, under the same ids.
        """
        self._check_open()
        if ids or self._forwarded:
            # Shielded so that the counters follow the disk even if the caller is cancelled.
            await asyncio.shield(self._remove([*self._forwarded, *ids]))

    async def retry_removals(self) -> None:
        """Delete the events forwarded earlier whose removal failed; ``SpoolError`` if it fails
        again."""
        await self.remove(())

    async def record_attempt(self, event_id: int) -> None:
        """Count a failed attempt to publish an event, for operators hunting a poison message."""
        self._check_open()
        await self._write(partial(self._db.record_attempt, event_id))

    async def note_refusal(self, event_id: int, reason: str, *, certain: bool = False) -> bool:
        """Count a refusal of this event by the broker; at the ``PARK_AFTER``-th, or at once if
        the broker named this event (``certain``), park it with ``reason``. Whether it is parked
        now."""
        self._check_open()
        refusals = self._refusals[event_id] = self._refusals.get(event_id, 0) + 1
        if refusals < PARK_AFTER and not certain:
            return False
        # Shielded, as removals are, so that the count follows the disk even if the caller is
        # cancelled: the write goes on in the spool's thread all the same.
        await asyncio.shield(self._park(event_id, reason))
        return True

    async def next_parked(self, after: tuple[int, int] | None = None) -> SpooledEvent | None:
        """The parked event to try next: the smallest (a broker refuses by size), then in
        order of ``(body size, id)`` after ``after``, starting over past the last."""
        self._check_open()
        return await self._call(partial(self._db.next_parked, after))

    async def peek_parked(self, limit: int, after: int = 0) -> list[SpooledEvent]:
        """Up to ``limit`` parked events after id ``after``, oldest first, left in place."""
        self._check_open()
        return await self._call(partial(self._db.oldest, limit, after, parked=True))

    async def unpark_all(self) -> int:
        """Put every parked event back in line (the broker took one of them); how many."""
        self._check_open()
        await self.retry_removals()  # peek() relies on it: see there
        return await asyncio.shield(self._unpark_all())

    async def status(self) -> SpoolStatus:
        self._check_open()
        oldest = await self._call(self._db.oldest_received_at)
        age = None if oldest is None else max(0.0, self._clock() - oldest)
        return SpoolStatus(
            depth=self._depth, bytes=self._bytes, oldest_age=age, parked=self._parked
        )

    def why_full(self, size: int = 1) -> str | None:
        """Why one more event of ``size`` bytes would not fit now (limits, disk), or ``None``."""
        limits = self._settings
        if self._depth + self._queued_events + 1 > limits.max_events:
            return f"spool full: it holds its limit of {limits.max_events} events"
        if self._bytes + self._queued_bytes + size > limits.max_bytes:
            return f"spool full: {size} more bytes would exceed {limits.max_bytes}"
        if limits.min_free_bytes:
            # The headroom keeps room for the deletes that drain the spool: SQLite needs disk
            # space to delete, and a spool that filled its disk could never empty itself. Pages
            # that drained events freed inside the file count as free: they are reused.
            free = _free_bytes(limits.path) + self._db.reusable_bytes
            free -= self._queued_bytes + size
            if free < limits.min_free_bytes:
                return (
                    f"disk nearly full: {max(free, 0)} bytes free on {limits.path}, "
                    f"spool.min_free_bytes is {limits.min_free_bytes}"
                )
        return None

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosed("the spool is closed")

    def _reserve(self, size: int) -> None:
        if reason := self.why_full(size):
            raise SpoolFull(reason)
        self._queued_events += 1
        self._queued_bytes += size

    async def _commit_queue(self) -> None:
        """Commit whatever is queued, one transaction per round, until the queue stays empty."""
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._commit(batch)
        finally:
            self._committer = None

    async def _commit(self, batch: list[tuple[Delivery, asyncio.Future[None]]]) -> None:
        deliveries = [delivery for delivery, _ in batch]
        size = sum(len(delivery.body) for delivery in deliveries)
        error: Exception | None = None
        try:
            await self._call(partial(self._db.insert, deliveries))
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of it, whatever it is
            error = exc
        else:
            self._depth += len(batch)
            self._bytes += size
        finally:
            self._queued_events -= len(batch)
            self._queued_bytes -= size
        for _, committed in batch:
            if committed.done():  # the caller was cancelled; the row stands all the same
                continue
            if error is None:
                committed.set_result(None)
            else:
                committed.set_exception(_as_spool_error(error))

    async def _remove(self, ids: list[int]) -> None:
        try:
            count, size, parked = await self._call(partial(self._db.delete, ids))
        except (sqlite3.Error, OSError) as exc:
            self._forwarded.update(ids)
            raise _as_spool_error(exc) from exc
        self._forwarded.difference_update(ids)
        for event_id in ids:
            self._refusals.pop(event_id, None)
        self._depth -= count
        self._bytes -= size
        self._parked -= parked

    async def _park(self, event_id: int, reason: str) -> None:
        await self._write(partial(self._db.park, event_id, reason))
        del self._refusals[event_id]
        self._parked += 1

    async def _unpark_all(self) -> int:
        count = await self._write(self._db.unpark_all)
        self._parked -= count
        return count

    async def _call(self, function: Callable[[], _T]) -> _T:
        # In the caller's context: a line logged in the spool's thread names its worker too.
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, context.run, function)

    async def _write(self, function: Callable[[], _T]) -> _T:
        try:
            return await self._call(function)
        except (sqlite3.Error, OSError) as exc:
            raise _as_spool_error(exc) from exc


class _Database:
    """The SQLite side of the spool. Only the spool's worker thread may call it."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._db = connection
        parked = "count(parked)" if _has_parked_column(connection) else "0"  # read, not migrated
        count, size, parked_count = connection.execute(
            f"SELECT count(*), coalesce(sum(length(body)), 0), {parked} FROM events"  # noqa: S608
        ).fetchone()
        self.totals: tuple[int, int] = (count, size)
        self.parked_count: int = parked_count
        self.reusable_bytes = self._free_pages_bytes()
        """Space inside the file that deleted events left for new ones (as of the last write)."""

    @classmethod
    def open(cls, directory: Path, *, writing: bool = True) -> _Database:
        """``writing``: the caller will write (the daemon, ``spool drain``), so a file it may
        not write is an error now; ``spool status`` only reads."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        connection = sqlite3.connect(directory / FILE_NAME, timeout=10.0, isolation_level=None)
        try:
            (mode,) = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL journal mode (got {mode!r})")
            connection.execute("PRAGMA synchronous=FULL")
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise SpoolUnusable(
                    f"the spool {directory / FILE_NAME} was written by a newer version of the "
                    f"bridge (spool schema {version}; this one knows {SCHEMA_VERSION}): drain it "
                    "with that version (spool drain), or run that version"
                )
            connection.execute(_SCHEMA)
            if writing:
                if not _has_parked_column(connection):
                    connection.execute(_ADD_PARKED)
                connection.execute(_INDEX_RECEIVED_AT)
                # Also the write that tells, now rather than at the first event to spool, a
                # file SQLite opened read-only without a word (one this user may not write).
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return cls(connection)
        except BaseException:
            connection.close()
            raise

    def close(self) -> None:
        self._db.close()

    def insert(self, deliveries: Sequence[Delivery]) -> None:
        rows = [
            (d.event_type, d.message_id, d.body, _dump_headers(d.headers), d.received_at)
            for d in deliveries
        ]
        with self._transaction():
            self._db.executemany(
                "INSERT INTO events (event_type, message_id, body, headers, received_at)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def oldest(
        self, limit: int, after: int = 0, *, parked: bool = False, max_bytes: int | None = None
    ) -> list[SpooledEvent]:
        which = "parked IS NOT NULL" if parked else "parked IS NULL"
        rows = self._db.execute(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE id > ? AND {which} ORDER BY id LIMIT ?",  # noqa: S608
            (after, limit),
        )
        events: list[SpooledEvent] = []
        size = 0
        for row in rows:  # read row by row: past the budget, no more bodies are loaded
            event = _spooled_event(row)
            size += len(event.delivery.body)
            if events and max_bytes is not None and size > max_bytes:
                break
            events.append(event)
        return events

    def next_parked(self, after: tuple[int, int] | None) -> SpooledEvent | None:
        by_size = f"SELECT {_EVENT_COLUMNS} FROM events WHERE parked IS NOT NULL"  # noqa: S608
        order = "ORDER BY length(body), id LIMIT 1"
        row = None
        if after is not None:
            following = f"{by_size} AND (length(body), id) > (?, ?) {order}"
            row = self._db.execute(following, after).fetchone()
        if row is None:  # from the smallest again
            row = self._db.execute(f"{by_size} {order}").fetchone()
        return None if row is None else _spooled_event(row)

    def oldest_received_at(self) -> float | None:
        # The earliest time, not the first row's: a row stamped while the clock ran ahead would
        # hide older ones from an alert on the age.
        row = self._db.execute("SELECT min(received_at) FROM events").fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def delete(self, ids: Sequence[int]) -> tuple[int, int, int]:
        """Delete rows; return how many, how many body bytes, and how many parked ones were
        actually there.

        Without an fsync of its own (``synchronous=NORMAL``): a delete survives the process
        being killed, and one lost with the machine costs a duplicate, never an event. So each
        event forwarded can be deleted at once, rather than a batch of them after an fsync.
        """
        count = size = parked = 0
        with self._synchronous("NORMAL"), self._transaction():
            for start in range(0, len(ids), _MAX_SQL_PARAMETERS):
                chunk = ids[start : start + _MAX_SQL_PARAMETERS]
                where = f"WHERE id IN ({', '.join('?' * len(chunk))})"  # placeholders only
                found, found_bytes, found_parked = self._db.execute(
                    "SELECT count(*), coalesce(sum(length(body)), 0), count(parked)"  # noqa: S608
                    f" FROM events {where}",
                    chunk,
                ).fetchone()
                self._db.execute(f"DELETE FROM events {where}", chunk)  # noqa: S608
                count += found
                size += found_bytes
                parked += found_parked
        return count, size, parked

    def record_attempt(self, event_id: int) -> None:
        with self._transaction():
            self._db.execute("UPDATE events SET attempts = attempts + 1 WHERE id = ?", (event_id,))

    def park(self, event_id: int, reason: str) -> None:
        with self._transaction():
            self._db.execute("UPDATE events SET parked = ? WHERE id = ?", (reason, event_id))

    def unpark_all(self) -> int:
        with self._transaction():
            cursor = self._db.execute("UPDATE events SET parked = NULL WHERE parked IS NOT NULL")
        return cursor.rowcount

    @contextmanager
    def _synchronous(self, level: str) -> Iterator[None]:
        self._db.execute(f"PRAGMA synchronous={level}")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:  # a COMMIT that failed (disk full) can leave it open
                self._db.execute("ROLLBACK")
            raise
        self.reusable_bytes = self._free_pages_bytes()

    def _free_pages_bytes(self) -> int:
        (pages,) = self._db.execute("PRAGMA freelist_count").fetchone()
        (page_size,) = self._db.execute("PRAGMA page_size").fetchone()
        return int(pages) * int(page_size)


def _has_parked_column(connection: sqlite3.Connection) -> bool:
    """Spool files of versions before parking have no such column until opened for writing."""
    columns = {row[1] for row in connection.execute("PRAGMA table_info(events)")}
    return "parked" in columns


def delete_spool_files(directory: Path) -> None:
    """Remove a spool that is closed and empty, and its directory if nothing else is in it."""
    for name in (FILE_NAME, f"{FILE_NAME}-wal", f"{FILE_NAME}-shm", LOCK_NAME):
        (directory / name).unlink(missing_ok=True)
    with suppress(OSError):
        directory.rmdir()


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:  # the directory is gone: the next write says why
        return sys.maxsize


def _dump_headers(headers: Mapping[str, str]) -> str:
    return orjson.dumps(dict(headers)).decode()


_Row = tuple[int, str, str, bytes, str, float, int]
_EVENT_COLUMNS: Final = "id, event_type, message_id, body, headers, received_at, attempts"


def _spooled_event(row: _Row) -> SpooledEvent:
    row_id, event_type, message_id, body, headers, received_at, attempts = row
    delivery = Delivery(event_type, body, message_id, _headers(headers, message_id), received_at)
    return SpooledEvent(row_id, delivery, attempts)


def _headers(stored: bytes | str, message_id: str) -> dict[str, str]:
    """A row's KonPro headers. Ones that cannot be read (a damaged page, a row recovered from a
    corrupt file) are left out, and said: the event goes on without them, rather than stop
    every event behind it."""
    try:
        headers = orjson.loads(stored)
    except orjson.JSONDecodeError as exc:
        problem = str(exc)
    else:
        if isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values()):
            return headers
        problem = "not a table of texts"
    _log.warning(
        "spool.headers_unreadable",
        message_id=message_id,
        error=problem,
        detail="forwarded without its KonPro headers",
    )
    return {}


async def _close_when_opened(opening: asyncio.Future[_Database], executor: Executor) -> None:
    """An open cancelled while its thread opens the file (a stop during start-up): let the
    thread finish and close what it opened (there: SQLite's objects keep to their thread)
    before the lock is let go, or the next owner could meet the file half made ("database is
    locked" while its schema is written)."""
    with suppress(asyncio.CancelledError):  # cancelled again: the thread ends anyway
        await asyncio.wait([opening])
        if not opening.cancelled() and opening.exception() is None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(executor, opening.result().close)


def _unusable(directory: Path, error: sqlite3.DatabaseError) -> SpoolUnusable:
    """Corruption calls for moving the file aside; anything else (a full disk, I/O errors) does
    not, and saying so would have an operator set aside a healthy spool."""
    path = directory / FILE_NAME
    if error.sqlite_errorcode & 0xFF in _CORRUPTION:
        return SpoolUnusable(
            f"{path} is not a usable spool ({error}); move it aside to start with an empty "
            "spool, and recover its events with `sqlite3 FILE .recover`"
        )
    free = _free_bytes(directory)
    if free < _LOW_DISK:
        advice = f"its disk is full ({free} bytes free): free some space"
    else:
        advice = "check the volume (permissions, I/O errors)"
    return SpoolUnusable(f"cannot open the spool {path} ({error}); {advice}, then start again")


def _as_spool_error(error: Exception) -> Exception:
    """A failed write as the refusal it means for the delivery; any other error as it is."""
    if isinstance(error, sqlite3.Error | OSError):
        wrapped = SpoolError(f"spool write failed: {error}")
        wrapped.__cause__ = error
        return wrapped
    return error


def _lock(directory: Path) -> int:
    """Take ``<directory>/spool.lock`` (making the directory if need be), or ``SpoolLocked``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SpoolLocked(f"another process owns the spool at {directory}") from None
    return fd
