"""Background tasks: the one way the bridge's parts end theirs."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and return once it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def this_task_is_cancelled() -> bool:
    """Whether the running task has been asked to cancel: a ``CancelledError`` caught now is
    then meant for it, rather than come out of a future it awaited that someone else cancelled
    (aiormq cancels the confirms of a connection it gives up on)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
