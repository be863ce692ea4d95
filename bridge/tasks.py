"""Background tasks: the one way the bridge's parts end theirs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import structlog

log = structlog.get_logger(__name__)

_T = TypeVar("_T")


async def cancel_and_wait(
    task: asyncio.Task[Any] | None, *, again_every: float | None = None
) -> None:
    """Cancel ``task`` (if any) and return once it has ended.

    ``again_every`` seconds, cancel it again until it ends: for a task whose library may
    swallow a cancellation (aiohttp turns one that meets its own timeout into a
    ``TimeoutError``), not for one that needs its cleanup undisturbed.

    A task that had died of an error is logged here, not raised: a shutdown must go on to
    answer what is in flight and close the connection and the spool, whatever a helper did.
    """
    if task is None:
        return
    # Cleanup after this task's own cancellation (a ``finally``, ``Bridge.stop`` from an
    # ``async with`` whose task was cancelled) must still wait: only a cancellation that comes
    # while waiting is this task's to raise.
    current = asyncio.current_task()
    cancelled_before = current.cancelling() if current is not None else 0
    task.cancel()
    while again_every is not None and not task.done():
        if not (await asyncio.wait({task}, timeout=again_every))[0]:
            task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > cancelled_before:
            raise
    except Exception as exc:
        log.error("bridge.task_failed", task=task.get_name(), error=repr(exc), exc_info=exc)


def this_task_is_cancelled() -> bool:
    """Whether the running task has been asked to cancel: a ``CancelledError`` caught now is
    then meant for it, rather than come out of a future it awaited that someone else cancelled
    (aiormq cancels the confirms of a connection it gives up on)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def outlasting_cancellation(
    work: Coroutine[Any, Any, _T],
    *,
    within: float,
    on_failure: Callable[[Exception], None],
) -> _T:
    """Await ``work``; if the caller is cancelled meanwhile, let ``work`` go on for up to
    ``within`` seconds more (then cancel it), and raise the cancellation once it has ended.

    For a call whose answer must not be thrown away: KonPro tells an endpoint's signing secret
    only in the answer that registers it. Cancellations repeated while waiting
    (``cancel_and_wait(again_every=...)``) do not cut the wait short. An error ``work`` ends
    with after the cancellation has nobody to go to but ``on_failure``, which reports it.
    """
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not task.done() and (remaining := deadline - loop.time()) > 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=remaining)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=1.0)  # its cleanup, not left to a closed loop
        error = task.exception() if task.done() and not task.cancelled() else None
        if isinstance(error, Exception):
            on_failure(error)
        raise
