"""Next-token selection for the whole batch, as tensor ops on the logits' device.

Functions over logits (no model, no threads), so they are unit-tested directly. The engine calls
`select_tokens` once per step with every row that samples. The order is vLLM's: the grammar mask
and `min_tokens`' held-back stop tokens, then repetition/frequency/presence penalties, temperature,
then top-k, min-p, top-p. Greedy rows take the exact argmax of those logits, so batched greedy
equals sequential greedy. A sampled row inverts its CDF at one uniform number drawn from its own
generator on the logits' device, so a seeded request's text depends on its seed and position
only, not on what else is batched (the same seed on another kind of device draws other numbers).

Nothing here waits on the device: the chosen ids (and, when a row asks, the logprobs, from the
model's own distribution before masks, penalties and temperature, as vLLM reports them, packed
with the ids into one float64 tensor, exact for token ids) are copied to the host once per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .constraints import Constraint
from .events import SamplingParams


@dataclass
class RowSampler:
    """One sequence's sampling state: settings, its own generator, what it has generated."""

    params: SamplingParams
    seed: int | None = None
    generator: torch.Generator | None = None  # made on the logits' device at the row's first draw
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
        counts = torch.zeros(vocab_size, dtype=torch.float32) if params.presence_penalty or params.frequency_penalty else None
        seen = None
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(vocab_size, dtype=torch.bool)
            seen[[t for t in prompt or [] if 0 <= t < vocab_size]] = True
        held = sorted(t for t in stop_tokens | set(params.stop_token_ids) if 0 <= t < vocab_size) if params.min_tokens else []
        return cls(params=params, seed=seed, counts=counts, seen=seen, constraint=constraint, held=held)

    def generator_on(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            if self.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.seed)
        return self.generator

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


@dataclass(frozen=True)
class Choice:
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


Param = float | torch.Tensor  # one value, or a [rows, 1] column of per-row values


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """OpenAI's definition: subtract frequency * count and presence * (count > 0)."""
    return penalize(logits, counts, params.frequency_penalty, params.presence_penalty)


def penalize(logits: torch.Tensor, counts: torch.Tensor, frequency: Param, presence: Param) -> torch.Tensor:
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: Param) -> torch.Tensor:
    """transformers' and vLLM's definition: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    # A penalty near 0 (vLLM allows any in (0, 2]) divides to inf, which would make softmax NaN.
    penalized = penalized.clamp(max=torch.finfo(logits.dtype).max)
    return torch.where(seen.to(logits.device), penalized, logits)


def top_k_filter(probs: torch.Tensor, top_k: int | list[int]) -> torch.Tensor:
    """Zero all but each row's `top_k` most likely tokens (0 or more than the vocabulary: no filter)."""
    vocab = probs.shape[-1]
    ks = [top_k] if isinstance(top_k, int) else top_k
    filtering = [k for k in ks if 0 < k < vocab]
    if not filtering:
        return probs
    largest = max(filtering)
    values = torch.topk(probs, largest, dim=-1).values
    index = torch.tensor([min(k, largest) - 1 if 0 < k < vocab else 0 for k in ks], dtype=torch.long, device=probs.device)
    threshold = values.gather(-1, index.view(-1, 1) if probs.dim() > 1 else index)
    off = torch.tensor([not 0 < k < vocab for k in ks], device=probs.device)
    threshold = threshold.masked_fill(off.view_as(threshold), 0.0)
    return probs.masked_fill(probs < threshold, 0.0)


def min_p_filter(probs: torch.Tensor, min_p: Param) -> torch.Tensor:
    """Zero tokens less likely than `min_p` times the row's most likely one (vLLM's min_p; 0: off)."""
    if isinstance(min_p, float) and min_p <= 0.0:
        return probs
    return probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)


def top_p_filter(probs: torch.Tensor, top_p: Param) -> torch.Tensor:
    """Zero the tail outside the smallest set whose share of the row's mass reaches top_p (the top token is kept)."""
    if isinstance(top_p, float) and top_p >= 1.0:
        return probs
    sorted_probs, order = torch.sort(probs, descending=True, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    # Share of what earlier filters kept, as vLLM renormalises; 1.0 (off) never cuts a rounding tail.
    reach = torch.where(torch.as_tensor(top_p, device=probs.device) >= 1.0, torch.inf, top_p * sorted_probs.sum(-1, keepdim=True))
    tail = mass_before >= reach
    tail[..., 0] = False  # a top_p that rounds to 0 in the tensor's dtype (5e-324) must not empty the set
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(tail, 0.0))


def pick(logits: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """The step's choices on the logits' device, in one tensor for one copy.

    Without logprobs, `[rows]` int64 ids. With them, `[rows, 2 + 2k]` float64: the chosen id, its
    logprob, then (id, logprob) pairs of the k most likely tokens, k the most any row asked for.
    """
    raw = logits.float()
    work = _shaped(raw, samplers)
    sampled = [i for i, s in enumerate(samplers) if not s.params.greedy]
    if len(sampled) == len(samplers):
        chosen = _draw(work, samplers)
    else:
        chosen = work.argmax(dim=-1)
        if sampled:
            index = torch.tensor(sampled, dtype=torch.long, device=work.device)
            chosen = chosen.index_copy(0, index, _draw(work[index], [samplers[i] for i in sampled]))
    asked = [s.params.logprobs for s in samplers if s.params.logprobs is not None]
    if not asked:
        return chosen
    logprobs = torch.log_softmax(raw, dim=-1)
    columns = [chosen.to(torch.float64)[:, None], logprobs.gather(-1, chosen[:, None]).to(torch.float64)]
    k = min(max(asked), raw.shape[-1])
    if k > 0:
        values, ids = torch.topk(logprobs, k, dim=-1)
        columns.append(torch.stack([ids.to(torch.float64), values.to(torch.float64)], dim=-1).flatten(1))
    return torch.cat(columns, dim=1)


def select_tokens(logits: torch.Tensor, samplers: list[RowSampler]) -> list[Choice]:
    """Choose one token per row of `logits` [rows, vocab]; the step's one device-to-host copy."""
    picked = pick(logits, samplers)
    host: list[Any] = picked.tolist()
    if picked.dim() == 1:
        choices = [Choice(token=token) for token in host]
    else:
        choices = []
        for sampler, values in zip(samplers, host, strict=True):
            k = sampler.params.logprobs
            pairs = values[2 : 2 + 2 * k] if k is not None else []
            top = [(int(pairs[j]), pairs[j + 1]) for j in range(0, len(pairs), 2)]
            choices.append(Choice(token=int(values[0]), logprob=values[1] if k is not None else None, top=top))
    for sampler, choice in zip(samplers, choices, strict=True):
        sampler.record(choice.token)
    return choices


def _draw(scores: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """Sampled rows' tokens: temperature, top-k, min-p, top-p, then one draw each.

    The draw inverts the row's CDF at one uniform from the row's own generator: one number a token,
    so a seeded row's tokens depend on its seed and position only, never on its batch mates. With
    top-p the CDF is the sorted one the filter builds anyway, and the draw maps back through the sort.
    """
    device = scores.device
    params = [s.params for s in samplers]
    temperatures = {p.temperature for p in params}
    temperature = temperatures.pop() if len(temperatures) == 1 else _column([p.temperature for p in params], device)
    # Shifted so the largest logit is 0: scaling can then only underflow (to -inf), never overflow.
    probs = torch.softmax((scores - scores.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    probs = top_k_filter(probs, [p.top_k for p in params])
    if any(p.min_p > 0.0 for p in params):
        probs = min_p_filter(probs, _column([p.min_p for p in params], device))
    if len(samplers) == 1:
        uniform = torch.rand((1, 1), dtype=torch.float64, device=device, generator=samplers[0].generator_on(device))
    else:
        uniform = torch.empty((len(samplers), 1), dtype=torch.float64, device=device)
        for j, sampler in enumerate(samplers):
            uniform[j].uniform_(generator=sampler.generator_on(device))
    if not any(p.top_p < 1.0 for p in params):
        cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
        # right=True: the first token whose CDF passes the draw, so a zero-probability token (a flat step) never is.
        drawn = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
        # A draw that rounds up to the total mass lands past the vocabulary: the likeliest token then.
        return torch.where(drawn < probs.shape[-1], drawn, probs.argmax(dim=-1, keepdim=True)).squeeze(1)
    # top-p: the kept tokens are a prefix of the sorted row (the mass before each below top_p's share),
    # so the draw inverts the sorted CDF over that prefix and maps back through the sort.
    ordered, order = torch.sort(probs, descending=True, dim=-1)
    cdf = torch.cumsum(ordered, dim=-1, dtype=torch.float64)
    share = torch.tensor([p.top_p if p.top_p < 1.0 else float("inf") for p in params], dtype=torch.float64, device=device)
    reached = (cdf - ordered) >= share[:, None] * cdf[:, -1:]
    kept = (~reached & (ordered > 0)).sum(dim=-1, keepdim=True).clamp_(min=1)  # the top token always
    last = kept - 1
    drawn = torch.searchsorted(cdf, uniform * cdf.gather(-1, last), right=True)
    return order.gather(-1, torch.minimum(drawn, last)).squeeze(1)  # a draw rounding up to the kept mass: its last token


def _shaped(raw: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """The logits every row chooses from: grammar masks, held stop tokens, penalties (a copy when any applies)."""
    device = raw.device
    work = raw
    constrained = [(row, s.constraint) for row, s in enumerate(samplers) if s.constraint is not None]
    if constrained:
        work = raw.clone()  # logprobs stay those of the model's own distribution
        constrained[0][1].grammars.mask(work, constrained)
    holding = [(row, s.held) for row, s in enumerate(samplers) if s.holding]
    if holding:
        at = [(row, t) for row, held in holding for t in held]
        where = torch.tensor(at, dtype=torch.long, device=device).T
        held_out = work.index_put((where[0], where[1]), torch.tensor(float("-inf"), device=device))
        # A grammar that allows only its end outranks min_tokens: such a row keeps its stop tokens.
        work = torch.where(torch.isfinite(held_out).any(dim=-1, keepdim=True), held_out, work)
    repeating = [row for row, s in enumerate(samplers) if s.seen is not None]
    if repeating:
        index = torch.tensor(repeating, dtype=torch.long, device=device)
        seen = torch.stack([_on(samplers[row], "seen", device) for row in repeating])
        penalty = _column([samplers[row].params.repetition_penalty for row in repeating], device)
        work = work.index_copy(0, index, apply_repetition_penalty(work[index], seen, penalty))
    counted = [row for row, s in enumerate(samplers) if s.counts is not None]
    if counted:
        index = torch.tensor(counted, dtype=torch.long, device=device)
        counts = torch.stack([_on(samplers[row], "counts", device) for row in counted])
        frequency = _column([samplers[row].params.frequency_penalty for row in counted], device)
        presence = _column([samplers[row].params.presence_penalty for row in counted], device)
        work = work.index_copy(0, index, penalize(work[index], counts, frequency, presence))
    return work


def _on(sampler: RowSampler, name: str, device: torch.device) -> torch.Tensor:
    """A row's penalty state, moved to the logits' device once and updated there."""
    state: torch.Tensor = getattr(sampler, name)
    if state.device != device:
        state = state.to(device)
        setattr(sampler, name, state)
    return state


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]
