"""Per-row next-token selection: grammar masks, penalties, temperature, top-k/min-p/top-p, logprobs.

Functions over logits (no model, no threads), so they are unit-tested directly. The engine
calls `select_tokens` once per decode step for the whole batch: rows that are plain greedy share
one vectorised argmax, the rest are handled one by one with their own settings and generator.
Logprobs are reported from the model's own distribution (log-softmax of the raw logits), before
masks, penalties and temperature, as vLLM does by default. The order is vLLM's: the grammar mask
and `min_tokens`' held-back stop tokens, then penalties, temperature, then top-k, min-p, top-p.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .constraints import Constraint
from .events import SamplingParams


@dataclass
class RowSampler:
    """One sequence's sampling state: settings, its own RNG, counts of generated tokens."""

    params: SamplingParams
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [vocab] float32 of generated tokens, only when penalties are on
    seen: torch.Tensor | None = None  # [vocab] bool of prompt and generated tokens, for repetition_penalty
    constraint: Constraint | None = None
    held: list[int] = field(default_factory=list)  # stop tokens held back while fewer than min_tokens were generated
    generated: int = 0

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        vocab_size: int,
        seed: int | None,
        *,
        prompt: list[int] | None = None,
        stop_tokens: frozenset[int] = frozenset(),
        constraint: Constraint | None = None,
    ) -> RowSampler:
        generator = None
        if not params.greedy:
            # A per-row generator keeps a seeded request reproducible whatever else is batched.
            generator = torch.Generator(device="cpu")
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        counts = torch.zeros(vocab_size, dtype=torch.float32) if params.penalized else None
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool)
            seen[[t for t in prompt or [] if 0 <= t < vocab_size]] = True
        held = sorted(t for t in stop_tokens | set(params.stop_token_ids) if 0 <= t < vocab_size) if params.min_tokens else []
        return cls(params=params, generator=generator, counts=counts, seen=seen, constraint=constraint, held=held)

    def record(self, token: int) -> None:
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1.0
        if self.seen is not None:
            self.seen[token] = True
        if self.constraint is not None:
            self.constraint.accept(token)

    @property
    def holding(self) -> bool:
        """Stop tokens are masked this step (min_tokens not reached)."""
        return bool(self.held) and self.generated < self.params.min_tokens

    @property
    def fast(self) -> bool:
        """The row's token is the argmax of its (grammar-masked) logits: the batch's shared path."""
        return self.params.greedy and not self.params.penalized and not self.holding


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's definition: subtract frequency * count and presence * (count > 0)."""
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' and vLLM's definition: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    # A penalty near 0 (vLLM allows any in (0, 2]) divides to inf, which would make softmax NaN.
    penalized = penalized.clamp(max=torch.finfo(logits.dtype).max)
    return torch.where(seen.to(logits.device), penalized, logits)


def top_k_filter(probs: torch.Tensor, top_k: int) -> torch.Tensor:
    """Zero all but the `top_k` most likely tokens (0 or more than the vocabulary: no filter)."""
    if top_k <= 0 or top_k >= probs.shape[-1]:
        return probs
    threshold = torch.topk(probs, top_k).values[..., -1:]
    return torch.where(probs >= threshold, probs, torch.zeros_like(probs))


def min_p_filter(probs: torch.Tensor, min_p: float) -> torch.Tensor:
    """Zero tokens less likely than `min_p` times the most likely one (vLLM's min_p)."""
    if min_p <= 0.0:
        return probs
    return torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail outside the smallest set whose mass reaches top_p (the top token is kept)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    tail = mass_before >= top_p
    tail[..., 0] = False  # a top_p that rounds to 0 in the tensor's dtype (5e-324) must not empty the set
    sorted_probs[tail] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


def choose_token(logits: torch.Tensor, sampler: RowSampler) -> int:
    """Pick one token from a 1-D float32 logits row with the row's settings."""
    params = sampler.params
    if sampler.holding:
        held = logits.clone()
        held[sampler.held] = float("-inf")
        if torch.isfinite(held).any():  # a grammar that allows only its end outranks min_tokens
            logits = held
    if sampler.seen is not None:
        logits = apply_repetition_penalty(logits, sampler.seen, params.repetition_penalty)
    if sampler.counts is not None:
        logits = apply_penalties(logits, sampler.counts.to(logits.device), params)
    if params.greedy:
        return int(torch.argmax(logits).item())
    # Shifted so the largest logit is 0: scaling can then only underflow (to -inf), never overflow.
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    probs = top_k_filter(probs, params.top_k)
    probs = min_p_filter(probs, params.min_p)
    probs = top_p_filter(probs, params.top_p)
    device_probs = probs.cpu()  # generators are CPU generators; the row is small
    return int(torch.multinomial(device_probs, 1, generator=sampler.generator).item())


def logprob_choice(logits: torch.Tensor, token: int, k: int) -> Choice:
    logprobs = torch.log_softmax(logits, dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(logprobs, k)
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    return Choice(token=token, logprob=float(logprobs[token].item()), top=top)


def select_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[Choice]:
    """Choose one token per row of `logits` [rows, vocab]."""
    raw = logits.float()
    logits = raw
    constrained = [(row, s.constraint) for row, s in enumerate(samplers) if s.constraint is not None]
    if constrained:
        logits = raw.clone()  # logprobs stay those of the model's own distribution
        constrained[0][1].grammars.mask(logits, constrained)
    # Vectorised fast path: one argmax for every row; rows that need more get recomputed below.
    argmax = torch.argmax(logits, dim=-1).tolist()
    choices: list[Choice] = []
    for row, sampler in enumerate(samplers):
        params = sampler.params
        token = int(argmax[row]) if sampler.fast else choose_token(logits[row], sampler)
        sampler.record(token)
        if params.logprobs is None:
            choices.append(Choice(token=token))
        else:
            choices.append(logprob_choice(raw[row], token, params.logprobs))
    return choices
