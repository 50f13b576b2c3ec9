"""The model runner: one forward over a step's packed tokens, and torch's CPU threads for it.

It packs the running rows' next tokens and the planned prompt chunks into one sequence, with
each token's position and K/V slot (`ragged.RaggedStep`), runs the engine's own fused forward
(`decoder.py`) or transformers' `model(...)` over it, and returns the logits of the positions
that sample: one per running row, one per prompt read to its end. On a CPU it sets torch's
threads (and cores) per step size by the steps' measured times (`threads.py`, `placement.py`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..decoder import FusedDecoder
from ..loader import LoadedModel
from ..placement import Placement, pin_thread
from ..ragged import Chunk, RaggedStep, UnsupportedModel
from ..threads import ThreadTuner
from .requests import Reading

if TYPE_CHECKING:
    from .scheduler import Scheduler


class Runner:
    def __init__(self, loaded: LoadedModel, decoder: FusedDecoder | None, placement: Placement | None) -> None:
        self.loaded = loaded
        self.decoder = decoder  # the engine's own forward, for the architectures it knows; None: model(...)
        self.placement = placement  # the engine thread's cores per step's threads; None: the kernel's choice
        self.tuner: ThreadTuner | None = None  # set once serving: warm-up times are not representative
        self._threads = 0  # torch's CPU threads as last set by a step (0: not yet)

    def forward(self, scheduler: Scheduler, plan: list[tuple[Reading, int, int]]) -> torch.Tensor:
        """Run the model over the packed step; the logits of each running row, then of each prompt read to its end."""
        loaded = self.loaded
        device = loaded.device
        rows = scheduler.rows
        count = len(rows)
        lengths = torch.tensor([row.length for row in rows], dtype=torch.long)
        ids = [torch.tensor([row.next_token for row in rows], dtype=torch.long)]
        positions = [lengths]
        kv_len = max((row.length for row in rows), default=0) + 1
        table = scheduler.table.table
        size = scheduler.cache.block_tokens
        row_columns = lengths.to(device)
        row_blocks = table[:count, : -(-kv_len // size)]
        # Each running row writes its token at its length: the slot from its host-side block list, one copy for all.
        slots = [row.blocks[row.length // size] * size + row.length % size for row in rows]
        writes = [torch.tensor(slots, dtype=torch.long).to(device)] if count else []
        chunks: list[Chunk] = []
        offset = count
        keep = list(range(count))
        for reading, start, end in plan:
            assert reading.slots is not None and reading.block_ids is not None and reading.tokens is not None
            chunks.append(Chunk(start, end, offset, reading.block_ids[: -(-end // size)]))
            writes.append(reading.slots[start:end])
            ids.append(reading.tokens[start:end])
            positions.append(torch.arange(start, end, dtype=torch.long))
            offset += end - start
            if end == reading.length:
                keep.append(offset - 1)
        uniform = all(row.length == kv_len - 1 for row in rows)
        step = RaggedStep(scheduler.cache, count, row_columns, row_blocks, torch.cat(writes), kv_len, uniform, chunks)
        threads = self._threads_for(offset)
        started = time.perf_counter()
        input_ids, position_ids = torch.cat(ids).to(device), torch.cat(positions).to(device)
        kept = torch.tensor(keep or [0], dtype=torch.long, device=device)
        with torch.inference_mode():
            if self.decoder is not None:
                logits = self.decoder(input_ids, position_ids, step, kept)
            else:
                out = loaded.model(
                    input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False, logits_to_keep=kept, ragged=step
                )
                logits = out.logits[0]
        if self.tuner is not None and threads is not None:
            self.tuner.record(offset, threads, time.perf_counter() - started)
        layers = len(scheduler.cache.layers)
        if step.calls != layers:
            raise UnsupportedModel(f"the model made {step.calls} attention calls for {layers} layers: not all of it is batched")
        return logits

    def _threads_for(self, tokens: int) -> int | None:
        """Set torch's threads for a step of `tokens`: the tuner's choice once serving, the plan's while
        warming up (first calls are not what steps cost); None leaves them (a GPU)."""
        plan = self.loaded.threads
        if plan is None:
            return None
        threads = self.tuner.choose(tokens) if self.tuner is not None else plan.for_step(tokens)
        if threads != self._threads:  # cheap calls, but only a change needs them
            # Cores first: torch's worker threads, started at the first step on more than one,
            # take the cores of the thread that starts them. Refused once: not tried again.
            if self.placement is not None and not pin_thread(self.placement.for_step(threads)):
                self.placement = None
            torch.set_num_threads(threads)
            self._threads = threads
        return threads
