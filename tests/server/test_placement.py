"""CPU placement: the pure plan, and where a real server's threads end up."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from llmservice_server.placement import Placement, pin_process, pin_thread, plan_placement
from llmservice_server.settings import Settings
from llmservice_server.threads import ThreadPlan, plan_threads

from .conftest import ServerProcess


def test_a_worker_that_owns_its_cores_gives_http_the_last() -> None:
    placement = plan_placement(Settings(), frozenset({0, 1}))
    assert placement == Placement(http=frozenset({1}), engine=frozenset({0}))
    assert placement.every == {0, 1}
    assert placement.for_step(1) == {0}  # the plan's small step leaves HTTP its core
    assert placement.for_step(2) == {0, 1}  # a step on every core runs on every core


def test_the_cores_need_not_be_contiguous() -> None:
    placement = plan_placement(Settings(cpus=3), frozenset({7, 3, 5}))
    assert placement is not None
    assert (placement.http, placement.engine) == ({7}, {3, 5})
    assert placement.for_step(2) == {3, 5} and placement.for_step(3) == {3, 5, 7}


@pytest.mark.parametrize(
    ("settings", "available", "why"),
    [
        (Settings(cpus=2), frozenset(range(16)), "a CPU quota on a larger node: the cores are not the pod's"),
        (Settings(), frozenset({0}), "one core: nothing to split"),
        (Settings(workers=2), frozenset({0, 1, 2, 3}), "several workers: each pair would need cores of its own"),
        (Settings(engine_process=False), frozenset({0, 1}), "the engine on a thread: one process"),
        (Settings(cpu_placement=False), frozenset({0, 1}), "turned off"),
    ],
)
def test_otherwise_the_kernel_places_both(settings: Settings, available: frozenset[int], why: str) -> None:
    assert plan_placement(settings, available) is None, why


def test_a_cpuset_smaller_than_the_cpus_passed_is_still_owned() -> None:
    assert plan_placement(Settings(cpus=4), frozenset({0, 1})) is not None


def test_only_a_model_whose_decode_steps_leave_a_core_free_is_placed() -> None:
    placement = plan_placement(Settings(), frozenset({0, 1}))
    assert placement is not None
    tiny, smollm2 = plan_threads(cores=2, hidden_size=64), plan_threads(cores=2, hidden_size=576)
    assert placement.suits(tiny, max_rows=32)  # one thread below 611 tokens: decode never takes both cores
    assert not placement.suits(smollm2, max_rows=32)  # 8 rows and up run on both cores
    assert placement.suits(smollm2, max_rows=7)
    assert placement.suits(ThreadPlan(1, 1, 1), max_rows=32)  # an explicit count under the cores
    assert not placement.suits(ThreadPlan(2, 2, 1), max_rows=32)


def test_a_pin_the_kernel_refuses_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    before = os.sched_getaffinity(0)
    nowhere = frozenset({max(before) + 4096})  # no such core: the kernel answers EINVAL
    assert pin_thread(nowhere) is False
    assert pin_process(nowhere) is False
    assert os.sched_getaffinity(0) == before
    assert [r.message for r in caplog.records].count("CPU placement refused: the engine thread stays where it is") == 1
    assert any("the HTTP process stays" in r.message for r in caplog.records)


# --- a real server ---


def _threads(pid: int) -> list[frozenset[int]]:
    """The cores each thread of `pid` may run on."""
    return [frozenset(os.sched_getaffinity(int(task))) for task in os.listdir(f"/proc/{pid}/task")]


def _engine_child(pid: int) -> int:
    """The engine process: the child of `pid` running multiprocessing's spawn entry point."""
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError(f"no engine process under {pid}")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) != 2, reason="the thread counts below are those of two cores")
@pytest.mark.parametrize(
    ("enabled", "torch_threads", "placed"),
    [
        (True, 1, True),  # one thread on every step: the engine thread's cores are the same at every step
        (False, 1, False),  # turned off
        (True, 2, False),  # every step on both cores: nothing to keep off HTTP's core
    ],
)
def test_a_served_step_runs_the_engine_off_the_http_core(
    tiny_model_dir: Path, tmp_path: Path, enabled: bool, torch_threads: int, placed: bool
) -> None:
    every = frozenset(os.sched_getaffinity(0))
    last = frozenset({max(every)})
    env = {"LLMSERVICE_CPU_PLACEMENT": str(enabled).lower()}
    proc = ServerProcess(tiny_model_dir, tmp_path / "server.log", env=env, torch_threads=torch_threads)
    try:
        proc.wait_ready()
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        assert httpx.post(proc.url + "/v1/completions", json=body, timeout=30).status_code == 200
        http, engine = _threads(proc.proc.pid), _threads(_engine_child(proc.proc.pid))
        if placed:
            assert set(http) == {last}, "every thread of the HTTP process is on the last core"
            assert sorted(map(sorted, engine)).count(sorted(every - last)) == 1, "the engine thread is on the others"
            assert set(engine) == {every, every - last}, "the rest of the engine process keeps every core"
        else:
            assert set(http) == set(engine) == {every}
    finally:
        proc.stop()
