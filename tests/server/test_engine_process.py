"""The engine's child process: a death the server reports, a parent it never outlives, and the thread mode."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import openai

from .conftest import BackgroundStream, ServerProcess
from .test_lifecycle import metric, wait_for
from .test_workers import alive, children


def engine_pid(server: ServerProcess) -> int:
    """The server's engine process: its child running multiprocessing's spawn entry point."""
    found = [pid for pid in children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(found) == 1, (found, server.logs())
    return found[0]


def test_the_http_process_does_not_load_torch(server: ServerProcess) -> None:
    assert "libtorch" not in Path(f"/proc/{server.proc.pid}/maps").read_text()
    assert "libtorch" in Path(f"/proc/{engine_pid(server)}/maps").read_text()  # where it belongs


def test_a_dead_engine_fails_its_streams_and_ends_the_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    termination_log = tmp_path / "termination.log"
    server = ServerProcess(tiny_model_dir, tmp_path / "server.log", termination_log=termination_log)
    try:
        server.wait_ready()
        reader = BackgroundStream(server.url, max_tokens=2000, timeout=60)
        assert reader.first.wait(30)
        os.kill(engine_pid(server), signal.SIGKILL)  # what the kernel's OOM killer does

        reader.thread.join(30)
        assert not reader.thread.is_alive()
        assert reader.events[-1] == "data: [DONE]"
        error = json.loads(reader.events[-2].removeprefix("data: "))["error"]
        assert "engine process exited unexpectedly" in error["message"], error
        assert error["type"] == "server_error"

        # Not a pod that answers 503 until a probe gives up: the server exits, the kubelet restarts it now.
        assert server.proc.wait(timeout=30) != 0, server.logs()
        reason = termination_log.read_text()
        assert reason == "the engine failed: the engine process exited unexpectedly (exit code -9)\n", reason
    finally:
        server.stop()


def test_the_engine_does_not_outlive_a_killed_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_model_dir, tmp_path / "server.log")
    try:
        server.wait_ready()
        engine = engine_pid(server)
        server.proc.kill()  # no drain, no Stop message: the engine sees its pipe close
        server.proc.wait(timeout=10)
        wait_for(lambda: not alive(engine), 15, "the orphaned engine process to exit")
    finally:
        server.stop()


def test_the_engine_can_run_as_a_thread(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = ServerProcess(tiny_model_dir, tmp_path / "server.log", env={"LLMSERVICE_ENGINE_PROCESS": "false"})
    try:
        server.wait_ready()
        assert not any(b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children(server.proc.pid))
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        stream = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, stream=True)
        texts = [chunk.choices[0].text for chunk in stream if chunk.choices]
        whole = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0)
        assert "".join(texts) == whole.choices[0].text  # greedy: the same tokens either way
        assert whole.usage is not None and whole.usage.completion_tokens == 6
        assert metric(server, "vllm:generation_tokens_total") == 12
    finally:
        server.stop()
