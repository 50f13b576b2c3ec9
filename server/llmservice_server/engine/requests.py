"""What the engine holds of a request: the caller's ticket, and the rows and prompts it schedules.

A `Ticket` is the submitting side's handle (cancel from any thread). Admitted, a request becomes
one `Reading` per prompt (its tokens read a chunk per step) whose `Row`s (n choices) join the
running batch when it is through, sharing an `Active` (usage, finish reasons). A preempted row
goes back as a `Reading` of its prompt and the tokens it already generated (`resumed`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..events import GenerationRequest, Sink
from ..sampling import RowSampler
from ..textstream import IncrementalDetokenizer, StopMatcher


class Ticket:
    """The caller's side of a submitted request: cancel it from any thread."""

    def __init__(self, request: GenerationRequest, sink: Sink, wake: Callable[[], None]) -> None:
        self.request = request
        self.sink = sink
        self.submitted = time.monotonic()
        self.deadline = self.submitted + request.timeout
        self.cancelled = False
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


@dataclass(eq=False)
class Active:
    """One admitted request: what its rows share."""

    ticket: Ticket
    rows_left: int
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    first_token_at: float | None = None
    reasons: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Row:
    """One sequence being generated (one choice of one prompt)."""

    active: Active
    index: int
    prompt: list[int]
    max_tokens: int
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    length: int = 0  # tokens in its K/V
    next_token: int = 0  # fed in the next step
    generated: int = 0
    last_token_at: float = 0.0
    tokens: list[int] = field(default_factory=list)  # generated so far (read again after a preemption)
    blocks: list[int] = field(default_factory=list)  # its K/V blocks, in token order
    admitted: int = 0  # admission order: the highest is preempted first

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def history(self) -> list[int]:
        return self.prompt + self.tokens


@dataclass(eq=False)
class Reading:
    """Tokens to read a chunk per step, its rows joining the batch when they are through: a newcomer's
    prompt (its n rows share its K/V), or a preempted row's prompt and generated tokens (`resumed`)."""

    ticket: Ticket
    ids: list[int]  # the tokens: its blocks' keys in the prefix cache
    rows: list[Row]
    resumed: bool = False
    read: int = 0  # tokens already through the model (or found in the prefix cache)
    blocks: list[int] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)  # rows[1:]: each its own copy of a partial last block
    slots: torch.Tensor | None = None  # [len(ids)] pool slots of the tokens (where they are written), on the device
    block_ids: torch.Tensor | None = None  # its blocks (where they are read from), on the device
    tokens: torch.Tensor | None = None  # [len(ids)] on the CPU: packed with the step's other tokens
    admitted: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    def blocks_needed(self, block_tokens: int) -> int:
        whole = -(-self.length // block_tokens)
        return whole + (len(self.rows) - 1 if self.length % block_tokens else 0)
