"""How many CPU threads torch gets for one engine step.

A second thread pays only when a step's matrix products are large. Measured on 2 cores
(docs/benchmarks.md): with torch on both cores SmolLM2-135M (hidden size 576) streamed 23 % more
tokens at 16 and 32 concurrent requests but decoded 10 % slower per token at 1 and 4 - a decode
step over a few tokens is short and bound by memory bandwidth, and when the HTTP side takes a core
from one of torch's threads the other waits for it at every parallel region. A model with hidden
size 64 lost 45 % with both cores: its products are shorter than waking a thread, and its tokens
come so fast that streaming them needs a core of its own.

So a step is sized by its work: the multiply-adds of one hidden x hidden projection over the
step's tokens (running rows plus prompt tokens read). From `PARALLEL_STEP_WORK` up (8 tokens of
SmolLM2, where two threads measured 1.3-1.5x one) a step gets every core of the worker; below it,
one core is left to the event loop and HTTP.

That threshold is a first guess, not a fact about every CPU: on a 2-core Intel Xeon the same server
streamed SmolLM2 19-59 % faster at 1, 4 and 16 concurrent requests with both threads on every step, while
the AMD EPYC it was measured on lost 4-11 % at one (docs/benchmarks.md). So `ThreadTuner` keeps the
plan only until the steps themselves have been timed: per step size (a power-of-two bucket of
tokens) it times a few steps at each of the two counts, then runs the one whose recent median is
lower and now and then a step on the other, so a change in the machine's load is noticed. A median
of the last few, not an average: one step slowed by a preemption must not flip the choice.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from statistics import median

PARALLEL_STEP_WORK = 2_500_000
EXPLORE_EVERY = 64  # steps on the faster count (per bucket, times how much slower the other was) between timings of the other
RECENT_STEPS = 5  # forward times kept per bucket and thread count
FIRST_STEPS = 3  # steps timed at each count of a bucket before the first choice
MAX_EXPLORE_INTERVAL = 4096  # however slow the other count was once, it is timed again within this many steps


@dataclass(frozen=True)
class ThreadPlan:
    small: int  # threads for a step under the work threshold
    large: int  # threads for a step at or over it
    min_tokens: int  # a step with this many tokens or more is large

    def for_step(self, tokens: int) -> int:
        return self.large if tokens >= self.min_tokens else self.small


def plan_threads(cores: int, hidden_size: int | None, explicit: int = 0) -> ThreadPlan:
    """The plan for a worker with `cores` CPU cores; an `explicit` thread count fixes both sizes."""
    if explicit:
        return ThreadPlan(explicit, explicit, 1)
    cores = max(1, cores)
    small = max(1, cores - 1)
    if not hidden_size:  # a config without a hidden size: no basis for the switch, keep the core
        return ThreadPlan(small, small, 1)
    return ThreadPlan(small, cores, max(1, math.ceil(PARALLEL_STEP_WORK / hidden_size**2)))


@dataclass
class _Bucket:
    since_explored: int = 0  # steps run on the best count since the other was last timed
    seconds: dict[int, deque[float]] = field(default_factory=dict)  # recent forward times per thread count
    # Derived from `seconds`, updated as a time is recorded (both run every step; a median is not free):
    medians: dict[int, float] = field(default_factory=dict)
    best: int = 0  # the count with the lower median
    interval: int = 0  # steps on `best` before the other count is timed again

    def timed(self, threads: int) -> int:
        return len(self.seconds.get(threads, ()))


@dataclass
class ThreadTuner:
    """Per step size, the thread count whose steps measured faster; the plan's guess goes first.

    Pure bookkeeping: the engine asks `choose` before a forward and reports its time to `record`.
    A bucket's first `FIRST_STEPS` steps run on the plan's guess and the next ones on the other
    count, so a choice is made within a few steps (a server's load comes and goes; a short burst
    must not run on the wrong count). After that the other count is timed again after
    `EXPLORE_EVERY` steps times how much slower it was (a model whose steps take 25x as long on two
    threads retries them every 1,600 steps), so trying costs under 1 / `EXPLORE_EVERY` of the time
    however bad the other count is.
    """

    plan: ThreadPlan
    _buckets: dict[int, _Bucket] = field(default_factory=dict, init=False, repr=False)

    def choose(self, tokens: int) -> int:
        if self.plan.small == self.plan.large:
            return self.plan.small
        bucket = self._buckets.get(tokens.bit_length()) or _Bucket()
        guess = self.plan.for_step(tokens)
        if bucket.timed(guess) < FIRST_STEPS:
            return guess
        if bucket.timed(self._other(guess)) < FIRST_STEPS:
            return self._other(guess)
        return self._other(bucket.best) if bucket.since_explored >= bucket.interval - 1 else bucket.best

    def record(self, tokens: int, threads: int, seconds: float) -> None:
        if self.plan.small == self.plan.large:
            return
        bucket = self._buckets.setdefault(tokens.bit_length(), _Bucket())
        compared = min(bucket.timed(self.plan.small), bucket.timed(self.plan.large)) >= FIRST_STEPS
        bucket.since_explored = bucket.since_explored + 1 if compared and threads == bucket.best else 0
        recent = bucket.seconds.setdefault(threads, deque(maxlen=RECENT_STEPS))
        recent.append(seconds)
        bucket.medians[threads] = median(recent)
        bucket.best, bucket.interval = self._best(bucket.medians)

    def _other(self, threads: int) -> int:
        return self.plan.small if threads == self.plan.large else self.plan.large

    @staticmethod
    def _best(times: dict[int, float]) -> tuple[int, int]:
        """The count with the lower median time, and how many steps it runs before the other is timed again."""
        best = min(times, key=times.__getitem__)
        slower = max(times.values()) / max(times[best], 1e-9)
        return best, min(MAX_EXPLORE_INTERVAL, round(EXPLORE_EVERY * slower))
