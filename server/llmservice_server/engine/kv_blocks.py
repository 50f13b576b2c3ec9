"""Which K/V block holds what: the book-keeping of the engine's one fixed pool (no tensors here).

The pool (`kv_cache.KVCache`) is `blocks` blocks of `block_tokens` tokens each, allocated once.
A sequence holds a list of blocks; its token `t` lives in block `t // block_tokens`. This module
hands blocks out and takes them back, and it is the prefix cache too, inside the same pool:

- a block holding `block_tokens` tokens of a prompt (or of a sequence that finished or was
  preempted) is registered under a key made of the block before it and its own tokens, so a
  later sequence that begins with the same tokens takes those blocks instead of computing them
  (a causal model's K/V at a position depend only on the tokens up to it); keys are exact
  token tuples and chain ids, never hashes, so they never collide;
- a block is shared by reference count (choices of one prompt, prompts with one beginning);
  registered blocks are full and never written again;
- a registered block no sequence holds stays cached, idle, until its slot is needed: `allocate`
  takes a never-cached free block first, then the least recently used idle one. Releasing a
  sequence's blocks last-first makes a block's descendants older than it, so eviction takes
  leaves first. `cache_blocks` caps the idle blocks kept (0: no prefix caching).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence

BLOCK_TOKENS = 8  # fine enough that most of a shared system prompt is cached (SmolLM2's: 24 of 24)
_ROOT = 0

_Key = tuple[int, tuple[int, ...]]  # (the chain id of the block before, this block's tokens)


class BlockPool:
    """Reference-counted blocks of a fixed pool, with the prefix cache's registry over them."""

    def __init__(self, blocks: int, block_tokens: int = BLOCK_TOKENS, cache_blocks: int = 0) -> None:
        if blocks < 1 or block_tokens < 1:
            raise ValueError("a pool needs at least one block of at least one token")
        self.total = blocks
        self.block_tokens = block_tokens
        self.cache_blocks = cache_blocks
        # Last freed, first reused: the blocks in use stay few and warm in the CPU's caches (and, on a
        # CPU, the pool's untouched pages are never committed), instead of cycling through the pool.
        self._free: list[int] = list(reversed(range(blocks)))
        self._refs = [0] * blocks
        self._by_key: dict[_Key, int] = {}
        self._key_of: dict[int, tuple[_Key, int]] = {}  # a registered block's key and chain id
        self._idle: OrderedDict[int, None] = OrderedDict()  # registered, held by none; least recently used first
        self._ids = itertools.count(_ROOT + 1)

    @property
    def available(self) -> int:
        """Blocks `allocate` can hand out now (free, or cached and idle)."""
        return len(self._free) + len(self._idle)

    @property
    def used(self) -> int:
        return self.total - self.available

    @property
    def cached(self) -> int:
        return len(self._key_of)

    def usage(self) -> float:
        """The share of the pool sequences hold, 0..1 (idle cached blocks count as free)."""
        return self.used / self.total

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def allocate(self) -> int | None:
        """A block of one's own (reference 1), or None when every block is held."""
        if self._free:
            block = self._free.pop()
        elif self._idle:
            block, _ = self._idle.popitem(last=False)
            self._forget(block)
        else:
            return None
        self._refs[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more holder of `block`."""
        if self._refs[block] == 0:
            del self._idle[block]
        self._refs[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each of `blocks` (a sequence's, in order): unregistered ones go free,
        registered ones idle, deepest first."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._idle[block] = None
                while len(self._idle) > self.cache_blocks:
                    oldest, _ = self._idle.popitem(last=False)
                    self._forget(oldest)
                    self._free.append(oldest)
            else:
                self._free.append(block)

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The cached blocks of the longest block prefix of `tokens` that leaves at least one token to
        read (its logits give the next token), each now held once more by the caller."""
        if self.cache_blocks == 0:
            return []
        found: list[int] = []
        parent = _ROOT
        size = self.block_tokens
        for end in range(size, len(tokens), size):
            block = self._by_key.get((parent, tuple(tokens[end - size : end])))
            if block is None:
                break
            found.append(block)
            parent = self._key_of[block][1]
        for block in found:
            self.share(block)
        return found

    def register(self, tokens: Sequence[int], blocks: Sequence[int]) -> None:
        """Make the full blocks of a sequence holding `tokens` findable by later lookups (its K/V are written)."""
        if self.cache_blocks == 0:
            return
        size = self.block_tokens
        parent = _ROOT
        for index in range(min(len(tokens) // size, len(blocks))):
            key = (parent, tuple(tokens[index * size : (index + 1) * size]))
            known = self._by_key.get(key)
            if known is None:
                block = blocks[index]
                if block in self._key_of:  # already cached under another key: cannot be this content
                    return
                chain = next(self._ids)
                self._by_key[key] = block
                self._key_of[block] = (key, chain)
                parent = chain
            else:  # the same tokens are cached in another block: the chain goes on through that one
                parent = self._key_of[known][1]

    def _forget(self, block: int) -> None:
        key, _ = self._key_of.pop(block)
        del self._by_key[key]
