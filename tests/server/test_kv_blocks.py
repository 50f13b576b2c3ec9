"""The K/V pool's book-keeping on its own: blocks handed out and back, and the prefix cache over them."""

from __future__ import annotations

import pytest

from llmservice_server.engine.kv_blocks import BlockPool

BLOCK = 4


def hold(pool: BlockPool, tokens: list[int]) -> list[int]:
    """What the engine does for a prompt: take its cached beginning, allocate the rest."""
    blocks = pool.lookup(tokens)
    while len(blocks) < pool.blocks_for(len(tokens)):
        block = pool.allocate()
        assert block is not None
        blocks.append(block)
    return blocks


def finish(pool: BlockPool, tokens: list[int], blocks: list[int]) -> None:
    pool.register(tokens, blocks)
    pool.release(blocks)


def test_blocks_are_handed_out_until_none_is_left_and_come_back() -> None:
    pool = BlockPool(3, BLOCK)
    taken = [pool.allocate() for _ in range(3)]
    assert sorted(b for b in taken if b is not None) == [0, 1, 2]
    assert pool.allocate() is None and pool.usage() == 1.0
    pool.release([taken[1]])
    assert pool.available == 1 and pool.allocate() == taken[1]


def test_a_shared_block_is_free_only_when_its_last_holder_lets_go() -> None:
    pool = BlockPool(2, BLOCK)
    block = pool.allocate()
    assert block is not None
    pool.share(block)  # a second choice of the same prompt
    pool.release([block])
    assert pool.available == 1
    pool.release([block])
    assert pool.available == 2 and pool.usage() == 0.0


def test_a_prompt_finds_its_longest_cached_block_prefix_and_keeps_a_token_to_read() -> None:
    pool = BlockPool(10, BLOCK, cache_blocks=10)
    first = list(range(1, 11))  # 10 tokens: blocks [1..4], [5..8]; 9, 10 are not a whole block
    blocks = hold(pool, first)
    assert pool.lookup(first) == []  # nothing is findable before its K/V are written and registered
    finish(pool, first, blocks)
    assert pool.cached == 2 and pool.usage() == 0.0  # cached, idle: free for others if needed
    assert pool.lookup(first) == blocks[:2]
    assert pool.lookup([1, 2, 3, 4, 5, 6, 99, 98, 97]) == blocks[:1]  # shares one whole block
    assert pool.lookup(list(range(1, 9))) == blocks[:1]  # exactly 8: the last block is left to read
    assert pool.lookup([0, 1, 2, 3, 4, 5, 6, 7, 8]) == []  # the same tokens not at the start are no prefix
    assert pool.used == 2  # the lookups hold what they found


def test_prompts_that_share_a_beginning_share_its_blocks() -> None:
    pool = BlockPool(10, BLOCK, cache_blocks=10)
    system = [7, 7, 7, 7, 8, 8, 8, 8]
    first = hold(pool, [*system, 1, 2, 3, 4, 0])
    pool.register([*system, 1, 2, 3, 4, 0], first)  # still running: its blocks are held and findable
    second = hold(pool, [*system, 5, 6, 7, 8, 9])
    assert second[:2] == first[:2] and second[2] != first[2]
    assert pool.used == 4 + 2  # 4 blocks each, the system prompt's two held once
    finish(pool, [*system, 5, 6, 7, 8, 9], second)
    assert pool.lookup([*system, 5, 6, 7, 8, 0]) == second[:3]


def test_idle_cached_blocks_are_taken_least_recently_used_first_leaves_before_their_parents() -> None:
    pool = BlockPool(4, BLOCK, cache_blocks=4)
    a = [1, 1, 1, 1, 2, 2, 2, 2, 3]
    a_blocks = hold(pool, a)
    finish(pool, a, a_blocks)  # two cached blocks and a free one
    b = [4, 4, 4, 4, 5]
    b_blocks = hold(pool, b)
    finish(pool, b, b_blocks)
    assert pool.cached == 3
    assert pool.lookup(a) == a_blocks[:2]  # a is the most recent now
    pool.release(a_blocks[:2])
    big = [pool.allocate() for _ in range(2)]  # the never-cached block first, then the LRU idle one: b's
    assert None not in big and pool.lookup(b) == []
    assert pool.lookup(a) == a_blocks[:2]
    pool.release(a_blocks[:2])
    assert pool.allocate() == a_blocks[1]  # a's leaf before its root
    assert pool.lookup(a) == a_blocks[:1]


def test_the_idle_cache_is_capped_and_zero_caches_nothing() -> None:
    pool = BlockPool(10, BLOCK, cache_blocks=1)
    long = list(range(1, 14))
    finish(pool, long, hold(pool, long))
    assert pool.cached == 1 and pool.available == 10  # the deepest went back to the free list first
    assert pool.lookup(long) != []
    off = BlockPool(10, BLOCK, cache_blocks=0)
    finish(off, long, hold(off, long))
    assert off.cached == 0 and off.lookup(long) == []


def test_a_pool_needs_a_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0, BLOCK)
