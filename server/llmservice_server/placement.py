"""Which CPU cores the HTTP process and the engine run on, when the server owns its cores.

Left to the kernel, the two processes meet on one core at every token. The engine writes a
step's events to the pipe, and a pipe write is a "synchronous" wakeup: the scheduler puts the
woken reader (the HTTP process) on the writer's core, expecting the writer to sleep. The engine
does not sleep - it starts the next step - so the reader waits behind it or preempts it while
the other core idles. Measured on 2 cores with the tiny model, servers side by side, rounds
alternating ("Results: CPU placement" and "Results: the ceiling timed beside every run" in
docs/benchmarks.md): 5-22 % more tokens per round at 16 streams and a median 13 % more at one
while the machine ran slowly; over 16 rounds across its speeds a median 7 % more at 16 streams
(ahead in 11) and 4 % more at one (ahead in 10), never behind by more than the machine's drift.
The price: the event loop's `/livez` p99 about 2 ms higher, the load generator sharing its core.

So, on a worker that owns its cores (its affinity has no more cores than it may use: a cpuset
given to the pod, or a machine to itself), and for a model whose decode steps leave a core to
HTTP (`ThreadPlan`: steps under its work threshold run on one core fewer), the HTTP process runs
on the last core and the engine thread, on a step with fewer threads than cores, on the others -
the core the plan leaves to HTTP is then really HTTP's. A step on every core still runs on every
core. A model whose decode steps take every core (SmolLM2 at 8 rows and more) is left to the
kernel: pinned, the event loop shared its core with torch's extra thread and `/livez` p99 went
from 7 to 39 ms at one stream. So are a pod whose CPU is a quota on a larger node (it sees every
core of the node), several workers (each pair of processes would need its own cores) and the
engine on a thread of the HTTP process (one process). The engine decides once its model is
loaded (the plan needs the model's width) and the HTTP process pins itself when told.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

from .settings import Settings
from .threads import ThreadPlan

log = logging.getLogger(__name__)


def available_cores() -> frozenset[int]:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return frozenset(os.sched_getaffinity(0))
    return frozenset(range(os.cpu_count() or 1))


def worker_cores(settings: Settings, available: int | None = None) -> int:
    """The CPU cores one worker may use: the pod's share the operator passed, else the cores this
    process may run on (a container sees every core of its node, so the operator's count wins)."""
    if settings.cpus:
        return settings.cpus
    cores = len(available_cores()) if available is None else available
    return max(1, cores // settings.workers)


@dataclass(frozen=True)
class Placement:
    http: frozenset[int]  # the HTTP process: the last core
    engine: frozenset[int]  # the engine thread on a step that leaves HTTP its core: the others

    @property
    def every(self) -> frozenset[int]:
        """The worker's cores: a step on all of them runs on all of them."""
        return self.http | self.engine

    def for_step(self, threads: int) -> frozenset[int]:
        """The engine thread's cores for a step on `threads` torch threads."""
        return self.engine if threads <= len(self.engine) else self.every

    def suits(self, plan: ThreadPlan, max_rows: int) -> bool:
        """Whether decode steps (at most `max_rows` tokens) leave HTTP its core: a model whose decode
        steps run on every core would have torch's extra thread and the pinned event loop contend for
        one core while the other core's time goes unused."""
        return plan.large <= len(self.engine) or plan.min_tokens > max_rows


def plan_placement(settings: Settings, available: frozenset[int]) -> Placement | None:
    """Where the two processes run, or None to leave it to the kernel (see the module doc)."""
    if not settings.cpu_placement or not settings.engine_process or settings.workers != 1:
        return None
    if not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"):
        return None  # not Linux: nothing to pin with
    if len(available) < 2 or len(available) > worker_cores(settings, len(available)):
        return None
    ordered = sorted(available)
    return Placement(http=frozenset(ordered[-1:]), engine=frozenset(ordered[:-1]))


# Placement is an optimization: a pin the kernel refuses (a cpuset changed under the pod) is logged
# and serving goes on where the kernel put it - it must never fail a step or stop the event reader.


def pin_process(cores: frozenset[int]) -> bool:
    """Move every thread of this process onto `cores` (threads started later inherit it); False if refused."""
    try:
        for task in os.listdir("/proc/self/task"):
            with contextlib.suppress(ProcessLookupError):  # a thread that ended since the listing
                os.sched_setaffinity(int(task), cores)
    except OSError as exc:
        log.warning("CPU placement refused: the HTTP process stays where it is", extra={"cores": sorted(cores), "error": str(exc)})
        return False
    return True


def pin_thread(cores: frozenset[int]) -> bool:
    """Move the calling thread onto `cores`; False if the kernel refused."""
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:
        log.warning("CPU placement refused: the engine thread stays where it is", extra={"cores": sorted(cores), "error": str(exc)})
        return False
    return True
