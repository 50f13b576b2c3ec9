"""Per-row next-token selection: penalties, temperature, top-p, seeded sampling, logprobs.

Pure functions over logits (no model, no threads), so they are unit-tested directly. The engine
calls `select_tokens` once per decode step for the whole batch: rows that are plain greedy share
one vectorised argmax, the rest are handled one by one with their own settings and generator.
Logprobs are reported from the model's own distribution (log-softmax of the raw logits), before
penalties and temperature, as vLLM does by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .events import SamplingParams


@dataclass
class RowSampler:
    """One sequence's sampling state: settings, its own RNG, counts of generated tokens."""

    params: SamplingParams
    generator: torch.Generator | None = None
    counts: torch.Tensor | None = None  # [vocab] float32, only when penalties are on

    @classmethod
    def create(cls, params: SamplingParams, vocab_size: int, seed: int | None) -> RowSampler:
        generator = None
        if not params.greedy:
            # A per-row generator keeps a seeded request reproducible whatever else is batched.
            generator = torch.Generator(device="cpu")
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        counts = torch.zeros(vocab_size, dtype=torch.float32) if params.penalized else None
        return cls(params=params, generator=generator, counts=counts)

    def record(self, token: int) -> None:
        if self.counts is not None:
            self.counts[token] += 1.0


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's definition: subtract frequency * count and presence * (count > 0)."""
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


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
    if sampler.counts is not None:
        logits = apply_penalties(logits, sampler.counts.to(logits.device), params)
    if params.greedy:
        return int(torch.argmax(logits).item())
    # Shifted so the largest logit is 0: scaling can then only underflow (to -inf), never overflow.
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
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
    logits = logits.float()
    # Vectorised fast path: one argmax for every row; rows that need more get recomputed below.
    argmax = torch.argmax(logits, dim=-1).tolist()
    choices: list[Choice] = []
    for row, sampler in enumerate(samplers):
        params = sampler.params
        plain_greedy = params.greedy and not params.penalized
        token = int(argmax[row]) if plain_greedy else choose_token(logits[row], sampler)
        sampler.record(token)
        if params.logprobs is None:
            choices.append(Choice(token=token))
        else:
            choices.append(logprob_choice(logits[row], token, params.logprobs))
    return choices
