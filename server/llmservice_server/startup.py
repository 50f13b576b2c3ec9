"""Where the server's start-up went: seconds per phase (fetch, load, warmup), from its stage changes.

The engine reports stages (see `backend.Backend.stage`); this clock notes when each began, so
/startupz can say how long the model took to download, to load onto its device and to warm up -
the part of a cold start the operator cannot see from the pod's own timestamps. Pure: the clock
is passed in.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Engine stages by the start-up phase they belong to; the others (starting, delayed, ready,
# failed, stopped) end the phase before them and start none.
PHASES = {"fetching": "fetch", "loading": "load", "loading_model": "load", "warming": "warmup"}
PHASE_ORDER = ("fetch", "load", "warmup")


class StageClock:
    """Stage changes in, seconds per phase out; safe to mark from one thread and read from another."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}
        self._current: str | None = None  # the phase under way
        self._since = 0.0

    def mark(self, stage: str) -> None:
        now = self._clock()
        phase = PHASES.get(stage)
        with self._lock:
            if phase == self._current:
                return  # loading -> loading_model: one phase
            self._close(now)
            self._current, self._since = phase, now

    def seconds(self) -> dict[str, float]:
        """Each phase that began, in milliseconds' precision; a phase under way counts up to now."""
        now = self._clock()
        with self._lock:
            spent = dict(self._seconds)
            if self._current is not None:
                spent[self._current] = spent.get(self._current, 0.0) + now - self._since
        return {phase: round(spent[phase], 3) for phase in PHASE_ORDER if phase in spent}

    @property
    def phase(self) -> str | None:
        return self._current

    def _close(self, now: float) -> None:
        if self._current is not None:
            self._seconds[self._current] = self._seconds.get(self._current, 0.0) + now - self._since
