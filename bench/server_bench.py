"""The inference server against its baselines, in one run, on one model and one machine.

Systems (``--systems``):

- ``ours``: ``python -m llmservice_server.main --model <dir> --max-num-seqs 32`` (streaming SSE),
  its engine in a child process; ``ours-thread``: the engine on a thread of the server process
  (``LLMSERVICE_ENGINE_PROCESS=false``, the design before the split);
- ``ours-omp1`` (and optionally ``seed-omp1``, ``tserve-omp1``): the same server started with
  ``OMP_NUM_THREADS=1`` (one intra-op thread) - on a small, shared CPU the thread setting decides
  more than the design does (docs/benchmarks.md, "## Server"); ``ours-allcores``: ours with
  ``--torch-threads`` = every core this process may use for every step (as shipped the server
  chooses per step: every core for a step with large matrix products, one fewer for a small one);
  ``ours-nocache``: ours with the prefix cache off (``LLMSERVICE_PREFIX_CACHE_MIB=0``);
  ``ours-noplace``: ours with CPU placement off (``LLMSERVICE_CPU_PLACEMENT=false``: the kernel
  places the HTTP and the engine process); ``ours-unfused``: ours with transformers' forward
  instead of the engine's own (``LLMSERVICE_FUSED_FORWARD=false``, ``decoder.py``);
- ``seed``: the seed article's design as written, ``bench/baselines/seed_server.py`` (one
  ``model.generate`` thread per request streaming through a ``TextIteratorStreamer`` that the
  event loop waits on); ``seed-locked``: the same server with ``--design locked`` (one locked
  ``model.generate`` per request in the default threadpool, nothing streamed);
- ``tserve``: ``transformers serve --continuous-batching`` on the same model directory;
- ``inprocess``: no HTTP at all - bare ``model.generate`` at batch 1 and static left-padded batches
  of N (the batching ceiling; ``STATIC_BATCHES`` of them timed together), each under the default
  thread setting and ``OMP_NUM_THREADS=1`` (the ceiling is the better of the two), our engine
  driven without HTTP, and the memory-bandwidth / GEMM roofline measured now; a round of these
  runs before each repeat of the servers, so ceilings and servers meet the same machine; and the
  level's static batch is timed again beside every server run (``bench/paired_ceiling.py``: before a
  level's first server and after each one), because the machine's speed drifts within seconds.

Every server is started on a free loopback port, warmed up, and driven by bench/loadgen.py at each
concurrency (``--concurrency``) with the same seeded mixed-length workload (each repeat in other
words of the same lengths, so no prompt is one a server read before); /livez (or /health)
is polled every 50 ms from a separate thread during each run. The CPU used by other processes on
the machine is measured per run (from /proc/stat minus this process and the server, a server
being its whole session: server and engine process), because the machine is shared. Results:
bench/results/server-<model>.json and server-<model>.png, and markdown tables on stdout.
Nothing here fails on a missed target.

    .venv/bin/python bench/server_bench.py                      # tiny random model, all systems
    .venv/bin/python bench/server_bench.py --model smollm2      # SmolLM2-135M (fewer requests)
    .venv/bin/python bench/server_bench.py --systems ours seed --concurrency 1 16
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(REPO))

from bench.loadgen import SLO, LoadConfig, RequestSpec, make_workload, run_benchmark  # noqa: E402
from bench.loadgen import run as run_loadgen  # noqa: E402
from bench.paired_ceiling import PairedCeiling  # noqa: E402
from bench.paired_ceiling import fraction as paired_fraction  # noqa: E402
from bench.plots import pyplot  # noqa: E402

log = logging.getLogger("bench.server")

RESULTS_DIR = REPO / "bench" / "results"
VENV_BIN = Path(sys.executable).parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_SYSTEMS = (
    *("ours", "ours-omp1", "ours-allcores", "ours-thread", "ours-nocache", "ours-noplace", "ours-unfused"),
    *("seed", "seed-omp1", "seed-locked", "tserve", "tserve-omp1"),
)
ALL_SYSTEMS = (*SERVER_SYSTEMS, "inprocess")
VARIANT_ENV = {
    "omp1": {"OMP_NUM_THREADS": "1"},  # one intra-op thread
    "thread": {"LLMSERVICE_ENGINE_PROCESS": "false"},  # ours: the engine on a thread of the server process
    "nocache": {"LLMSERVICE_PREFIX_CACHE_MIB": "0"},  # ours without the prefix cache
    "noplace": {"LLMSERVICE_CPU_PLACEMENT": "false"},  # ours with the kernel placing both processes
    "unfused": {"LLMSERVICE_FUSED_FORWARD": "false"},  # ours with transformers' forward instead of the engine's own
}
DEFAULT_SYSTEMS = ("ours", "ours-omp1", "seed", "seed-locked", "tserve", "inprocess")
TARGETS = {
    "ours_over_seed_at_16": 15.0,
    "ours_over_tserve_at_16": 1.4,
    "ours_fraction_of_static_at_16": 0.80,
    "ours_fraction_of_bare_at_1": 0.90,
    "livez_p99_ms_saturated": 20.0,
}


@dataclass(frozen=True)
class ModelProfile:
    """Per-model workload defaults: the tiny model is cheap, SmolLM2 is ~100x more work per token."""

    prompt_words: tuple[int, int]
    output_tokens: tuple[int, int]
    min_prompts: int  # requests per level at least
    prompts_per_stream: int  # ... and this many per concurrent stream
    max_duration: float  # no new request after this many seconds in a level
    slo_ttft_ms: float
    slo_tpot_ms: float


# 8 requests per stream: at 2 per stream a 16-stream level of ours lasted 0.7 s, so ramp-up and
# the last requests' tail were a large part of what it measured.
_TINY = ModelProfile((16, 64), (32, 96), 16, 8, 90.0, 1000.0, 100.0)
PROFILES = {
    "tiny": _TINY,
    "tiny-3m": _TINY,
    # 4 per stream: with 1, every level was a single wave, whose mixed lengths leave the batch a
    # third empty at the end; the static batch it is held against has no such tail.
    "smollm2": ModelProfile((16, 48), (16, 48), 4, 4, 150.0, 3000.0, 300.0),
}


# --- machine and process accounting ------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    versions = {}
    for dist in ("torch", "transformers", "fastapi", "uvicorn", "httpx", "starlette", "pydantic"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "top_processes_at_start": _top_processes(),
    }


def source_state() -> dict[str, Any]:
    """The commit measured, and whether the server's files differ from it (uncommitted work)."""

    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        return ""

    diff = git("diff", "HEAD", "--", "server")
    return {
        "commit": git("rev-parse", "HEAD"),
        "server_uncommitted": git("status", "--short", "server", "bench").splitlines(),
        "server_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
    }


def _top_processes(limit: int = 8) -> list[str]:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=10, check=False).stdout
        return [" ".join(line.split()) for line in out.splitlines()[1 : limit + 1]]
    return []


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def _proc_ticks(session: int) -> int:
    """CPU ticks of every process in a server's session: the server and any processes it started.

    Servers start in a session of their own (`start_new_session`), so a server whose engine runs
    in a child process (ours by default) is counted whole; exited children count through their
    parent's cutime/cstime once reaped.
    """
    ticks = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = stat_path.read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == session:  # state ppid pgrp session ...
                ticks += sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ticks


@dataclass
class CpuMeter:
    """CPU used during a window: by the machine, by the server process, by this process, by others."""

    server_pid: int | None
    start_wall: float = 0.0
    start_machine: tuple[int, int] = (0, 0)
    start_server: int = 0
    start_self: float = 0.0

    def __enter__(self) -> CpuMeter:
        self.start_wall = time.perf_counter()
        self.start_machine = _machine_ticks()
        self.start_server = _proc_ticks(self.server_pid) if self.server_pid else 0
        self.start_self = _self_cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> dict[str, float]:
        wall = max(time.perf_counter() - self.start_wall, 1e-9)
        busy, _ = _machine_ticks()
        machine_cores = (busy - self.start_machine[0]) / CLOCK_TICKS / wall
        server = ((_proc_ticks(self.server_pid) - self.start_server) / CLOCK_TICKS / wall) if self.server_pid else 0.0
        mine = (_self_cpu() - self.start_self) / wall
        return {
            "wall_s": wall,
            "machine_busy_cores": machine_cores,
            "server_cores": server,
            "bench_cores": mine,
            "other_cores": max(0.0, machine_cores - server - mine),
            "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        }


def _self_cpu() -> float:
    """This process and its reaped children (the in-process workers); running servers are counted by pid."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


# --- servers ---------------------------------------------------------------------------------------


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


# --- one system through all levels -----------------------------------------------------------------


def level_workload(profile: ModelProfile, concurrency: int, seed: int, num_prompts: int | None, repeat: int = 0) -> list[RequestSpec]:
    n = num_prompts or max(profile.min_prompts, profile.prompts_per_stream * concurrency)
    return make_workload(n, seed * 1000 + concurrency, profile.prompt_words, profile.output_tokens, variant=repeat)


def level_config(server: Server, args: argparse.Namespace, profile: ModelProfile, *, concurrency: int | None, rate: float) -> LoadConfig:
    return LoadConfig(
        server.base_url,
        server.model,
        request_rate=rate,
        max_concurrency=concurrency,
        max_duration=args.max_duration or profile.max_duration,
        drain_timeout=args.drain_timeout,
        seed=args.seed,
        livez_url=server.base_url + server.spec.livez_path,
        slo=SLO(ttft_ms=args.slo_ttft_ms or profile.slo_ttft_ms, tpot_ms=args.slo_tpot_ms or profile.slo_tpot_ms),
    )


def start_system(spec: ServerSpec, args: argparse.Namespace, profile: ModelProfile, work: Path) -> tuple[Server | None, dict[str, Any]]:
    """Start, warm up and pause (SIGSTOP) one server; its result dict records how that went."""
    result: dict[str, Any] = {"command": spec.argv, "env": spec.env, "levels": {}, "rates": {}, "runs": []}
    if spec.system.startswith("tserve"):
        result["transformers_version"] = importlib.metadata.version("transformers")
    server = Server(spec, work / f"{spec.system}.log")
    try:
        result["startup_s"] = server.start(args.startup_timeout)
        server.model = result["model_name"] = server.model_name()
        # Warm-up: first-call costs (tserve builds its continuous-batching manager on the first request).
        warm = make_workload(8, args.seed + 99, profile.prompt_words, (8, 16))
        warm_config = LoadConfig(server.base_url, server.model, max_concurrency=4, max_duration=300, drain_timeout=300, seed=1)
        warm_summary = run_loadgen(run_benchmark(warm_config, warm))
        result["warmup"] = {k: warm_summary[k] for k in ("completed", "failed", "errors", "duration_s")}
        if warm_summary["completed"] == 0:
            raise RuntimeError(f"warm-up failed: {warm_summary['errors']}")
        with CpuMeter(server.pid) as meter:
            time.sleep(3)
            result["idle_server_cores"] = meter.read()["server_cores"]
        server.pause()
        return server, result
    except Exception as exc:
        log.warning("%s failed to start: %s", spec.system, exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["log_tail"] = server.log_tail()
        server.stop()
        return None, result


def run_level(server: Server, config: LoadConfig, workload: list[RequestSpec], keep_requests: bool) -> dict[str, Any]:
    """One load level against one server, resumed (SIGCONT) for the run and paused again after."""
    server.resume()
    try:
        with CpuMeter(server.pid) as meter:
            summary = run_loadgen(run_benchmark(config, workload))
            summary["cpu"] = meter.read()
    finally:
        server.pause()
    if not keep_requests:
        summary.pop("requests", None)
    return summary


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median output throughput (latencies stay those of one real run)."""
    ordered = sorted(runs, key=lambda r: float(r["output_throughput"]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats_output_throughput"] = [r["output_throughput"] for r in runs]
    if all("paired_ceiling" in r for r in runs):
        chosen["repeats_paired_fraction"] = [r["paired_ceiling"]["fraction"] for r in runs]
        chosen["repeats_paired_ceiling_tok_s"] = [r["paired_ceiling"]["ceiling_tok_s"] for r in runs]
    return chosen


def run_servers(
    args: argparse.Namespace,
    profile: ModelProfile,
    model_dir: Path,
    work: Path,
    results: dict[str, Any],
    before_repeat: Callable[[int], None] | None = None,
    paired: PairedCeiling | None = None,
) -> None:
    """All servers up at once, paused; each level runs against one resumed server at a time, systems in
    rotating order, so a shared machine's background load falls on every system alike.
    `before_repeat(r)` runs before repeat `r`, every server paused (the in-process ceilings);
    `paired` times the level's static batch before its first server and after each one."""
    servers: dict[str, Server] = {}
    try:
        for system in [s for s in args.systems if s in SERVER_SYSTEMS]:
            log.info("Starting %s", system)
            server, result = start_system(server_spec(system, model_dir, args.max_num_seqs, args.device, args.dtype), args, profile, work)
            results["systems"][system] = result
            if server is not None:
                servers[system] = server
        # A workload per level and repeat: repeats have the same lengths and other words, so a prefix
        # cache never finds a whole prompt it read in an earlier repeat (only what prompts share).
        plan: list[tuple[str, str, int | None, float, Callable[[int], list[RequestSpec]]]] = []
        for c in args.concurrency:
            plan.append(("levels", str(c), c, math.inf, functools.partial(level_workload, profile, c, args.seed, args.num_prompts)))
        for rate in args.request_rate:
            n = args.num_prompts or max(profile.min_prompts, 32)
            rated = functools.partial(make_workload, n, args.seed * 1000 + 7, profile.prompt_words, profile.output_tokens)
            plan.append(("rates", f"{rate:g}", None, rate, rated))
        names = list(servers)
        for repeat in range(args.repeat):
            if before_repeat is not None:
                before_repeat(repeat)
            for step, (kind, key, concurrency, rate, workload_of) in enumerate(plan):
                workload = workload_of(repeat)
                shift = (repeat + step) % max(1, len(names))
                probe = None
                if paired is not None and concurrency is not None:  # fixed concurrency: a static batch of that size
                    items = _items(workload if concurrency == 1 else workload[: concurrency * STATIC_BATCHES])
                    probe = functools.partial(paired.measure, concurrency, items)
                before = probe() if probe is not None else {}
                for system in names[shift:] + names[:shift]:
                    server = servers[system]
                    if server.proc is None or server.proc.poll() is not None:
                        if "error" not in results["systems"][system]:
                            code = server.proc.returncode if server.proc else None
                            log.warning("%s is gone (exit code %s): skipped from here on", system, code)
                            results["systems"][system]["error"] = f"server process exited with code {code} before {kind} {key}"
                            results["systems"][system]["log_tail"] = server.log_tail()
                        continue
                    config = level_config(server, args, profile, concurrency=concurrency, rate=rate)
                    summary = run_level(server, config, workload, args.per_request)
                    summary["repeat"] = repeat
                    if probe is not None:
                        after = probe()
                        summary["paired_ceiling"] = paired_fraction(float(summary["output_throughput"]), before, after)
                        before = after
                    results["systems"][system]["runs"].append({"kind": kind, "key": key, "summary": summary})
                    log.info(
                        "%s %s=%s #%d: %.1f tok/s, TTFT p50 %.0f ms, %d/%d ok, other load %.2f cores",
                        system,
                        "c" if kind == "levels" else "rate",
                        key,
                        repeat,
                        summary["output_throughput"],
                        summary["ttft_ms"]["p50"] or 0.0,
                        summary["completed"],
                        len(workload),
                        summary["cpu"]["other_cores"],
                    )
    finally:
        for server in servers.values():
            server.stop()
    for result in results["systems"].values():
        grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for run in result.get("runs", []):
            grouped.setdefault((run["kind"], run["key"]), []).append(run["summary"])
        for (kind, key), runs in grouped.items():
            result[kind][key] = median_run(runs)
        result.pop("runs", None)


# --- in-process baselines (run in a subprocess, so this process never imports torch) ---------------


def _items(specs: Sequence[RequestSpec]) -> list[dict[str, Any]]:
    return [{"prompt": r.prompt, "max_tokens": r.max_tokens} for r in specs]


STATIC_BATCHES = 4  # static batches timed per level and round: a burst of one batch is mostly noise here


def inprocess_round(model_dir: Path, args: argparse.Namespace, profile: ModelProfile, work: Path, repeat: int) -> dict[str, Any]:
    """One round of the in-process ceilings on repeat `repeat`'s workloads, both thread settings, each
    in a fresh process. Run between the servers' repeats (`run_servers(before_repeat=...)`): measured
    all before the servers, the ceilings and the servers met different machines (this one drifts by
    a quarter within minutes, docs/benchmarks.md)."""

    def workload(c: int) -> list[dict[str, Any]]:
        return _items(level_workload(profile, c, args.seed, args.num_prompts, repeat=repeat))

    spec = {
        "model_dir": str(model_dir),
        "device": args.device,
        "dtype": args.dtype,
        # The very requests the servers get at one stream: their prompt / output mix sets tok/s.
        "bare": workload(1),
        # The level's first requests, `STATIC_BATCHES` batches of `c`: what one batch of them costs, sustained.
        "static": {str(c): workload(c)[: c * STATIC_BATCHES] for c in args.concurrency if c > 1},
        "engine": {str(c): workload(c) for c in args.concurrency} if args.engine else {},
        "max_num_seqs": args.max_num_seqs,
        "static_batch": {str(c): c for c in args.concurrency if c > 1},
    }
    runs: dict[str, Any] = {}
    for label, env in (("default", {}), ("omp1", {"OMP_NUM_THREADS": "1"})):
        spec_path, out_path = work / f"inprocess-{label}-{repeat}.spec.json", work / f"inprocess-{label}-{repeat}.out.json"
        spec_path.write_text(json.dumps(spec | {"roofline": label == "default" and repeat == 0}))
        argv = [sys.executable, str(Path(__file__).resolve()), "--inprocess-worker", str(spec_path), str(out_path)]
        with CpuMeter(None) as meter:
            done = subprocess.run(argv, env=os.environ | env, capture_output=True, text=True, timeout=args.inprocess_timeout, check=False)
            cpu = meter.read()
        if done.returncode != 0:
            log.warning("in-process (%s) failed: %s", label, done.stderr[-500:])
            continue
        run = json.loads(out_path.read_text()) | {"env": env, "cpu": cpu}
        log.info(
            "in-process (%s) #%d: bare %.1f tok/s; static %s; engine %s",
            *(label, repeat, run["bare"]["tok_s"], run["static_tok_s"], run.get("engine_tok_s")),
        )
        runs[label] = run
    return runs


def merge_inprocess(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per thread setting, the median round of each number (bare, each static batch, each engine level)."""
    results: dict[str, Any] = {}
    for label in ("default", "omp1"):
        runs = [r[label] for r in rounds if label in r]
        if not runs:
            results[label] = {"error": "every run failed"}
            continue
        merged = dict(runs[0])
        merged["bare"] = _median_by([r["bare"] for r in runs])
        merged["static"] = {key: _median_by([r["static"][key] for r in runs]) for key in runs[0]["static"]}
        merged["static_tok_s"] = {k: round(v["tok_s"], 1) for k, v in merged["static"].items()}
        if "engine" in runs[0]:
            merged["engine"] = {key: _median_by([r["engine"][key] for r in runs]) for key in runs[0]["engine"]}
            merged["engine_tok_s"] = {k: round(v["tok_s"], 1) for k, v in merged["engine"].items()}
        merged["repeats"] = [
            {"bare_tok_s": r["bare"]["tok_s"], "static_tok_s": r["static_tok_s"], "engine_tok_s": r.get("engine_tok_s"), "cpu": r["cpu"]}
            for r in runs
        ]
        results[label] = merged
    return results


def _median_by(measurements: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(measurements, key=lambda m: float(m["tok_s"]))
    return dict(ordered[(len(ordered) - 1) // 2])


def inprocess_worker(spec_path: Path, out_path: Path) -> None:
    """Runs in a fresh process: roofline, bare generate at batch 1, static batches. Writes JSON."""
    import torch

    from bench.padded import PaddedModel

    spec = json.loads(spec_path.read_text())
    padded = PaddedModel(spec["model_dir"], spec["device"], spec["dtype"])
    model, device, encode, synchronize = padded.model, padded.device, padded.encode, padded.synchronize
    generate, in_thread = padded.generate, padded.generate_in_thread

    result: dict[str, Any] = {
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "parallel_info": torch.__config__.parallel_info().splitlines()[:4],
    }

    def best(prompts: list[list[int]], new_tokens: int, where: dict[str, float]) -> float:
        # The thread that runs torch matters here (see docs/benchmarks.md): time the call on the main
        # thread and on a fresh worker thread (the seed server's situation) and keep the faster.
        where["main_s"] = where.get("main_s", 0.0) + generate(prompts, new_tokens)
        where["thread_s"] = where.get("thread_s", 0.0) + in_thread(prompts, new_tokens)
        return min(where["main_s"], where["thread_s"])

    generate([encode("warm up")], 4)
    in_thread([encode("warm up")], 4)
    bare_tokens, bare_seconds, bare_where = 0, 0.0, dict[str, float]()
    for item in spec["bare"]:
        bare_seconds = best([encode(item["prompt"])], item["max_tokens"], bare_where)
        bare_tokens += item["max_tokens"]
    result["bare"] = {"requests": len(spec["bare"]), "tokens": bare_tokens, "seconds": bare_seconds, "tok_s": bare_tokens / bare_seconds}
    result["bare"] |= {f"tok_s_{k[:-2]}": bare_tokens / v for k, v in bare_where.items()}
    static: dict[str, Any] = {}
    for key, items in spec["static"].items():
        size = spec["static_batch"][key]
        where: dict[str, float] = {}
        tokens = 0
        for first in range(0, len(items), size):  # each batch generates its requests' mean output length
            batch = items[first : first + size]
            new_tokens = round(sum(item["max_tokens"] for item in batch) / len(batch))
            seconds = best([encode(item["prompt"]) for item in batch], new_tokens, where)
            tokens += len(batch) * new_tokens
        static[key] = {"batch": size, "batches": -(-len(items) // size), "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}
        static[key] |= {f"tok_s_{k[:-2]}": tokens / v for k, v in where.items()}
    result["static"] = static
    result["static_tok_s"] = {k: round(v["tok_s"], 1) for k, v in static.items()}
    if spec["engine"]:
        result["engine"] = engine_alone(spec, encode)
        result["engine_tok_s"] = {k: round(v["tok_s"], 1) for k, v in result["engine"].items()}
    if spec.get("roofline"):
        result["roofline"] = roofline(model, torch, device, synchronize)
    out_path.write_text(json.dumps(result, indent=2))


class _Tally:
    """Counts finished engine requests from the engine thread; frees a concurrency slot per request."""

    def __init__(self, requests: int, concurrency: int) -> None:
        self.left = requests
        self.tokens = 0
        self.failed = 0
        self.slots = threading.Semaphore(concurrency)
        self.done = threading.Event()
        self._lock = threading.Lock()

    def sink(self, events: list[Any]) -> None:
        from llmservice_server.events import Done, Failed

        for event in events:
            if isinstance(event, Done | Failed):
                with self._lock:
                    self.tokens += event.completion_tokens if isinstance(event, Done) else 0
                    self.failed += isinstance(event, Failed)
                    self.left -= 1
                    if self.left == 0:
                        self.done.set()
                self.slots.release()


def engine_alone(spec: dict[str, Any], encode: Callable[[str], list[int]]) -> dict[str, Any]:
    """The server's own engine (llmservice_server.engine.Engine), driven in-process without HTTP:
    each level's whole workload at that many concurrent requests. Separates the engine from the
    HTTP/SSE path: server throughput / this = what the web layer costs."""
    from llmservice_server.engine import Engine
    from llmservice_server.events import GenerationRequest, SamplingParams
    from llmservice_server.settings import Settings

    engine = Engine(Settings(model=spec["model_dir"], max_num_seqs=spec["max_num_seqs"], device=spec["device"], dtype=spec["dtype"]))
    engine.start()
    deadline = time.monotonic() + 600
    while not engine.ready and engine.stage != "failed" and time.monotonic() < deadline:
        time.sleep(0.1)
    if not engine.ready:
        raise RuntimeError(f"engine did not become ready: {engine.stage} {engine.error}")
    out: dict[str, Any] = {}
    try:
        for key, items in spec["engine"].items():
            prompts = [encode(item["prompt"]) for item in items]
            tally = _Tally(len(items), int(key))
            started = time.perf_counter()
            for prompt, item in zip(prompts, items, strict=True):
                tally.slots.acquire()
                request = GenerationRequest(prompts=[prompt], max_tokens=[item["max_tokens"]], params=SamplingParams(temperature=0.0))
                engine.submit(request, tally.sink)
            tally.done.wait(timeout=900)
            seconds = time.perf_counter() - started
            out[key] = {"requests": len(items), "tokens": tally.tokens, "failed": tally.failed, "seconds": seconds}
            out[key]["tok_s"] = tally.tokens / seconds
    finally:
        engine.stop()
    return out


def roofline(model: Any, torch: Any, device: Any, synchronize: Callable[[], None]) -> dict[str, Any]:
    """Memory bandwidth and GEMM throughput of the model's device and dtype, measured now, and what they allow per token."""
    dtype = next(model.parameters()).dtype
    x = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.float32, device=device)  # 256 MiB: far larger than any cache
    y = torch.empty_like(x)
    x.sum()
    read_times, copy_times = [], []
    for _ in range(5):
        synchronize()
        t = time.perf_counter()
        x.sum()
        synchronize()
        read_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        y.copy_(x)
        synchronize()
        copy_times.append(time.perf_counter() - t)
    read_gbs = x.numel() * 4 / min(read_times) / 1e9
    copy_gbs = 2 * x.numel() * 4 / min(copy_times) / 1e9  # read + write
    del x, y
    side = 1024 if device.type == "cpu" else 8192  # big enough to keep a GPU busy
    a = torch.randn(side, side, dtype=dtype, device=device)
    a @ a
    gemm_times = []
    for _ in range(5):
        synchronize()
        t = time.perf_counter()
        a @ a
        synchronize()
        gemm_times.append(time.perf_counter() - t)
    gflops = 2 * side**3 / min(gemm_times) / 1e9
    params = {id(p): p for p in model.parameters()}
    total_bytes = sum(p.numel() * p.element_size() for p in params.values())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embed.data_ptr() == head.data_ptr()
    # Per token every weight is read once, except the input embedding: one row (unless it is the tied lm_head).
    bytes_per_token = total_bytes if tied else total_bytes - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()
    flops_per_token = 2 * bytes_per_token / embed.element_size()  # one multiply-add per weight read
    return {
        "read_bandwidth_gbs": read_gbs,
        "copy_bandwidth_gbs": copy_gbs,
        "gemm_gflops": gflops,
        "parameters": sum(p.numel() for p in params.values()),
        "weight_bytes": total_bytes,
        "tied_embeddings": tied,
        "bytes_per_token": bytes_per_token,
        "flops_per_token": flops_per_token,
        "batch1_tok_s": read_gbs * 1e9 / bytes_per_token,
        "compute_bound_tok_s": gflops * 1e9 / flops_per_token,
        "note": "KV-cache reads are left out (under 1 % of the weight bytes at these context lengths)",
    }


def roofline_at(roof: dict[str, Any] | None, batch: int) -> float | None:
    """min(batch x bandwidth / bytes per token, compute bound): weights are read once per step for the whole batch."""
    if not roof:
        return None
    return float(min(batch * roof["batch1_tok_s"], roof["compute_bound_tok_s"]))


# --- models ----------------------------------------------------------------------------------------


def prepare_model(name: str, work: Path) -> tuple[Path, str]:
    """A local model directory every system can load, and the profile name."""
    if name == "tiny":
        from tests.tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny"), "tiny"
    if name == "tiny-3m":  # the size of the first measurement: hidden 256, 4 layers, 3.4 M parameters
        from tests.tiny_model import build_tiny_model

        return build_tiny_model(work / "tiny-3m", hidden_size=256, intermediate_size=768, layers=4), "tiny-3m"
    if name == "smollm2":
        return smollm2_dir(), "smollm2"
    path = Path(name).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not 'tiny', 'tiny-3m', 'smollm2' or a model directory")
    return path, "smollm2"


def smollm2_dir() -> Path:
    """The server's own dequantized copy of the bundled GGUF (created on first use, ~30 s)."""
    from llmservice_server.loader import converted_dir, load
    from llmservice_server.settings import Settings
    from llmservice_server.source import resolve_source

    settings = Settings(model="bundled")
    target = converted_dir(settings, resolve_source(settings))
    if not (target / "config.json").is_file():
        log.info("Converting the bundled GGUF once (about 30 s): %s", target)
        load(settings, lambda stage: None)
    return target


# --- report ----------------------------------------------------------------------------------------


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: the ratios and fractions the issue asks for.

    Two readings: each system as shipped (default threads), and each system at its best thread
    setting ("best": the fastest of X, X-omp1 and X-allcores at that level, of those that were run).
    """
    systems = results["systems"]
    inproc = systems.get("inprocess") or {}
    roof = _get(inproc, "default", "roofline")
    rows = []
    for c in results["config"]["concurrency"]:
        key = str(c)

        def tput(system: str, key: str = key) -> float | None:
            level = _get(systems.get(system), "levels", key)
            return float(level["output_throughput"]) if level and level.get("completed") else None

        def best(base: str) -> float | None:
            values = [v for v in (tput(base), tput(base + "-omp1"), tput(base + "-allcores")) if v is not None]
            return max(values) if values else None

        ceilings = []
        for label in ("default", "omp1"):
            value = _get(inproc, label, "bare", "tok_s") if c == 1 else _get(inproc, label, "static", key, "tok_s")
            if value is not None:
                ceilings.append(float(value))
        ceiling = max(ceilings) if ceilings else None
        engines = [float(v) for label in ("default", "omp1") if (v := _get(inproc, label, "engine", key, "tok_s")) is not None]
        engine = max(engines) if engines else None
        ours = tput("ours")
        roof_c = roofline_at(roof, c)
        paired = {s: _paired(systems.get(s), key, "repeats_paired_fraction") for s in SERVER_SYSTEMS}
        row: dict[str, Any] = {
            "concurrency": c,
            "tok_s": {s: tput(s) for s in SERVER_SYSTEMS},
            "best_tok_s": {base: best(base) for base in ("ours", "seed", "tserve")},
            "inprocess_ceiling_tok_s": ceiling,
            "engine_tok_s": engine,
            "engine_fraction_of_inprocess": _ratio(engine, ceiling),
            "best_ours_fraction_of_engine": _ratio(best("ours"), engine),
            "ours_over_seed": _ratio(ours, tput("seed")),
            "ours_over_seed_locked": _ratio(ours, tput("seed-locked")),
            "ours_over_tserve": _ratio(ours, tput("tserve")),
            "best_ours_over_best_seed": _ratio(best("ours"), best("seed")),
            "best_ours_over_best_tserve": _ratio(best("ours"), best("tserve")),
            "ours_fraction_of_inprocess": _ratio(ours, ceiling),
            "best_ours_fraction_of_inprocess": _ratio(best("ours"), ceiling),
            "roofline_tok_s": roof_c,
            # Each run against the static batch timed right before and after it (bench/paired_ceiling.py), median over repeats.
            "paired_fraction": paired,
            "paired_ceiling_tok_s": {s: _paired(systems.get(s), key, "repeats_paired_ceiling_tok_s") for s in SERVER_SYSTEMS},
            "best_ours_paired_fraction": max((v for s in ("ours", "ours-omp1", "ours-allcores") if (v := paired[s])), default=None),
            "ours_fraction_of_roofline": _ratio(ours, roof_c),
            "best_ours_fraction_of_roofline": _ratio(best("ours"), roof_c),
            "ttft_ms": {s: _get(systems.get(s), "levels", key, "ttft_ms") for s in SERVER_SYSTEMS},
            "tpot_p50_ms": {s: _get(systems.get(s), "levels", key, "tpot_ms", "p50") for s in SERVER_SYSTEMS},
            "livez_p99_ms": {s: _get(systems.get(s), "levels", key, "livez_ms", "p99") for s in SERVER_SYSTEMS},
            "goodput": {s: _get(systems.get(s), "levels", key, "goodput") for s in SERVER_SYSTEMS},
            "completed": {s: _get(systems.get(s), "levels", key, "completed") for s in SERVER_SYSTEMS},
            "other_cores": {s: _get(systems.get(s), "levels", key, "cpu", "other_cores") for s in SERVER_SYSTEMS},
            "server_us_per_token": {s: _server_cpu_per_token(systems.get(s), key) for s in SERVER_SYSTEMS},
            "client_us_per_token": {s: _client_cpu_per_token(systems.get(s), key) for s in SERVER_SYSTEMS},
        }
        rows.append(row)
    return {"rows": rows, "targets": TARGETS}


def _paired(system: dict[str, Any] | None, key: str, field: str) -> float | None:
    """The median over repeats of a level's paired-ceiling numbers (None without them)."""
    values = _get(system, "levels", key, field)
    return float(statistics.median(values)) if values else None


def _server_cpu_per_token(system: dict[str, Any] | None, key: str) -> float | None:
    """CPU microseconds per output token of a level used by the server (its whole session)."""
    level = _get(system, "levels", key)
    cores, wall = _get(level, "cpu", "server_cores"), _get(level, "cpu", "wall_s")
    if not level or cores is None or wall is None or not level.get("total_output_tokens"):
        return None
    return float(cores) * float(wall) / float(level["total_output_tokens"]) * 1e6


def _client_cpu_per_token(system: dict[str, Any] | None, key: str) -> float | None:
    """... and by the load generator's own process (its /livez poller, a process of its own, left out)."""
    level = _get(system, "levels", key)
    if not level or level.get("client_cpu_s") is None or not level.get("total_output_tokens"):
        return None
    return float(level["client_cpu_s"]) / float(level["total_output_tokens"]) * 1e6


def markdown(results: dict[str, Any]) -> str:
    rows = results["analysis"]["rows"]
    present = [s for s in SERVER_SYSTEMS if s in results["systems"]]
    lines = ["Output-token throughput (tok/s):", ""]
    head = ["streams", *present, "in-process ceiling", "engine (no HTTP)", "roofline"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["concurrency"]), *[_fmt(r["tok_s"][s], ".1f") for s in present]]
        cells += [_fmt(r["inprocess_ceiling_tok_s"], ".1f"), _fmt(r.get("engine_tok_s"), ".1f"), _fmt(r["roofline_tok_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios - as shipped (default threads) | each at its best thread setting (best of X, X-omp1, X-allcores):", ""]
    head = ["streams", "ours/seed", "ours/seed-locked", "ours/tserve", "ours / ceiling", "ours / ceiling beside it", "ours % roofline"]
    head += ["best ours / best seed", "best ours / best tserve", "best ours / ceiling", "best ours / ceiling beside it"]
    head += ["best ours % roofline", "best ours / engine"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["concurrency"]), _fmt(r["ours_over_seed"], ".2f", "x"), _fmt(r.get("ours_over_seed_locked"), ".2f", "x")]
        cells += [_fmt(r["ours_over_tserve"], ".2f", "x")]
        cells += [_fmt(_pct(r["ours_fraction_of_inprocess"]), ".0f", " %")]
        cells += [_fmt(_pct(r.get("paired_fraction", {}).get("ours")), ".0f", " %")]
        cells += [_fmt(_pct(r["ours_fraction_of_roofline"]), ".1f", " %")]
        cells += [_fmt(r["best_ours_over_best_seed"], ".2f", "x"), _fmt(r["best_ours_over_best_tserve"], ".2f", "x")]
        cells += [
            _fmt(_pct(r["best_ours_fraction_of_inprocess"]), ".0f", " %"),
            _fmt(_pct(r.get("best_ours_paired_fraction")), ".0f", " %"),
            _fmt(_pct(r["best_ours_fraction_of_roofline"]), ".1f", " %"),
            _fmt(_pct(r.get("best_ours_fraction_of_engine")), ".0f", " %"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    title = (
        "Latency (TTFT p50 / p99, TPOT p50: ms), goodput, /livez p99 (ms), CPU per output token (us; the server"
        " is all its processes, the client the load generator's own process), CPU used by other processes (cores),"
        " and the run against the static batch timed right before and after it (its tok/s; median over repeats):"
    )
    lines += ["", title, ""]
    head = ["streams", "system", "done", "TTFT p50", "TTFT p99", "TPOT p50", "goodput req/s", "/livez p99", "server CPU/token"]
    head += ["client CPU/token", "other load", "of the ceiling beside it", "ceiling beside it"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for s in present:
            ttft = r["ttft_ms"][s] or {}
            cells = [str(r["concurrency"]), s, _fmt(r["completed"][s], "d"), _fmt(ttft.get("p50")), _fmt(ttft.get("p99"))]
            cells += [_fmt(r["tpot_p50_ms"][s], ".1f"), _fmt(r["goodput"][s], ".2f"), _fmt(r["livez_p99_ms"][s], ".1f")]
            cells += [_fmt(r.get("server_us_per_token", {}).get(s), ".0f"), _fmt(r.get("client_us_per_token", {}).get(s), ".0f")]
            cells += [_fmt(r["other_cores"][s], ".2f")]
            cells += [_fmt(_pct(r.get("paired_fraction", {}).get(s)), ".0f", " %"), _fmt(r.get("paired_ceiling_tok_s", {}).get(s), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _x_axis(ax: Any, xs: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot(results: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = results["analysis"]["rows"]
    xs = [r["concurrency"] for r in rows]
    present = [s for s in SERVER_SYSTEMS if any(r["tok_s"][s] is not None for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for s in present:
        ax.plot(xs, [r["tok_s"][s] for r in rows], marker="o", label=s)
    ax.plot(xs, [r["inprocess_ceiling_tok_s"] for r in rows], "k--", marker="x", label="in-process (bare / static batch)")
    if any(r.get("engine_tok_s") for r in rows):
        ax.plot(xs, [r.get("engine_tok_s") for r in rows], "k:", marker="+", label="our engine, no HTTP")
    ax.set(yscale="log", xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput")
    _x_axis(ax, xs)
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, s in enumerate(present):
        color = f"C{i}"
        ax.plot(xs, [_get(r["ttft_ms"][s], "p50") for r in rows], marker="o", color=color, label=f"{s} p50")
        ax.plot(xs, [_get(r["ttft_ms"][s], "p99") for r in rows], marker="^", linestyle=":", color=color, label=f"{s} p99")
    ax.set(yscale="log", xlabel="concurrent streams", ylabel="ms", title="Time to first token")
    _x_axis(ax, xs)
    ax.legend(fontsize=7)
    ax = axes[2]
    for s in present:
        ax.plot(xs, [r["livez_p99_ms"][s] for r in rows], marker="o", label=s)
    ax.axhline(TARGETS["livez_p99_ms_saturated"], color="red", linestyle="--", linewidth=1, label="target 20 ms")
    ax.set(xlabel="concurrent streams", ylabel="ms", title="/livez (tserve: /health) p99 during the run")
    _x_axis(ax, xs)
    ax.legend(fontsize=8)
    fig.suptitle(f"server benchmark - model {results['config']['model']} - {results['machine']['nproc']} CPUs, shared machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replot(saved: Path) -> None:
    results = json.loads(saved.read_text())
    results["analysis"] = analyse(results)
    results["markdown"] = markdown(results)
    saved.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, saved.with_suffix(".png"))
    print(results["markdown"])


# --- main ------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--inprocess-worker"]:
        inprocess_worker(Path(argv[1]), Path(argv[2]))
        return 0
    if argv[:1] == ["--replot"]:  # re-derive tables and plot from a results JSON: --replot bench/results/server-tiny.json
        replot(Path(argv[1]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (random test model), 'tiny-3m' (wider and deeper), 'smollm2' (bundled GGUF) or a model dir"
    )
    parser.add_argument("--systems", nargs="+", choices=ALL_SYSTEMS, default=list(DEFAULT_SYSTEMS), help="see the module doc")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--request-rate", type=float, nargs="*", default=[], help="extra Poisson runs at these requests/s (no cap)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where every system runs the model")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="every system's weights")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per level (default: per model, >= 2 per stream)")
    parser.add_argument("--max-duration", type=float, default=None, help="seconds per level after which no request starts")
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="in-flight requests get this long after --max-duration")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-engine", dest="engine", action="store_false", help="skip the engine-without-HTTP measurement")
    parser.add_argument(
        "--no-paired-ceiling",
        dest="paired_ceiling",
        action="store_false",
        help="skip the static batch timed beside every server run (bench/paired_ceiling.py; on with inprocess)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="run every level this many times per system (median reported)")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--inprocess-timeout", type=float, default=900.0)
    parser.add_argument("--per-request", action="store_true", help="keep per-request rows in the JSON")
    parser.add_argument("--output", type=Path, default=None, help="JSON path (default bench/results/server-<model>.json)")
    parser.add_argument("--work-dir", type=Path, default=None, help="server logs and model copies (default: a temp dir, kept)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llmservice-server-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir, profile_name = prepare_model(args.model, work)
    profile = PROFILES[profile_name]
    label = args.model if args.model in PROFILES else Path(args.model).name
    output = args.output or RESULTS_DIR / f"server-{label}.json"
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "server",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/server_bench.py", *argv]),
        "machine": machine(),
        "source": source_state(),
        "config": {
            "model": label,
            "model_dir": str(model_dir),
            "systems": args.systems,
            "concurrency": args.concurrency,
            "request_rate": args.request_rate,
            "max_num_seqs": args.max_num_seqs,
            "device": args.device,
            "dtype": args.dtype,
            "prompt_words": profile.prompt_words,
            "output_tokens": profile.output_tokens,
            "requests_per_level": {str(c): len(level_workload(profile, c, args.seed, args.num_prompts)) for c in args.concurrency},
            "slo": {"ttft_ms": args.slo_ttft_ms or profile.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms or profile.slo_tpot_ms},
            "seed": args.seed,
        },
        "systems": {},
    }
    log.info("Model %s at %s; work dir %s", label, model_dir, work)
    rounds: list[dict[str, Any]] = []

    def ceilings(repeat: int) -> None:
        rounds.append(inprocess_round(model_dir, args, profile, work, repeat))

    measure = ceilings if "inprocess" in args.systems else None
    paired = PairedCeiling(model_dir, args.device, args.dtype, work) if measure is not None and args.paired_ceiling else None
    try:
        run_servers(args, profile, model_dir, work, results, before_repeat=measure, paired=paired)
    finally:
        if paired is not None:
            paired.close()
    if measure is not None:  # with no server system the repeats run the ceilings alone
        results["systems"]["inprocess"] = merge_inprocess(rounds)
    results["duration_s"] = time.monotonic() - started
    results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["analysis"] = analyse(results)
    results["markdown"] = markdown(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    png = output.with_suffix(".png")
    plotted = plot(results, png)
    print(results["markdown"])
    print(f"\nwrote {output}" + (f" and {png}" if plotted else "") + f" in {results['duration_s']:.0f} s; logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
