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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PARALLEL_STEP_WORK = 2_500_000


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
