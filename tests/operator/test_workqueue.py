"""The work queue collapses bursts, serialises a key, and retries with backoff."""

from __future__ import annotations

import asyncio
import itertools

from llmservice_operator.workqueue import RetryLater, WorkQueue


def test_a_burst_of_events_for_one_key_runs_at_most_twice() -> None:
    async def scenario() -> list[str]:
        runs: list[str] = []
        gate = asyncio.Event()

        async def handler(key: str) -> None:
            runs.append(key)
            await gate.wait()

        queue: WorkQueue[str] = WorkQueue(handler, workers=4, base_delay=0.01, max_delay=0.1)
        queue.start()
        for _ in range(50):
            queue.add("ns/a")
        await asyncio.sleep(0.01)
        for _ in range(50):
            queue.add("ns/a")  # while running: remembered once, run again after
        gate.set()
        await asyncio.wait_for(queue.join(), 5)
        await asyncio.sleep(0.01)
        await asyncio.wait_for(queue.join(), 5)
        await queue.stop()
        return runs

    assert asyncio.run(scenario()) == ["ns/a", "ns/a"]


def test_failures_come_back_after_a_growing_delay_and_stop_once_healed() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        times: list[float] = []
        done = asyncio.Event()

        async def handler(key: str) -> None:
            times.append(loop.time())
            if len(times) < 4:
                raise RetryLater("transient")
            done.set()

        queue: WorkQueue[str] = WorkQueue(handler, workers=1, base_delay=0.02, max_delay=1.0)
        queue.start()
        queue.add("ns/a")
        await asyncio.wait_for(done.wait(), 5)
        await asyncio.sleep(0.1)
        await queue.stop()
        return times

    times = asyncio.run(scenario())
    assert len(times) == 4, "a healed key must not be retried again"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 0.02 and gaps[1] >= 0.04 and gaps[2] >= 0.08


def test_add_after_runs_a_key_once_its_delay_has_passed_and_a_later_call_replaces_it() -> None:
    async def scenario() -> list[tuple[str, float]]:
        loop = asyncio.get_running_loop()
        runs: list[tuple[str, float]] = []
        ran = asyncio.Event()

        async def handler(key: str) -> None:
            runs.append((key, loop.time()))
            ran.set()

        queue: WorkQueue[str] = WorkQueue(handler, workers=1, base_delay=0.01, max_delay=0.1)
        queue.start()
        start = loop.time()
        queue.add_after("ns/a", 5.0)
        queue.add_after("ns/a", 0.2)  # the deadline moved: one run, at the new time
        await asyncio.wait_for(ran.wait(), 5)
        await asyncio.sleep(0.3)
        await queue.stop()
        return [(key, at - start) for key, at in runs]

    runs = asyncio.run(scenario())
    assert [key for key, _ in runs] == ["ns/a"]
    assert 0.15 <= runs[0][1] < 2.0
