"""Work the control plane runs after a delay, unless the server stops first."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("ember.api")


class Delayed:
    """Each piece of work is a function called when its time comes, so nothing is created that
    might never run: a coroutine made when the work is scheduled and dropped with its timer at
    shutdown would never be awaited (a RuntimeWarning on the way out)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, delay: float, work: Callable[[], Awaitable[None]], what: str) -> None:
        async def run() -> None:
            await asyncio.sleep(delay)
            try:
                await work()
            except Exception:  # nobody awaits this task: say it here
                log.exception("%s failed", what)

        task = asyncio.get_running_loop().create_task(run(), name=what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel(self) -> None:
        """Drop what has not run yet, and wait until what was running has stopped."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
