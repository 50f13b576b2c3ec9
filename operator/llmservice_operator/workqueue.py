"""A keyed work queue: each key is processed by one worker at a time, bursts collapse into one run.

Watch events arrive in bursts (a rollout updates a Deployment and its pods many times); the queue
keeps at most one pending run per LLMService and re-runs a key that changed while it was being
processed. Failed runs come back after an exponential backoff, so a broken object never spins.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)


class RetryLater(Exception):
    """Raised by a handler to have its key run again after a backoff."""


class WorkQueue(Generic[K]):
    def __init__(self, handler: Callable[[K], Awaitable[None]], *, workers: int, base_delay: float, max_delay: float) -> None:
        self._handler = handler
        self._workers = workers
        self._base_delay = base_delay
        self._max_delay = max_delay
        self._queue: asyncio.Queue[K] = asyncio.Queue()
        self._pending: set[K] = set()
        self._running: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: dict[K, asyncio.TimerHandle] = {}

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"reconcile-worker-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def add(self, key: K) -> bool:
        """Queue a key; False when it was already waiting (the run will see the latest state)."""
        if key in self._running:
            self._dirty.add(key)
            return False
        if key in self._pending:
            return False
        self._pending.add(key)
        self._queue.put_nowait(key)
        return True

    def add_after(self, key: K, delay: float) -> None:
        """Queue a key after `delay` seconds, for a change no watch event will announce (a deadline passing)."""
        previous = self._timers.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _retry(self, key: K) -> None:
        failures = self._failures.get(key, 0) + 1
        self._failures[key] = failures
        delay = min(self._max_delay, self._base_delay * 2 ** (failures - 1))
        previous = self._timers.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def _work(self) -> None:
        while True:
            key = await self._queue.get()
            self._pending.discard(key)
            self._running.add(key)
            try:
                await self._handler(key)
                self._failures.pop(key, None)
            except RetryLater:
                self._retry(key)
            except Exception:
                log.exception("Reconcile of %s failed unexpectedly; retrying with backoff", key)
                self._retry(key)
            finally:
                self._running.discard(key)
                self._queue.task_done()
            if key in self._dirty:
                self._dirty.discard(key)
                self.add(key)

    async def join(self) -> None:
        """Wait until nothing is queued or running (timers may still fire later)."""
        await self._queue.join()
