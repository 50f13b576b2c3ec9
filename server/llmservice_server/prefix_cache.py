"""K/V of prompt prefixes already read, reused by later prompts that begin with the same tokens.

Why: chat requests repeat their beginnings - the chat template's system prompt (24 of a short
SmolLM2 request's ~60 prompt tokens), a shared instruction, a conversation's earlier turns - and
on a CPU reading prompt tokens is most of a busy step's time. A prompt that starts with a cached
prefix is read from the first token after it: its K/V there are copied, not computed. They are the
same numbers: a causal model's K/V at a position depend only on the tokens up to it.

Prefixes are cached in blocks of `block_tokens` tokens, as a tree: a block is keyed by the block
before it and its own tokens, so a lookup walks the prompt block by block and two prompts that
share a beginning share its blocks. Keys are exact token tuples (no hashes, so no collisions).
Memory is bounded by `budget_bytes`; when full, the least recently used block goes. Every use
touches a block's ancestors after the block itself, so a block is always more recent than its
descendants: the least recently used block never has one, and eviction never orphans a block.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BLOCK_TOKENS = 8  # fine enough that most of a shared system prompt is cached (SmolLM2's: 24 of 24)
_ROOT = 0

_Key = tuple[int, tuple[int, ...]]  # (the parent block's id, this block's tokens)


@dataclass(frozen=True, eq=False)
class _Block:
    id: int
    kv: torch.Tensor  # [layers, 2 (keys, values), kv_heads, block_tokens, head_dim]


class PrefixCache:
    """Blocks of prompt K/V by the tokens that precede and make them, least recently used evicted first."""

    def __init__(self, budget_bytes: int, block_tokens: int = BLOCK_TOKENS) -> None:
        if block_tokens < 1:
            raise ValueError("block_tokens must be at least 1")
        self.budget_bytes = budget_bytes
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[_Key, _Block] = OrderedDict()  # oldest use first
        self._ids = itertools.count(_ROOT + 1)
        self._capacity: int | None = None  # blocks: known from the first block's size

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def lookup(self, tokens: Sequence[int]) -> torch.Tensor | None:
        """K/V of the longest cached block prefix of `tokens` that leaves at least one token to read
        (its logits give the first generated token): `[layers, 2, kv_heads, n, head_dim]`, or None."""
        path = self._walk(tokens, len(tokens) - 1)
        if not path:
            return None
        self._touch(path)
        return torch.cat([block.kv for _, block in path], dim=3)

    def insert(self, tokens: Sequence[int], kv_of: Callable[[int, int], torch.Tensor]) -> None:
        """Cache the full blocks of `tokens` not cached yet; `kv_of(start, end)` gives their K/V
        (`[layers, 2, kv_heads, end - start, head_dim]`), asked once for the missing range."""
        if not self.enabled:
            return
        size = self.block_tokens
        whole = len(tokens) // size
        path = self._walk(tokens, whole * size)
        if len(path) == whole:
            self._touch(path)
            return
        first = len(path)
        kv = kv_of(first * size, whole * size)
        if self._capacity is None:
            self._capacity = self.budget_bytes // max(1, kv[:, :, :, :size].nbytes)
        if self._capacity == 0:
            return
        self._touch(path)  # the path is the most recent now: eviction below takes other blocks first
        on_path = {key for key, _ in path}
        parent = path[-1][1].id if path else _ROOT
        for index in range(first, whole):
            while len(self._blocks) >= self._capacity:
                oldest = next(iter(self._blocks))
                if oldest in on_path:  # the budget holds no more than this prompt's own blocks
                    self._touch(path)
                    return
                del self._blocks[oldest]
            key = (parent, tuple(tokens[index * size : (index + 1) * size]))
            offset = (index - first) * size  # `kv` starts at the first missing block
            block = _Block(next(self._ids), kv[:, :, :, offset : offset + size].clone())  # its own storage: evicted alone
            self._blocks[key] = block
            path.append((key, block))
            on_path.add(key)
            parent = block.id
        self._touch(path)

    def _walk(self, tokens: Sequence[int], limit: int) -> list[tuple[_Key, _Block]]:
        """The cached blocks that begin `tokens`, within its first `limit` tokens."""
        size = self.block_tokens
        path: list[tuple[_Key, _Block]] = []
        parent = _ROOT
        for end in range(size, limit + 1, size):
            key = (parent, tuple(tokens[end - size : end]))
            block = self._blocks.get(key)
            if block is None:
                break
            path.append((key, block))
            parent = block.id
        return path

    def _touch(self, path: list[tuple[_Key, _Block]]) -> None:
        for key, _ in reversed(path):  # deepest first: each block ends up more recent than its descendants
            self._blocks.move_to_end(key)
