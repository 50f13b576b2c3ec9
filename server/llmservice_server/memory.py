"""The memory budget: how much the K/V cache may take, and whether a model fits at all.

Pure arithmetic over numbers the loader measures (no torch), so every rule is unit-tested:

- `--kv-cache-mib` set: that is the pool.
- On CUDA: `--gpu-memory-utilization` of the device's memory, less what the process holds once the
  weights are loaded and a warm-up step ran (its measured peak: activations, workspaces).
- On a CPU: the container's memory limit (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`;
  without one, the memory available now) less what the pod already uses (the weights, both
  processes, the page cache - counted as used, so the estimate errs low) and a margin of
  `CPU_MARGIN_FRACTION` of the limit, at least `CPU_MARGIN_BYTES`, for what a step allocates
  (activations, logits, the HTTP process's buffers) and for the allocator's fragmentation.

Either way the pool is never larger than `max_num_seqs` sequences of `max_model_len` tokens: more
could never be used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
MIB = 2**20
CPU_MARGIN_BYTES = 512 * MIB
CPU_MARGIN_FRACTION = 0.10
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_UNLIMITED_V1 = 2**60  # cgroup v1 writes "no limit" as a huge page-aligned number


class DoesNotFit(RuntimeError):
    """The model or one sequence of its context cannot fit the memory there is; the message has the numbers."""


@dataclass(frozen=True)
class KVShape:
    """What one token costs in the K/V cache."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @property
    def token_bytes(self) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    def block_bytes(self, block_tokens: int) -> int:
        return self.token_bytes * block_tokens


def blocks_for(tokens: int, block_tokens: int) -> int:
    return math.ceil(tokens / block_tokens)


def gib(count: float) -> str:
    return f"{count / GIB:.2f} GiB"


def pool_blocks(budget_bytes: int, shape: KVShape, block_tokens: int, *, max_num_seqs: int, max_model_len: int) -> int:
    """Blocks in a pool of `budget_bytes`, no more than `max_num_seqs` full-length sequences can use."""
    useful = max_num_seqs * blocks_for(max_model_len, block_tokens)
    return max(0, min(budget_bytes // shape.block_bytes(block_tokens), useful))


def check_context_fits(blocks: int, shape: KVShape, block_tokens: int, max_model_len: int) -> None:
    """Refuse a pool in which one sequence of `max_model_len` tokens does not fit, naming the longest that does."""
    if blocks_for(max_model_len, block_tokens) <= blocks:
        return
    longest = blocks * block_tokens
    raise DoesNotFit(
        f"the K/V cache holds {longest} tokens ({gib(blocks * shape.block_bytes(block_tokens))}, "
        f"{gib(shape.token_bytes * max_model_len)} per sequence of {max_model_len}): one sequence of --max-model-len "
        f"{max_model_len} does not fit; the largest --max-model-len that fits is {longest}"
        + ("" if longest else " (none: raise --kv-cache-mib, the memory limit or --gpu-memory-utilization)")
    )


def check_model_fits(weights_bytes: int, shape: KVShape, max_model_len: int, free_bytes: int, where: str) -> None:
    """Before loading: refuse a model whose weights and one sequence of K/V exceed the memory free for them."""
    sequence = shape.token_bytes * max_model_len
    if weights_bytes + sequence <= free_bytes:
        return
    raise DoesNotFit(
        f"the model does not fit on {where}: weights {gib(weights_bytes)} + K/V {gib(sequence)} per sequence of "
        f"{max_model_len} tokens > {gib(free_bytes)} free"
    )


def cuda_budget(total_bytes: int, used_after_warmup_bytes: int, utilization: float) -> int:
    """K/V bytes on a GPU: the allowed share of its memory less what weights and the warm-up peak took."""
    return max(0, int(total_bytes * utilization) - used_after_warmup_bytes)


def cpu_budget(limit_bytes: int, used_bytes: int) -> int:
    """K/V bytes on a CPU: the memory limit less what is used and the margin."""
    margin = max(CPU_MARGIN_BYTES, int(limit_bytes * CPU_MARGIN_FRACTION))
    return max(0, limit_bytes - used_bytes - margin)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def container_memory(root_v2: Path = _CGROUP_V2, root_v1: Path = _CGROUP_V1) -> tuple[int | None, int]:
    """(limit, used) bytes of this container's memory (cgroup v2, else v1); limit None: there is none."""
    limit, used = _read_int(root_v2 / "memory.max"), _read_int(root_v2 / "memory.current")
    if limit is None:
        limit, used = _read_int(root_v1 / "memory.limit_in_bytes"), _read_int(root_v1 / "memory.usage_in_bytes")
        if limit is not None and limit >= _UNLIMITED_V1:
            limit = None
    return limit, used or 0


def cpu_free(limit: int | None, used: int, available: int) -> int:
    """Memory a model may take on a CPU: the limit less what is used; without a limit, what is available."""
    return available if limit is None else max(0, limit - used)


def cpu_kv_budget(limit: int | None, used: int, available: int) -> int:
    """K/V bytes on a CPU: within a limit, less what is used and the margin; without one, half of what is available less the margin."""
    if limit is None:
        return cpu_budget(available // 2, 0)
    return cpu_budget(limit, used)


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    return _mem_available(meminfo)


def _mem_available(meminfo: Path) -> int:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
