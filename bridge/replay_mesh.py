"""Replay memory shared by the workers of ``server.workers = N``.

Each worker remembers the deliveries it took (``ReplayGuard``), but the kernel hands each new
connection to any worker: a replay, or KonPro retrying after a lost answer, may reach another
one. So each worker tells the others the key of every delivery it takes, and remembers what they
tell it.

The supervisor makes one datagram socket pair per worker before it forks them, and keeps them
all: worker ``i`` reads the inbox of pair ``i`` and writes to the others. A worker started again
inherits the same sockets. Keys go out at the end of the event-loop turn they were taken in, many
to a datagram. What an inbox holds unread is bounded by the sending socket's buffer (about
200 KiB: some 3,000 keys): a worker that is not reading (stopped, being started again, or
stalled) misses the keys sent past that, which costs at most a duplicate, never an event or a
wait. A key is told once its delivery is taken (published or spooled), so a copy reaching
another worker while the first is still being published is not a duplicate there yet: within
one worker, such a copy waits for the first one's fate (``Relay``); across workers, it is
published again, under the same message id.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from typing import Final

import structlog

log = structlog.get_logger(__name__)

KEY_BYTES: Final = 64  # a body's SHA-256, in hex (``events.body_digest``)
_KEYS_PER_DATAGRAM: Final = 64  # 4 KiB: far below a Unix datagram socket's buffer


class ReplayMesh:
    """The sockets of every worker, made in the supervisor before it forks them."""

    def __init__(self, workers: int) -> None:
        self._pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(workers)]

    def link(self, worker: int) -> ReplayLink:
        """Worker ``worker``'s end: its own inbox, and the others' to write to. Made again for
        a worker started again, on the same sockets (non-blocking, which the supervisor, which
        never uses them, does not mind)."""
        others = [sender for index, (sender, _) in enumerate(self._pairs) if index != worker]
        return ReplayLink(inbox=self._pairs[worker][1], siblings=others)

    def close(self) -> None:
        for pair in self._pairs:
            for end in pair:
                end.close()


class ReplayLink:
    """One worker's end of the mesh: ``tell`` the siblings what it took, ``listen`` to theirs."""

    def __init__(self, inbox: socket.socket, siblings: Sequence[socket.socket]) -> None:
        self._inbox = inbox
        self._siblings = siblings
        for end in (inbox, *siblings):
            end.setblocking(False)
        self._waiting: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.missed = 0
        """Keys a sibling did not take (its inbox full: it is not reading)."""

    def listen(self, heard: Callable[[str], None]) -> None:
        """Call ``heard(key)`` for each key a sibling tells, from now on."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._inbox.fileno(), self._read, heard)

    def tell(self, key: str) -> None:
        """Tell the siblings, at the end of this event-loop turn, that ``key`` was taken."""
        if self._loop is None:
            return
        if not self._waiting:
            self._loop.call_soon(self._send)
        self._waiting.append(key.encode("ascii"))

    def close(self) -> None:
        """Stop listening; the sockets stay the supervisor's, for a worker started again."""
        if self._loop is not None:
            self._loop.remove_reader(self._inbox.fileno())
            self._send()
            self._loop = None

    def _send(self) -> None:
        keys, self._waiting = self._waiting, []
        for start in range(0, len(keys), _KEYS_PER_DATAGRAM):
            datagram = b"".join(keys[start : start + _KEYS_PER_DATAGRAM])
            for sibling in self._siblings:
                try:
                    sibling.send(datagram)
                except OSError as exc:  # BlockingIOError: that sibling is not reading
                    self.missed += len(datagram) // KEY_BYTES
                    log.debug("replays.sibling_missed", error=repr(exc), missed=self.missed)

    def _read(self, heard: Callable[[str], None]) -> None:
        while True:
            try:
                datagram = self._inbox.recv(_KEYS_PER_DATAGRAM * KEY_BYTES)
            except BlockingIOError:
                return
            for start in range(0, len(datagram), KEY_BYTES):
                heard(datagram[start : start + KEY_BYTES].decode("ascii"))
