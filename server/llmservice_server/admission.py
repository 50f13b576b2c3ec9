"""Admission: how many sequences may be in the server, and who gets 429 or 503 instead.

At most `max_running` sequences decode in the batch and `max_waiting` more wait for a slot;
anything beyond is refused with 429 and a Retry-After, so the queue is never unbounded and a
client (or a load balancer) backs off instead of piling up. While the model is not ready or the
server is draining, every request is refused with 503.

Pure state, no framework: it is only touched from the event loop thread, so it needs no lock.
A request of `n` choices (or several prompts) holds one slot per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Admitted:
    rows: int


@dataclass(frozen=True)
class Rejected:
    status: int  # 429 or 503
    reason: str  # metric label: queue_full, draining, not_ready
    message: str
    retry_after: int


Decision = Admitted | Rejected


class Admission:
    def __init__(self, max_running: int, max_waiting: int, seconds_per_batch: float = 1.0) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.seconds_per_batch = seconds_per_batch
        self.in_flight = 0  # sequences admitted and not yet released
        self.requests = 0  # requests admitted and not yet released
        self.draining = False

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_waiting

    def try_acquire(self, rows: int, *, ready: bool) -> Decision:
        if self.draining:
            return Rejected(503, "draining", "server is shutting down", self.retry_after())
        if not ready:
            return Rejected(503, "not_ready", "model is not loaded yet", self.retry_after())
        if self.in_flight + rows > self.capacity:
            return Rejected(
                429,
                "queue_full",
                f"server is at capacity ({self.max_running} running + {self.max_waiting} waiting sequences)",
                self.retry_after(),
            )
        self.in_flight += rows
        self.requests += 1
        return Admitted(rows)

    def release(self, admitted: Admitted) -> None:
        self.in_flight -= admitted.rows
        self.requests -= 1
        if self.in_flight < 0 or self.requests < 0:
            raise RuntimeError("admission released more than it admitted")

    def start_draining(self) -> None:
        self.draining = True

    @property
    def idle(self) -> bool:
        return self.requests == 0

    def retry_after(self) -> int:
        # Rough: every full batch ahead of a newcomer costs about one batch duration.
        batches_ahead = max(self.in_flight - self.max_running, 0) / self.max_running
        return max(1, math.ceil(batches_ahead * self.seconds_per_batch))
