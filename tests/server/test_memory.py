"""The memory budget's arithmetic and the termination message, on their own (no model, no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmservice_server.memory import (
    CPU_MARGIN_BYTES,
    GIB,
    MIB,
    DoesNotFit,
    KVShape,
    check_context_fits,
    check_model_fits,
    container_memory,
    cpu_budget,
    cpu_free,
    cpu_kv_budget,
    cuda_budget,
    pool_blocks,
)
from llmservice_server.termination import MAX_BYTES, one_line, write_termination_log

QWEN_7B = KVShape(layers=28, kv_heads=4, head_dim=128, dtype_bytes=2)  # bf16: 56 KiB per token


def test_a_token_costs_keys_and_values_of_every_layer() -> None:
    assert QWEN_7B.token_bytes == 28 * 2 * 4 * 128 * 2 == 57344
    assert QWEN_7B.block_bytes(16) == 16 * 57344


def test_the_pool_is_the_budget_in_whole_blocks_and_never_more_than_can_be_used() -> None:
    block = QWEN_7B.block_bytes(16)
    assert pool_blocks(10 * block + block // 2, QWEN_7B, 16, max_num_seqs=32, max_model_len=8192) == 10
    # 2 sequences of 100 tokens use 7 blocks each: a larger budget is not allocated.
    assert pool_blocks(1000 * block, QWEN_7B, 16, max_num_seqs=2, max_model_len=100) == 14


def test_a_context_that_does_not_fit_is_refused_with_the_longest_that_does() -> None:
    check_context_fits(blocks=512, shape=QWEN_7B, block_tokens=16, max_model_len=8192)  # exactly fits
    with pytest.raises(DoesNotFit) as refused:
        check_context_fits(blocks=300, shape=QWEN_7B, block_tokens=16, max_model_len=8192)
    message = str(refused.value)
    assert "--max-model-len 8192 does not fit" in message and "the largest --max-model-len that fits is 4800" in message
    assert "\n" not in message


def test_a_model_that_cannot_fit_is_refused_with_the_numbers() -> None:
    weights = int(15.2 * GIB)
    check_model_fits(weights, QWEN_7B, 8192, 16 * GIB, "cuda")
    with pytest.raises(DoesNotFit) as refused:
        check_model_fits(weights, QWEN_7B, 8192, 15 * GIB, "cuda")
    assert str(refused.value) == (
        "the model does not fit on cuda: weights 15.20 GiB + K/V 0.44 GiB per sequence of 8192 tokens > 15.00 GiB free"
    )


def test_budgets_leave_the_weights_the_warm_up_and_a_margin() -> None:
    assert cuda_budget(total_bytes=24 * GIB, used_after_warmup_bytes=16 * GIB, utilization=0.9) == int(24 * GIB * 0.9) - 16 * GIB
    assert cuda_budget(total_bytes=24 * GIB, used_after_warmup_bytes=23 * GIB, utilization=0.9) == 0
    assert cpu_budget(limit_bytes=4 * GIB, used_bytes=GIB) == 3 * GIB - CPU_MARGIN_BYTES  # 10 % of 4 GiB < 512 MiB
    assert cpu_budget(limit_bytes=16 * GIB, used_bytes=GIB) == 15 * GIB - int(1.6 * GIB)
    assert cpu_kv_budget(None, 0, available=8 * GIB) == 4 * GIB - CPU_MARGIN_BYTES  # no limit: half of what is free
    assert cpu_free(None, 0, available=8 * GIB) == 8 * GIB and cpu_free(4 * GIB, 3 * GIB, available=8 * GIB) == GIB


def test_the_container_limit_is_read_from_cgroup_v2_then_v1(tmp_path: Path) -> None:
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    v1.mkdir()
    assert container_memory(v2, v1) == (None, 0)
    (v1 / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "unlimited"
    assert container_memory(v2, v1) == (None, 0)
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{300 * MIB}\n")
    assert container_memory(v2, v1) == (2 * GIB, 300 * MIB)
    (v2 / "memory.max").write_text("max\n")
    (v2 / "memory.current").write_text("123\n")
    assert container_memory(v2, v1) == (2 * GIB, 300 * MIB)  # v2 says "max": a hybrid host's v1 limit is read
    (v2 / "memory.max").write_text(f"{4 * GIB}\n")
    assert container_memory(v2, v1) == (4 * GIB, 123)


def test_the_termination_message_is_one_line_of_at_most_4_kib(tmp_path: Path) -> None:
    assert one_line("OSError: no\nsuch  model") == "OSError: no such model\n"
    long = one_line("é" * 5000)
    assert len(long.encode()) <= MAX_BYTES and long.endswith("...\n") and long.count("\n") == 1
    long.encode().decode()  # never half a character
    path = tmp_path / "termination-log"
    assert write_termination_log(path, "ValueError: bad\nthing")
    assert path.read_text() == "ValueError: bad thing\n"
    assert not write_termination_log(tmp_path / "missing-dir" / "log", "x")  # not writable: skipped, no error
