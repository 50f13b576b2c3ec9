"""Engine thread -> event loop: one loop wakeup per engine step, however many requests it fed.

Each decode step produces events for every running request. Handing each request's events over
with its own `call_soon_threadsafe` costs a self-pipe write and a loop wakeup per request per
token; with 16 streams that is 16 wakeups per step, all taken from the GIL the engine needs. A
`Handoff` collects what the engine posts and schedules a single flush while one is not already
pending; the flush puts every batch on its request's queue in posting order.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue[T], T]] = []

    def post(self, queue: asyncio.Queue[T], item: T) -> None:
        """Any thread: deliver `item` to `queue` on the loop, soon."""
        with self._lock:
            self._pending.append((queue, item))
            if len(self._pending) > 1:
                return  # the flush scheduled for the first item takes this one too
        with contextlib.suppress(RuntimeError):  # a closed loop (shutdown): nobody is listening any more
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, item in pending:
            queue.put_nowait(item)
