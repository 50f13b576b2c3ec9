"""`bench/gpu_check.sh --smoke`: the GPU benchmark's whole path on the CPU, so the script cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_check import SHAPES, SMOKE_PLAN, kv_bytes_per_token, prompts, roofline_tok_s

REPO = Path(__file__).resolve().parents[2]


def test_prompts_are_exactly_as_long_as_asked_and_share_no_prefix() -> None:
    texts = prompts(3, 12, vocab_size=100, seed=1)
    assert [len(t.split()) for t in texts] == [9, 9, 9]  # 12 tokens less the chat template's three
    assert len({t.split()[0] for t in texts}) == 3  # a prefix cache finds nothing to share
    assert all(word.startswith("w") for t in texts for word in t.split())  # no special token among them


def test_the_roofline_reads_the_weights_once_and_each_rows_kv_per_step() -> None:
    shape = SHAPES["llama-3.1-8b"]
    assert kv_bytes_per_token(shape, "bfloat16") == 2 * 32 * 8 * 128 * 2  # 128 KiB per context token
    roof = {"bytes_per_token": 16e9, "copy_bandwidth_gbs": 3000.0}
    one = roofline_tok_s(roof, shape, "bfloat16", streams=1, context=0)
    assert one == 3000e9 / 16e9
    # 64 rows of 640 tokens add 64 * 640 * 128 KiB (5.4 GB) to the 16 GB read per step.
    assert roofline_tok_s(roof, shape, "bfloat16", streams=64, context=640) == 64 * 3000e9 / (16e9 + 64 * 640 * 131072)


def test_smoke_runs_every_system_at_every_level(tmp_path: Path) -> None:
    output = tmp_path / "gpu-check.json"
    env = os.environ | {"PYTHON": sys.executable}
    done = subprocess.run(
        [str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--work-dir", str(tmp_path / "work"), "--output", str(output)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny | 4 | ours |" in done.stdout  # the table is printed
    results = json.loads(output.read_text())
    model = results["models"]["tiny"]
    assert not (tmp_path / "work" / "tiny").exists()  # the model is removed after its run
    for streams in SMOKE_PLAN.streams:
        level = model["systems"]["ours"]["levels"][str(streams)]
        # Every stream ran its whole prompt and every output token: the random model never stops early.
        assert level["completed"] == streams
        assert level["total_prompt_tokens"] == streams * SMOKE_PLAN.prompt_tokens
        assert level["total_output_tokens"] == streams * SMOKE_PLAN.output_tokens
    rows = {(r["system"], r["streams"]): r for r in model["rows"]}
    assert set(rows) == {(s, n) for s in SMOKE_PLAN.systems for n in SMOKE_PLAN.streams}
    for (system, _), row in rows.items():
        if system == "tserve" and row["tok_s"] is None:  # transformers serve may be missing; it must say why
            assert model["systems"]["tserve"]["error"]
            continue
        assert row["tok_s"] > 0 and row["fraction_of_roofline"] > 0
        if system != "static":
            assert row["ttft_p50_ms"] > 0 and row["ttft_p99_ms"] >= row["ttft_p50_ms"] and row["itl_p50_ms"] > 0
