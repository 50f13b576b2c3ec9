"""`--workers 2`: two uvicorn worker processes (each with its engine process) behind one port, one /metrics, one clean shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from pathlib import Path

import httpx

from .conftest import STARTUP_DEADLINE, BackgroundStream, ServerProcess
from .test_lifecycle import metric, wait_for

WORKERS = 2
LOAD_DELAY = 5  # seconds each worker waits before loading: a window in which it cannot serve
DRAIN_SECONDS = 30
# The parent waits for every worker to drain (DRAIN_SECONDS at most), then uvicorn's graceful
# shutdown and the engine thread's stop; the rest is slack for a box shared with a benchmark.
EXIT_BUDGET = DRAIN_SECONDS + 30
BATCH = 8  # concurrent requests per round
MAX_ROUNDS = 10


def children(pid: int) -> set[int]:
    """Live (non-zombie) processes whose parent is `pid`."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def descendants(pid: int) -> set[int]:
    found = children(pid)
    for child in set(found):
        found |= descendants(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def logged_pids(server: ServerProcess, message: str) -> set[int]:
    """Processes that logged `message` (every JSON log line carries its pid)."""
    pids = set()
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("message") == message:
                pids.add(int(entry["pid"]))
    return pids


async def burst(url: str, count: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(count)))
    return [r.status_code for r in responses]


def test_two_workers_share_metrics_and_shut_down_cleanly(tiny_model_dir: Path, tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = ServerProcess(
        tiny_model_dir,
        tmp_path / "server.log",
        env={"TMPDIR": str(tmp)},
        workers=WORKERS,
        drain_seconds=DRAIN_SECONDS,
        load_delay_seconds=LOAD_DELAY,
    )
    try:
        # A worker takes connections only once its model is loaded (uvicorn listens on the shared
        # socket after the lifespan startup): the first answer is "ready", never "loading".
        wait_for(lambda: _listening(proc), STARTUP_DEADLINE, "a worker to listen")
        first = httpx.get(proc.url + "/readyz", timeout=10)
        assert first.status_code == 200, first.text
        wait_for(lambda: len(logged_pids(proc, "Server started")) == WORKERS, 120, "every worker to load its model")
        workers = logged_pids(proc, "Server started")
        assert workers <= children(proc.proc.pid), proc.logs()
        # Each worker's engine runs in a process of its own, a child of that worker.
        engines = logged_pids(proc, "Model ready")
        assert len(engines) == WORKERS, proc.logs()
        assert all(len(children(worker) & engines) == 1 for worker in workers), proc.logs()
        everyone = descendants(proc.proc.pid)  # workers, their engines, multiprocessing's resource trackers
        assert metric(proc, "vllm:request_success_total") == 0

        # Concurrent rounds until both workers have answered (the kernel picks who accepts).
        sent = 0
        for _ in range(MAX_ROUNDS):
            statuses = asyncio.run(burst(proc.url, BATCH))
            sent += len(statuses)
            assert statuses == [200] * len(statuses), statuses
            if logged_pids(proc, "POST /v1/completions 200") == workers:
                break
        assert logged_pids(proc, "POST /v1/completions 200") == workers, "one worker served everything: nothing to aggregate"

        # Whichever worker answers /metrics reports the sum over both.
        for _ in range(4):
            assert metric(proc, "vllm:request_success_total") == sent
            assert metric(proc, "vllm:generation_tokens_total") == 8 * sent
        assert metric(proc, "vllm:num_requests_running") == 0

        # A stream is in flight when the parent gets SIGTERM: it completes, then everything exits.
        reader = BackgroundStream(proc.url, max_tokens=400, timeout=120)
        assert reader.first.wait(30)
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        reader.thread.join(EXIT_BUDGET)
        events = reader.events
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 400
        assert proc.proc.wait(timeout=EXIT_BUDGET) == 0, proc.logs()
        assert time.monotonic() - started < EXIT_BUDGET
        wait_for(lambda: not any(alive(pid) for pid in everyone), 10, "the worker processes to be gone")
        assert list(tmp.iterdir()) == [], "the multiprocess metrics directory was left behind"
    finally:
        proc.stop()


def _listening(proc: ServerProcess) -> bool:
    try:
        socket.create_connection(("127.0.0.1", proc.port), timeout=1).close()
        return True
    except OSError:
        return False
