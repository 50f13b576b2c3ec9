"""Loading, cancellation, responsiveness and SIGTERM drain, against real server processes."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import statistics
import threading
import time
from pathlib import Path

import httpx

from .conftest import BackgroundStream, ServerProcess


def metric(server: ServerProcess, name: str) -> float:
    text = server.get("/metrics").text
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE):
        total += float(match.group(1))
    return total


def wait_for(predicate: object, deadline: float, what: str) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_disconnect_cancels_and_frees_the_slot(server: ServerProcess) -> None:
    aborted_before = metric(server, "vllm:request_success_total")
    generated_before = metric(server, "vllm:generation_tokens_total")
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2000, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        wait_for(lambda: metric(server, "vllm:num_requests_running") == 1, 10, "the request to run")
    # Leaving the block closed the connection mid-stream.
    wait_for(lambda: metric(server, "vllm:num_requests_running") == 0, 10, "running back to 0")
    assert metric(server, "vllm:request_success_total") == aborted_before + 1
    assert 'finished_reason="abort"' in server.get("/metrics").text
    assert metric(server, "vllm:generation_tokens_total") - generated_before < 2000
    reply = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3}, timeout=30)
    assert reply.status_code == 200


def test_event_loop_stays_responsive_under_load(server: ServerProcess) -> None:
    async def generate(client: httpx.AsyncClient) -> None:
        body = {"model": "tiny", "prompt": "Tell me a story", "max_tokens": 300, "temperature": 0.8, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            async for _ in response.aiter_lines():
                pass

    def probe(latencies: list[float], stop: threading.Event) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set():
                started = time.perf_counter()
                assert client.get("/livez").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)

    async def load() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            await asyncio.gather(*(generate(client) for _ in range(16)))

    latencies: list[float] = []
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(latencies, stop))
    prober.start()
    try:
        asyncio.run(load())
    finally:
        stop.set()
        prober.join()
    assert len(latencies) > 20
    p99 = statistics.quantiles(latencies, n=100)[98]
    assert p99 < 0.25, f"/livez p99 {p99 * 1000:.0f} ms under load"


def test_loading_then_sigterm_drain(tiny_model_dir: Path, tmp_path: Path) -> None:
    # The drain budget is generous so the stream can finish even on a loaded 2-core machine.
    proc = ServerProcess(tiny_model_dir, tmp_path / "server.log", load_delay_seconds=4, drain_seconds=180)
    try:
        # While the model loads: alive, not started, not ready (with the stage), API 503.
        wait_for(lambda: _answers(proc), 120, "the server to listen")
        ready = proc.get("/readyz")
        assert ready.status_code == 503 and ready.json()["stage"] in {"starting", "delayed", "loading", "loading_model", "warming"}
        assert proc.get("/livez").status_code == 200
        assert proc.get("/startupz").status_code == 503
        early = httpx.post(proc.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        proc.wait_ready()
        assert proc.get("/startupz").status_code == 200

        # A long stream is in flight when SIGTERM arrives.
        reader = BackgroundStream(proc.url, max_tokens=1500, timeout=240)
        assert reader.first.wait(30)
        proc.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: proc.get("/readyz").status_code == 503, 10, "readiness to drop")
        assert proc.get("/readyz").json()["stage"] == "draining"
        refused = httpx.post(proc.url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert reader.thread.is_alive(), "the stream should still be running during the drain"
        reader.thread.join(240)
        events = reader.events
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2].removeprefix("data: ")).get("usage")
        assert usage is not None, f"the stream did not finish within the drain: {events[-2]}"
        assert usage["completion_tokens"] == 1500
        assert proc.proc.wait(timeout=60) == 0, proc.logs()
    finally:
        proc.stop()


def _answers(proc: ServerProcess) -> bool:
    try:
        proc.get("/livez")
        return True
    except httpx.TransportError:
        return False
