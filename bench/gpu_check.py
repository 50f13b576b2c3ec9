"""The server on one GPU against its baselines, with random weights in real model shapes: `bench/gpu_check.sh`.

For each model (Llama-3.2-1B and Llama-3.1-8B shapes, bf16; `--smoke`: the tiny test model's shapes,
float32 on the CPU) it builds a random-weight model from its config on the device and saves it with
a word-level tokenizer built here (one word per token id, so a prompt is exactly as long as asked and
every generated id decodes to text), then runs three systems at 1, 16 and 64 streams, each stream
one request of a 512-token prompt and 256 output tokens:

- ``ours``: the real server (``python -m llmservice_server.main``, what ``llmservice-server`` runs);
- ``tserve``: ``transformers serve --continuous-batching`` (skipped with the reason when it cannot start);
- ``static``: no HTTP, bare ``model.generate`` on one left-padded batch of the level's prompts
  (``bench/ceilings.py``'s worker, which also measures the device's copy bandwidth).

Printed as a table and written as JSON: output tok/s, TTFT p50/p99, ITL p50, device memory in use
while the system is up, and decode throughput as a fraction of the bandwidth roofline: per step
every weight byte and the K/V of every row's context is read once, at the measured copy bandwidth.
Nothing fails on a missed target; the exit code is non-zero only when a system of ours fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `bench` and `tests` importable
    sys.path.insert(0, str(REPO))

from bench.ceilings import WORKER  # noqa: E402
from bench.loadgen import LoadConfig, RequestSpec, run_benchmark  # noqa: E402
from bench.loadgen import run as run_loadgen  # noqa: E402
from bench.processes import machine, source_state  # noqa: E402
from bench.systems import Server, server_spec  # noqa: E402

log = logging.getLogger("bench.gpu_check")

SPECIALS = ("<|endoftext|>", "<|pad|>", "<|unk|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TEMPLATE_TOKENS = 3  # <|user|> ... <|end|><|assistant|>: the tiny test model's chat template around one message


@dataclass(frozen=True)
class Shape:
    """The config fields that set a Llama model's cost per token (rope scaling left out: no cost per step)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 500000.0
    max_position_embeddings: int = 8192


SHAPES = {
    "llama-3.2-1b": Shape(2048, 8192, 16, 32, 8, 128256, tie_word_embeddings=True),
    "llama-3.1-8b": Shape(4096, 14336, 32, 32, 8, 128256, tie_word_embeddings=False),
    "tiny": Shape(64, 128, 2, 4, 2, 512, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=2048),
}


@dataclass(frozen=True)
class Plan:
    models: tuple[str, ...]
    device: str
    dtype: str
    streams: tuple[int, ...]
    prompt_tokens: int
    output_tokens: int
    systems: tuple[str, ...]


GPU_PLAN = Plan(("llama-3.2-1b", "llama-3.1-8b"), "cuda", "bfloat16", (1, 16, 64), 512, 256, ("ours", "tserve", "static"))
SMOKE_PLAN = Plan(("tiny",), "cpu", "float32", (1, 4), 64, 16, ("ours", "tserve", "static"))


# --- the model ---------------------------------------------------------------------------------------


def build_tokenizer(vocab_size: int) -> Any:
    """One word per id ("w7 w8193 ..."), the specials first, and the tiny test model's chat template."""
    from tests.tiny_model import CHAT_TEMPLATE
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)} | {f"w{i}": i for i in range(len(SPECIALS), vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token=SPECIALS[0], pad_token=SPECIALS[1], unk_token=SPECIALS[2])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS[3:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(path: Path, shape: Shape, device: str, dtype: str) -> None:
    """Random weights in `shape`, initialised on `device` and saved with a word-level tokenizer (runs in a child)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(shape.vocab_size)
    fields = asdict(shape)
    head_dim = shape.hidden_size // shape.num_attention_heads
    config = LlamaConfig(**fields, eos_token_id=0, pad_token_id=1, bos_token_id=None, head_dim=head_dim)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        # A zero output row gives a special token logit 0, below the top logit of a random model:
        # greedy decoding never ends early or stops on a role marker, so every row runs its full length.
        model.lm_head.weight[: len(SPECIALS)].zero_()
    model.generation_config.eos_token_id = 0
    model.generation_config.pad_token_id = 1
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def prompts(n: int, tokens: int, vocab_size: int, seed: int) -> list[str]:
    """`n` different prompts of exactly `tokens` tokens after the chat template (no prefix shared between them)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(len(SPECIALS), vocab_size)}" for _ in range(tokens - TEMPLATE_TOKENS)) for _ in range(n)]


def kv_bytes_per_token(shape: Shape, dtype: str) -> int:
    """K and V of one context token over all layers."""
    width = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    return 2 * shape.num_hidden_layers * shape.num_key_value_heads * (shape.hidden_size // shape.num_attention_heads) * width


def roofline_tok_s(roof: dict[str, Any], shape: Shape, dtype: str, streams: int, context: float) -> float:
    """Decode tok/s if each step read the weights once and every row's K/V at the measured copy bandwidth."""
    step_bytes = roof["bytes_per_token"] + streams * context * kv_bytes_per_token(shape, dtype)
    return float(streams * roof["copy_bandwidth_gbs"] * 1e9 / step_bytes)


def device_memory_mib() -> float | None:
    """Device memory in use on GPU 0 (every process), from nvidia-smi; None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return float(done.stdout.split()[0]) if done.returncode == 0 and done.stdout.strip() else None


# --- the systems ---------------------------------------------------------------------------------------


def level_requests(plan: Plan, shape: Shape, streams: int, seed: int) -> list[RequestSpec]:
    texts = prompts(streams, plan.prompt_tokens, shape.vocab_size, seed)
    return [RequestSpec(index=i, prompt=t, prompt_words=plan.prompt_tokens, max_tokens=plan.output_tokens) for i, t in enumerate(texts)]


def run_server(system: str, plan: Plan, shape: Shape, model_dir: Path, work: Path) -> dict[str, Any]:
    """Start one server, warm it, run every level once, note the device memory in use; always stopped."""
    spec = server_spec(system, model_dir, max_num_seqs=max(plan.streams), device=plan.device, dtype=plan.dtype)
    if system == "tserve":  # its paged cache holds every stream's prompt and output
        blocks = -(-max(plan.streams) * (plan.prompt_tokens + plan.output_tokens) // 32) + 64
        spec.argv[spec.argv.index("--cb-num-blocks") + 1] = str(blocks)
    server = Server(spec, work / f"{system}-{model_dir.name}.log")
    result: dict[str, Any] = {"command": spec.argv, "levels": {}}
    try:
        result["startup_s"] = server.start(timeout=600)
        server.model = server.model_name()
        warm = level_requests(plan, shape, 2, seed=99)
        run_loadgen(run_benchmark(LoadConfig(server.base_url, server.model, max_concurrency=2, seed=1), warm))
        for streams in plan.streams:
            config = LoadConfig(server.base_url, server.model, max_concurrency=streams, max_duration=120, drain_timeout=120)
            summary = run_loadgen(run_benchmark(config, level_requests(plan, shape, streams, seed=streams)))
            summary.pop("requests", None)
            summary["device_memory_mib"] = device_memory_mib()
            result["levels"][str(streams)] = summary
            tok_s, done = summary["output_throughput"], summary["completed"]
            log.info("%s %s x%d: %.1f tok/s, %d/%d done", system, model_dir.name, streams, tok_s, done, streams)
    except Exception as exc:  # a system that cannot start or dies is a row with its reason, not the end of the run
        log.warning("%s on %s failed: %s", system, model_dir.name, exc)
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["log_tail"] = server.log_tail()
    finally:
        server.stop()
    return result


def run_static(plan: Plan, shape: Shape, model_dir: Path, work: Path) -> dict[str, Any]:
    """The in-process worker of bench/ceilings.py: bare generate, one static batch per level, the roofline."""

    def items(streams: int) -> list[dict[str, Any]]:
        return [{"prompt": r.prompt, "max_tokens": r.max_tokens} for r in level_requests(plan, shape, streams, seed=streams)]

    spec = {
        "model_dir": str(model_dir),
        "device": plan.device,
        "dtype": plan.dtype,
        "bare": items(1),
        "static": {str(s): items(s) for s in plan.streams if s > 1},
        "static_batch": {str(s): s for s in plan.streams if s > 1},
        "engine": {},
        "max_num_seqs": max(plan.streams),
        "roofline": True,
        "threads": False,
    }
    spec_path, out_path = work / f"static-{model_dir.name}.spec.json", work / f"static-{model_dir.name}.out.json"
    spec_path.write_text(json.dumps(spec))
    argv = [sys.executable, str(WORKER), "--inprocess-worker", str(spec_path), str(out_path)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    result: dict[str, Any] = json.loads(out_path.read_text())
    return result


# --- the report ----------------------------------------------------------------------------------------


def rows(plan: Plan, shape: Shape, systems: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per system and level: the numbers the issue names."""
    static = systems.get("static", {})
    roof = static.get("roofline")
    context = plan.prompt_tokens + plan.output_tokens / 2  # mean context while decoding
    out = []
    for streams in plan.streams:
        roof_tok_s = roofline_tok_s(roof, shape, plan.dtype, streams, context) if roof else None
        for system in plan.systems:
            row: dict[str, Any] = {"streams": streams, "system": system, "roofline_tok_s": roof_tok_s}
            if system == "static":
                level = static.get("bare") if streams == 1 else static.get("static", {}).get(str(streams))
                row["tok_s"] = level["tok_s"] if level else None
                row["device_memory_mib"] = static.get("device_memory_peak_mib")  # torch's peak reservation, not nvidia-smi's
            else:
                level = systems.get(system, {}).get("levels", {}).get(str(streams))
                row["tok_s"] = level["output_throughput"] if level and level["completed"] else None
                row["ttft_p50_ms"] = level["ttft_ms"]["p50"] if level else None
                row["ttft_p99_ms"] = level["ttft_ms"]["p99"] if level else None
                row["itl_p50_ms"] = level["itl_ms"]["p50"] if level else None
                row["device_memory_mib"] = level["device_memory_mib"] if level else None
                # Decode alone: a stream's tokens after its first, at the pace of its median gap.
                itl = row["itl_p50_ms"]
                row["decode_tok_s"] = streams * 1000 / itl if itl else None
            measured = row.get("decode_tok_s") or row["tok_s"]
            row["fraction_of_roofline"] = measured / roof_tok_s if measured and roof_tok_s else None
            out.append(row)
    return out


def table(results: dict[str, Any]) -> str:
    head = ["model", "streams", "system", "tok/s", "TTFT p50", "TTFT p99", "ITL p50", "device MiB", "decode % roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(value: float | None, spec: str = ".0f") -> str:
        return "-" if value is None else f"{value:{spec}}"

    for name, model in results["models"].items():
        for r in model["rows"]:
            frac = r["fraction_of_roofline"]
            cells = [name, str(r["streams"]), r["system"], fmt(r["tok_s"], ".1f"), fmt(r.get("ttft_p50_ms")), fmt(r.get("ttft_p99_ms"))]
            cells += [fmt(r.get("itl_p50_ms"), ".1f"), fmt(r.get("device_memory_mib")), fmt(None if frac is None else 100 * frac, ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(results: dict[str, Any], output: Path, started: float) -> None:
    results["duration_s"] = time.monotonic() - started
    results["table"] = table(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--build-model"]:  # in a child, so this process never holds the device
        build_model(Path(argv[1]), SHAPES[argv[2]], argv[3], argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same path on the CPU with the tiny test model's shapes")
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=None, help="default: both Llama shapes (smoke: tiny)")
    parser.add_argument("--output", type=Path, default=None, help="JSON (default bench/results/gpu-check.json; smoke: work dir)")
    parser.add_argument("--work-dir", type=Path, default=None, help="models and server logs (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if args.models:
        plan = replace(plan, models=tuple(args.models))
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llmservice-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    output = args.output or (work / "gpu-check-smoke.json" if args.smoke else REPO / "bench" / "results" / "gpu-check.json")
    started = time.monotonic()
    results: dict[str, Any] = {
        "benchmark": "gpu-check",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["bench/gpu_check.sh", *argv]),
        "machine": machine() | {"device_memory_mib_idle": device_memory_mib()},
        "source": source_state(),
        "plan": asdict(plan),
        "models": {},
    }
    failed = False
    for name in plan.models:
        shape = SHAPES[name]
        model_dir = work / name
        built = time.monotonic()
        subprocess.run([sys.executable, __file__, "--build-model", str(model_dir), name, plan.device, plan.dtype], check=True)
        log.info("Built %s in %.0f s", name, time.monotonic() - built)
        systems: dict[str, Any] = {}
        for system in plan.systems:
            if system == "static":
                systems[system] = run_static(plan, shape, model_dir, work)
            else:
                systems[system] = run_server(system, plan, shape, model_dir, work)
            # Written after every system: a run cut short by its time limit still leaves what it measured.
            results["models"][name] = {"shape": asdict(shape), "kv_bytes_per_token": kv_bytes_per_token(shape, plan.dtype)}
            results["models"][name] |= {"systems": systems, "rows": rows(plan, shape, systems)}
            write(results, output, started)
        failed |= "error" in systems["ours"]
        shutil.rmtree(model_dir, ignore_errors=True)  # 16 GB for the 8B shapes: the disk holds one at a time
    write(results, output, started)
    print(results["table"])
    print(f"\nwrote {output} in {results['duration_s']:.0f} s; logs in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never a download: every model here is built locally
    sys.exit(main())
