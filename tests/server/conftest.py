"""Fixtures for the inference server tests: a tiny model built once, real server processes.

Servers run as real processes (`python -m llmservice_server.main`) on 127.0.0.1 with a free port,
so the tests exercise uvicorn, signals and the HTTP protocol exactly as deployed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from devtools.ports import free_port
from devtools.tiny_model import build_tiny_model

STARTUP_DEADLINE = 120.0  # seconds; importing torch + transformers is slow on a busy 2-core box


class ServerProcess:
    def __init__(self, model: Path, log_path: Path, *, env: dict[str, str] | None = None, **settings: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        environment = {k: v for k, v in os.environ.items() if not k.startswith("LLMSERVICE_")}
        environment.update({"HF_HUB_OFFLINE": "1", "LLMSERVICE_CACHE_DIR": str(log_path.parent / "cache")})
        # A server that gives up writes why here, not to the machine's /dev/termination-log (tests may run as root).
        environment["LLMSERVICE_TERMINATION_LOG"] = str(log_path.parent / "termination.log")
        environment.update(env or {})
        args = [sys.executable, "-m", "llmservice_server.main", "--model", str(model)]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "tiny"]
        for key, value in settings.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=environment)

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)  # type: ignore[arg-type]

    def wait_ready(self, deadline: float = STARTUP_DEADLINE) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if self.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {deadline} s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log.close()


class BackgroundStream:
    """A streaming completion read on its own thread, so a test can act while it is in flight."""

    def __init__(self, url: str, max_tokens: int, timeout: float) -> None:
        self.events: list[str] = []
        self.first = threading.Event()
        body = {
            "model": "tiny",
            "prompt": "Hello",
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        self.thread = threading.Thread(target=self._read, args=(url + "/v1/completions", body, timeout))
        self.thread.start()

    def _read(self, url: str, body: dict[str, object], timeout: float) -> None:
        with httpx.stream("POST", url, json=body, timeout=timeout) as response:
            for line in response.iter_lines():
                if line:
                    self.events.append(line)
                    self.first.set()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(tiny_model_dir, tmp_path_factory.mktemp("server") / "server.log", max_num_seqs=16, max_queue=32)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


KEPT = [100, 101, 102, 103]  # the only tokens the stop-heavy copy does not treat as EOS


@pytest.fixture(scope="session")
def stop_heavy_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The tiny model, copied with two changes: every token but `KEPT` declared an EOS in its
    generation config (the real EOS is never chosen, so EOS behaviour needs this), and the plain
    chat template of a model that knows no tools."""
    model = tmp_path_factory.mktemp("stop-heavy") / "model"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "generation_config.json"
    config = json.loads(config_path.read_text())
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    config["eos_token_id"] = [t for t in range(vocab) if t not in KEPT]
    config_path.write_text(json.dumps(config))
    plain = "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    (model / "chat_template.jinja").write_text(plain + "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    proc = ServerProcess(model, model.parent / "server.log", max_num_seqs=4)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
