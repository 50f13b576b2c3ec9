"""The servers a benchmark compares: how each is started, warmed, paused and stopped.

``ours`` and its variants (environment switches, ``VARIANT_ENV``), the seed article's design
(``bench/baselines/seed_server.py``) and ``transformers serve --continuous-batching``, each a
subprocess in a session of its own on a free loopback port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SERVER_SYSTEMS = (
    *("ours", "ours-omp1", "ours-allcores", "ours-thread", "ours-nocache", "ours-noplace", "ours-unfused", "ours-kvtight"),
    *("seed", "seed-omp1", "seed-locked", "tserve", "tserve-omp1"),
)
ALL_SYSTEMS = (*SERVER_SYSTEMS, "inprocess")
VARIANT_ENV = {
    "omp1": {"OMP_NUM_THREADS": "1"},  # one intra-op thread
    "thread": {"LLMSERVICE_ENGINE_PROCESS": "false"},  # ours: the engine on a thread of the server process
    "nocache": {"LLMSERVICE_PREFIX_CACHE_MIB": "0"},  # ours without the prefix cache
    "noplace": {"LLMSERVICE_CPU_PLACEMENT": "false"},  # ours with the kernel placing both processes
    "unfused": {"LLMSERVICE_FUSED_FORWARD": "false"},  # ours with transformers' forward instead of the engine's own
    "kvtight": {"LLMSERVICE_KV_CACHE_MIB": "1"},  # ours with a 1 MiB K/V cache: 2048 tokens of the tiny model, rows preempted
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerSpec:
    system: str
    argv: list[str]
    port: int
    ready_path: str
    livez_path: str
    env: dict[str, str] = field(default_factory=dict)
    model_name: str | None = None  # None: ask GET /v1/models


def server_spec(system: str, model_dir: Path, max_num_seqs: int, device: str = "cpu", dtype: str = "float32") -> ServerSpec:
    """How each system is started; '-omp1': OMP_NUM_THREADS=1 (one intra-op thread); 'ours-allcores': a torch thread per core."""
    port = free_port()
    python = sys.executable
    base, _, variant = system.partition("-")
    env = dict(VARIANT_ENV.get(variant, {}))
    if base == "ours":
        argv = [python, "-m", "llmservice_server.main", "--model", str(model_dir), "--max-num-seqs", str(max_num_seqs)]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--drain-seconds", "1", "--max-queue", "512"]
        argv += ["--device", device, "--dtype", dtype]
        if variant == "allcores":  # as shipped small steps leave a core to HTTP (and the load generator, here)
            argv += ["--torch-threads", str(len(os.sched_getaffinity(0)))]
        return ServerSpec(system, argv, port, "/readyz", "/livez", env)
    if base == "seed":
        argv = [python, str(REPO / "bench" / "baselines" / "seed_server.py"), "--model", str(model_dir), "--port", str(port)]
        argv += ["--device", device, "--dtype", dtype]
        argv += ["--design", "locked"] if variant == "locked" else []
        return ServerSpec(system, argv, port, "/livez", "/livez", env)
    if base == "tserve":
        # Its paged KV cache is sized from free RAM by default (60-90 % of it: ~14 GiB here, OOM-killed
        # with two instances up); 512 pages of 32 tokens hold 32 streams of 512 tokens, more than asked.
        argv = [str(VENV_BIN / "transformers"), "serve", str(model_dir), "--continuous-batching"]
        argv += ["--cb-block-size", "32", "--cb-num-blocks", "512", "--cb-max-batch-tokens", "4096"]
        argv += ["--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype, "--log-level", "warning"]
        return ServerSpec(system, argv, port, "/health", "/health", env | {"HF_HUB_OFFLINE": "1"}, model_name=str(model_dir))
    raise ValueError(system)


class Server:
    """A server subprocess: started on loopback, waited for, stopped by its own pid."""

    def __init__(self, spec: ServerSpec, log_path: Path) -> None:
        self.spec = spec
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{spec.port}"
        self.model = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def pause(self) -> None:
        """SIGSTOP: a paused server takes no CPU while another system is measured."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)  # its whole session: an engine process too

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)
            time.sleep(0.2)

    def start(self, timeout: float) -> float:
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | self.spec.env
        started = time.monotonic()
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(self.spec.argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        deadline = started + timeout
        with httpx.Client(timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.spec.system} exited with {self.proc.returncode} during startup; see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.base_url + self.spec.ready_path).status_code == 200:
                        return time.monotonic() - started
                time.sleep(0.5)
        raise RuntimeError(f"{self.spec.system} not ready after {timeout:.0f} s; see {self.log_path}")

    def model_name(self) -> str:
        if self.spec.model_name is not None:
            return self.spec.model_name
        with httpx.Client(timeout=10.0) as client:
            return str(client.get(self.base_url + "/v1/models").json()["data"][0]["id"])

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""
