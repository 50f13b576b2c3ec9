"""The prefix cache on its own: which blocks a prompt finds, what they hold, what is evicted first."""

from __future__ import annotations

from collections.abc import Callable

import torch

from llmservice_server.prefix_cache import PrefixCache

BLOCK = 4
LAYERS = 2
BLOCK_BYTES = LAYERS * 2 * 1 * BLOCK * 1 * 4  # [layers, 2, kv_heads=1, BLOCK, head_dim=1] of float32


def kv_source(tokens: list[int], asked: list[tuple[int, int]] | None = None) -> Callable[[int, int], torch.Tensor]:
    """K/V whose every entry is the token at that position (plus 1000 per layer, 500 for values)."""

    def kv_of(start: int, end: int) -> torch.Tensor:
        if asked is not None:
            asked.append((start, end))
        ids = torch.tensor(tokens[start:end], dtype=torch.float32)
        layers = [torch.stack((ids + 1000 * layer, ids + 1000 * layer + 500)) for layer in range(LAYERS)]
        return torch.stack(layers)[:, :, None, :, None]

    return kv_of


def cached_tokens(kv: torch.Tensor | None) -> list[int]:
    """The tokens a looked-up K/V was made from (layer 0's keys), checking every layer agrees."""
    if kv is None:
        return []
    assert kv.shape[0] == LAYERS and kv.shape[1] == 2
    ids = kv[0, 0, 0, :, 0]
    for layer in range(LAYERS):
        assert torch.equal(kv[layer, 0, 0, :, 0], ids + 1000 * layer)
        assert torch.equal(kv[layer, 1, 0, :, 0], ids + 1000 * layer + 500)
    return [int(token) for token in ids]


def fill(cache: PrefixCache, tokens: list[int]) -> None:
    cache.insert(tokens, kv_source(tokens))


def test_a_prompt_finds_its_longest_cached_block_prefix_and_keeps_a_token_to_read() -> None:
    cache = PrefixCache(budget_bytes=100 * BLOCK_BYTES, block_tokens=BLOCK)
    first = list(range(1, 11))  # 10 tokens: blocks [1..4], [5..8]; 9, 10 are not a whole block
    assert cache.lookup(first) is None
    fill(cache, first)
    assert cache.blocks == 2
    assert cached_tokens(cache.lookup(first)) == list(range(1, 9))
    # Shares 6 tokens with the first: one whole block.
    assert cached_tokens(cache.lookup([1, 2, 3, 4, 5, 6, 99, 98, 97])) == [1, 2, 3, 4]
    # Exactly the cached 8 tokens: the last block is left to read, for the logits of token 8.
    assert cached_tokens(cache.lookup(list(range(1, 9)))) == [1, 2, 3, 4]
    # The same tokens not at the start are not a prefix.
    assert cache.lookup([0, 1, 2, 3, 4, 5, 6, 7, 8]) is None


def test_prompts_that_share_a_beginning_share_its_blocks_and_only_the_rest_is_asked_for() -> None:
    cache = PrefixCache(budget_bytes=100 * BLOCK_BYTES, block_tokens=BLOCK)
    system = [7, 7, 7, 7, 8, 8, 8, 8]
    fill(cache, [*system, 1, 2, 3, 4])
    asked: list[tuple[int, int]] = []
    second = [*system, 5, 6, 7, 8, 9]
    cache.insert(second, kv_source(second, asked))
    assert asked == [(8, 12)]  # the system prompt's two blocks were there already
    assert cache.blocks == 4
    assert cached_tokens(cache.lookup([*second, 0])) == [*system, 5, 6, 7, 8]
    asked.clear()
    cache.insert(second, kv_source(second, asked))
    assert asked == [] and cache.blocks == 4


def test_the_least_recently_used_blocks_go_first_and_never_leave_a_block_without_its_parent() -> None:
    cache = PrefixCache(budget_bytes=4 * BLOCK_BYTES, block_tokens=BLOCK)
    a = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    b = [4, 4, 4, 4, 5, 5, 5, 5]
    fill(cache, a)
    fill(cache, b)  # 5 blocks for 4: a's oldest leaf, [3, 3, 3, 3], goes
    assert cache.blocks == 4
    assert cached_tokens(cache.lookup([*a, 0])) == a[:8]  # and looking a up makes it the most recent
    fill(cache, [6, 6, 6, 6, 0])  # b is the least recent now: its leaf goes, then nothing else
    assert cached_tokens(cache.lookup([*b, 0])) == b[:4]
    assert cached_tokens(cache.lookup([*a, 0])) == a[:8]
    fill(cache, [9, 9, 9, 9, 9, 9, 9, 9, 0])  # two more: b's last block, then the [6..] one
    assert cache.lookup([*b, 0]) is None
    assert cache.lookup([6, 6, 6, 6, 0]) is None
    assert cached_tokens(cache.lookup([*a, 0])) == a[:8]
    assert cache.blocks == 4


def test_a_prompt_longer_than_the_budget_caches_what_fits_of_its_beginning() -> None:
    cache = PrefixCache(budget_bytes=2 * BLOCK_BYTES, block_tokens=BLOCK)
    long = list(range(1, 21))
    fill(cache, long)
    assert cache.blocks == 2
    assert cached_tokens(cache.lookup(long)) == list(range(1, 9))


def test_no_budget_caches_nothing() -> None:
    for budget in (0, BLOCK_BYTES - 1):
        cache = PrefixCache(budget_bytes=budget, block_tokens=BLOCK)
        fill(cache, list(range(1, 21)))
        assert cache.blocks == 0
        assert cache.lookup(list(range(1, 21))) is None
