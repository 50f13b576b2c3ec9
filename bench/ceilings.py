"""The ceilings a server is held against, measured in fresh processes so the caller never imports torch.

Bare ``model.generate`` at batch 1, static left-padded batches (``bench/padded.py``), our engine
driven without HTTP, and the memory-bandwidth / GEMM roofline of the device measured now.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen import RequestSpec
from bench.processes import REPO, CpuMeter

log = logging.getLogger("bench.ceilings")
WORKER = REPO / "bench" / "server_bench.py"  # runs `inprocess_worker` as `--inprocess-worker SPEC OUT`


def items_of(specs: Sequence[RequestSpec]) -> list[dict[str, Any]]:
    return [{"prompt": r.prompt, "max_tokens": r.max_tokens} for r in specs]


STATIC_BATCHES = 4  # static batches timed per level and round: a burst of one batch is mostly noise here


def inprocess_round(
    model_dir: Path, args: argparse.Namespace, workload_of: Callable[[int], Sequence[RequestSpec]], work: Path, repeat: int
) -> dict[str, Any]:
    """One round of the in-process ceilings on repeat `repeat`'s workloads (`workload_of(streams)`),
    both thread settings, each in a fresh process. Run between the servers' repeats (`run_servers(before_repeat=...)`): measured
    all before the servers, the ceilings and the servers met different machines (this one drifts by
    a quarter within minutes, docs/benchmarks.md)."""

    def workload(c: int) -> list[dict[str, Any]]:
        return items_of(workload_of(c))

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
        argv = [sys.executable, str(WORKER), "--inprocess-worker", str(spec_path), str(out_path)]
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
        # On a GPU the host thread matters little and a call costs seconds: `"threads": false` times one.
        where["main_s"] = where.get("main_s", 0.0) + generate(prompts, new_tokens)
        if spec.get("threads", True):
            where["thread_s"] = where.get("thread_s", 0.0) + in_thread(prompts, new_tokens)
        return min(where.values())

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
    if device.type == "cuda":  # what the weights, the batches' K/V and the activations took at the most
        result["device_memory_peak_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
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
