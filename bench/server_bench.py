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
  instead of the engine's own (``LLMSERVICE_FUSED_FORWARD=false``, ``decoder.py``); ``ours-kvtight``: ours
  with a 1 MiB K/V cache (``LLMSERVICE_KV_CACHE_MIB=1``: 2048 tokens of the tiny model, so 16 streams
  preempt one another; too small for a real model's context, which the server refuses at start-up);
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
Nothing here fails on a missed target. This module is the command and the run order; the parts
are bench/systems.py (the servers), bench/processes.py (machine and CPU accounting),
bench/ceilings.py (in-process ceilings and roofline) and bench/report.py (ratios, tables, plot).

    .venv/bin/python bench/server_bench.py                      # tiny random model, all systems
    .venv/bin/python bench/server_bench.py --model smollm2      # SmolLM2-135M (fewer requests)
    .venv/bin/python bench/server_bench.py --systems ours seed --concurrency 1 16
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(REPO))

from bench.ceilings import STATIC_BATCHES, inprocess_round, inprocess_worker, items_of, merge_inprocess  # noqa: E402
from bench.loadgen import SLO, LoadConfig, RequestSpec, make_workload, run_benchmark  # noqa: E402
from bench.loadgen import run as run_loadgen  # noqa: E402
from bench.paired_ceiling import PairedCeiling  # noqa: E402
from bench.paired_ceiling import fraction as paired_fraction  # noqa: E402
from bench.processes import CpuMeter, machine, source_state  # noqa: E402
from bench.report import analyse, markdown, plot, replot  # noqa: E402
from bench.systems import SERVER_SYSTEMS, Server, ServerSpec, server_spec  # noqa: E402

log = logging.getLogger("bench.server")

RESULTS_DIR = REPO / "bench" / "results"
ALL_SYSTEMS = (*SERVER_SYSTEMS, "inprocess")
DEFAULT_SYSTEMS = ("ours", "ours-omp1", "seed", "seed-locked", "tserve", "inprocess")


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


# --- one system through all levels -----------------------------------------------------------------


def level_workload(profile: ModelProfile, concurrency: int, seed: int, num_prompts: int | None, repeat: int = 0) -> list[RequestSpec]:
    n = num_prompts or max(profile.min_prompts, profile.prompts_per_stream * concurrency)
    return make_workload(n, seed * 1000 + concurrency, profile.prompt_words, profile.output_tokens, variant=repeat)


def _repeat_workload(profile: ModelProfile, args: argparse.Namespace, repeat: int, concurrency: int) -> list[RequestSpec]:
    return level_workload(profile, concurrency, args.seed, args.num_prompts, repeat=repeat)


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
                    items = items_of(workload if concurrency == 1 else workload[: concurrency * STATIC_BATCHES])
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
        workload_of = functools.partial(_repeat_workload, profile, args, repeat)
        rounds.append(inprocess_round(model_dir, args, workload_of, work, repeat))

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
