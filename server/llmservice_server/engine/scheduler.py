"""The scheduler: which rows run this step and which prompt chunks it reads, by the K/V blocks free.

It owns the queue (new requests; preempted work at its head), the prompts being read and the
running rows, and the K/V pool's book-keeping (`kv_blocks`) with the block table the runner reads
(`kv_cache`). Per step, in this order: `grow` gives every running row whose blocks are full the
block its next token is written to, preempting the most recently admitted row or prompt when none
is left; `plan_chunks` picks the prompt tokens read alongside; after the forward, `join` moves
prompts read to their end into the batch and `retire` takes finished rows out. Between steps
`admit` starts new work while rows, the read budget and free blocks allow. It runs no model:
tensors move only in `join` (a partial block copied per extra choice) and the block table.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable

import torch

from ..metrics import Metrics
from ..settings import Settings
from .kv_blocks import BLOCK_TOKENS, BlockPool
from .kv_cache import BlockTable, KVCache
from .requests import Reading, Row, Ticket

log = logging.getLogger(__name__)

PREFILL_TOKEN_BUDGET = 8192  # prompt tokens being read at once (bounds how long a newcomer waits for its first chunk)


class Scheduler:
    def __init__(self, settings: Settings, pool: BlockPool, cache: KVCache, table: BlockTable, metrics: Metrics | None) -> None:
        self.settings = settings
        self.pool = pool
        self.cache = cache
        self.table = table
        self.metrics = metrics  # None while warming up: warm-up traffic is not user traffic
        self.waiting: deque[Ticket | Reading] = deque()  # new requests; preempted work at the head
        self.rows: list[Row] = []  # the running batch: row i's blocks are row i of the block table
        self.reading: list[Reading] = []  # prompts being read, oldest first
        self._admissions = itertools.count(1)

    def busy(self) -> bool:
        return bool(self.rows or self.reading or self.waiting)

    def rows_taken(self) -> int:
        return len(self.rows) + sum(len(reading.rows) for reading in self.reading)

    def remove(self, tickets: set[Ticket]) -> None:
        """Take these requests out of the engine: waiting, being read, running; their blocks go back."""
        if not tickets:
            return
        kept: deque[Ticket | Reading] = deque()
        for item in self.waiting:
            if (item if isinstance(item, Ticket) else item.ticket) not in tickets:
                kept.append(item)
        self.waiting = kept
        for reading in [reading for reading in self.reading if reading.ticket in tickets]:
            self.reading.remove(reading)
            self.release_reading(reading)
        self.retire({i for i, row in enumerate(self.rows) if row.active.ticket in tickets})

    def admit(self, readings_of: Callable[[Ticket], list[Reading]]) -> list[tuple[Ticket, str]]:
        """Start reading waiting work, oldest first, while rows, the read budget and free blocks allow
        (`readings_of` makes a new request's prompts and rows); the requests that can never fit, and why."""
        pool = self.pool
        refused: list[tuple[Ticket, str]] = []
        room = self.settings.max_num_seqs - self.rows_taken()
        budget = PREFILL_TOKEN_BUDGET - sum(reading.length - reading.read for reading in self.reading)
        while self.waiting:
            head = self.waiting[0]
            if isinstance(head, Ticket):
                request = head.request
                rows, cost = request.rows, sum(len(p) for p in request.prompts)
                remainder = [len(p) % BLOCK_TOKENS != 0 for p in request.prompts]
                need = sum(pool.blocks_for(len(p)) for p in request.prompts) + (request.n - 1) * sum(remainder)
            else:
                rows, cost, need = len(head.rows), head.length - head.read, head.blocks_needed(BLOCK_TOKENS)
            if need > pool.total:  # could never be admitted: fail it rather than wait forever
                ticket = head if isinstance(head, Ticket) else head.ticket
                self.remove({ticket})
                refused.append((ticket, f"the request needs {need} K/V blocks; the cache has {pool.total}"))
                continue
            if rows > room or (self.reading and cost > budget) or need > pool.available:
                break
            self.waiting.popleft()
            room -= rows
            budget -= cost
            for reading in readings_of(head) if isinstance(head, Ticket) else [head]:
                self.start_reading(reading)
        return refused

    def start_reading(self, reading: Reading) -> None:
        """Give a reading its blocks (cached ones first: reading starts after them) and its place in line."""
        pool, cache = self.pool, self.cache
        reading.admitted = next(self._admissions)
        for row in reading.rows:
            row.admitted = reading.admitted
        reading.blocks = pool.lookup(reading.ids)
        reading.read = len(reading.blocks) * BLOCK_TOKENS
        if not reading.resumed:
            reading.rows[0].active.cached_tokens += reading.read
            if self.metrics is not None:
                self.metrics.prefix_cache_lookup(reading.length, reading.read)
        while len(reading.blocks) < pool.blocks_for(reading.length):
            reading.blocks.append(self.allocated())
        if reading.length % BLOCK_TOKENS:
            reading.copies = [self.allocated() for _ in reading.rows[1:]]
        device = self.table.table.device
        reading.slots = cache.slots(reading.blocks, reading.length).to(device)
        reading.block_ids = torch.tensor(reading.blocks, dtype=torch.long, device=device)
        reading.tokens = torch.tensor(reading.ids, dtype=torch.long)
        self.reading.append(reading)

    def allocated(self) -> int:
        block = self.pool.allocate()
        if block is None:  # admission counted the blocks: this is a bug, not a full pool
            raise RuntimeError("the K/V pool ran out of blocks admission had counted")
        return block

    def release_reading(self, reading: Reading) -> None:
        self.pool.release(reading.blocks)
        self.pool.release(reading.copies)
        reading.blocks, reading.copies, reading.slots, reading.block_ids, reading.read = [], [], None, None, 0

    def youngest(self) -> Row | Reading:
        """The most recently admitted row or prompt being read: the first to preempt."""
        candidates: list[Row | Reading] = [*self.rows, *self.reading]
        return max(candidates, key=lambda item: item.admitted)

    def preempt(self, victim: Row | Reading) -> None:
        """Give back `victim`'s blocks and put it at the head of the queue, to be read again from the start."""
        if isinstance(victim, Reading):
            self.reading.remove(victim)
            self.release_reading(victim)
            self.waiting.appendleft(victim)
        else:
            index = self.rows.index(victim)
            history = victim.history()  # its K/V's tokens and the one it feeds next
            self.retire({index})
            self.waiting.appendleft(Reading(victim.active.ticket, history, [victim], resumed=True))
        if self.metrics is not None:
            self.metrics.preemptions.inc()
        ticket = victim.ticket if isinstance(victim, Reading) else victim.active.ticket
        log.debug("Preempted", extra={"request_id": ticket.request.request_id})

    def grow(self) -> None:
        """Give each running row whose blocks are full a new block for the token it writes this step,
        oldest rows first, preempting the youngest when the pool has none."""
        full = [row for row in self.rows if row.length == len(row.blocks) * BLOCK_TOKENS]
        if not full:
            return
        pool, table = self.pool, self.table
        for row in sorted(full, key=lambda r: r.admitted):
            if not any(r is row for r in self.rows):
                continue  # preempted for an older row in this loop
            block = pool.allocate()
            while block is None:
                victim = self.youngest()
                self.preempt(victim)
                if victim is row:
                    break
                block = pool.allocate()
            if block is not None:
                table.append(self.rows.index(row), len(row.blocks), block)
                row.blocks.append(block)

    def plan_chunks(self) -> list[tuple[Reading, int, int]]:
        """The prompt tokens this step reads: oldest prompts first, `prefill_chunk_tokens` in all."""
        budget = max(1, self.settings.prefill_chunk_tokens)
        plan: list[tuple[Reading, int, int]] = []
        for reading in self.reading:
            if budget <= 0:
                break
            start = reading.read
            end = min(reading.length, start + budget)
            plan.append((reading, start, end))
            budget -= end - start
        return plan

    def join(self, reading: Reading) -> None:
        """A fully read prompt's rows join the batch: the first holds its blocks, the others share its
        full blocks and copy its partial last one; its full blocks become findable in the prefix cache."""
        pool, cache, table = self.pool, self.cache, self.table
        first = len(self.rows)
        table.ensure_rows(first + len(reading.rows))
        pool.register(reading.ids, reading.blocks)
        copies = iter(reading.copies)
        for i, row in enumerate(reading.rows):
            blocks = list(reading.blocks)
            if i > 0:
                for block in blocks:
                    pool.share(block)
                if reading.length % BLOCK_TOKENS:
                    pool.release([blocks[-1]])
                    blocks[-1] = next(copies)
                    cache.copy_block(reading.blocks[-1], blocks[-1])
            row.blocks = blocks
            row.length = reading.length
            table.set(first + i, blocks)
        reading.blocks, reading.copies = [], []
        self.rows.extend(reading.rows)

    def retire(self, finished: set[int]) -> None:
        """Drop rows by index, their blocks back to the pool (full ones stay findable in the prefix cache);
        the last rows move into the freed places of the block table."""
        if not finished:
            return
        rows, pool = self.rows, self.pool
        for i in finished:
            row = rows[i]
            pool.register(row.history()[: row.length], row.blocks)
            pool.release(row.blocks)
            row.blocks = []
        kept = len(rows) - len(finished)
        holes = sorted(i for i in finished if i < kept)
        movers = [i for i in range(kept, len(rows)) if i not in finished]
        if movers:
            self.table.move(movers, holes)
            for hole, mover in zip(holes, movers, strict=True):
                rows[hole] = rows[mover]
        del rows[kept:]
