"""The batched sampler: reproducible seeds whatever the batch, the filters' distributions, one host copy a step."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoTokenizer

from llmservice_server.constraints import Grammars
from llmservice_server.events import Grammar, SamplingParams
from llmservice_server.sampling import RowSampler, select_tokens

VOCAB = 64


def draws(logits: torch.Tensor, make: Callable[[], RowSampler], mates: list[RowSampler], at: int, steps: int = 30) -> list[int]:
    """The tokens one row draws over `steps` steps, batched at position `at` among `mates`."""
    row = make()
    rows = [*mates[:at], row, *mates[at:]]
    tokens = []
    for step in range(steps):
        step_logits = logits.roll(step, dims=-1).expand(len(rows), -1).contiguous()
        tokens.append(select_tokens(step_logits, rows)[at].token)
    return tokens


def test_a_seeded_row_draws_the_same_whatever_it_is_batched_with() -> None:
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=5)

    def make() -> RowSampler:
        return RowSampler.create(params, VOCAB, 5)

    alone = draws(logits, make, [], 0)
    mates = [
        RowSampler.create(SamplingParams(temperature=0.0), VOCAB, None),
        RowSampler.create(SamplingParams(temperature=1.5, min_p=0.1), VOCAB, None),
        RowSampler.create(SamplingParams(temperature=1.0, frequency_penalty=1.0, logprobs=3), VOCAB, 99),
        RowSampler.create(SamplingParams(temperature=0.7, repetition_penalty=1.3), VOCAB, None, prompt=[1, 2, 3]),
    ]
    assert draws(logits, make, mates, 2) == alone
    assert draws(logits, make, mates[1:], 3) == alone
    assert len(set(alone)) > 3  # it did sample: a constant row would pass the comparisons trivially
    other = draws(logits, lambda: RowSampler.create(params, VOCAB, 6), [], 0)
    assert other != alone


def test_greedy_rows_are_the_argmax_among_sampled_mates() -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1))
    greedy = SamplingParams(temperature=0.0)
    samplers = [RowSampler.create(greedy if i % 2 == 0 else SamplingParams(temperature=2.0), VOCAB, i) for i in range(6)]
    chosen = [c.token for c in select_tokens(logits, samplers)]
    assert chosen[0::2] == logits[0::2].argmax(dim=-1).tolist()


def frequencies(logits: list[float], params: SamplingParams, n: int = 4000) -> dict[int, float]:
    """How often each token is drawn by n rows with their own seeds, all in one batch."""
    samplers = [RowSampler.create(params, len(logits), seed) for seed in range(n)]
    tokens = [c.token for c in select_tokens(torch.tensor([logits]).expand(n, -1), samplers)]
    return {token: count / n for token, count in Counter(tokens).items()}


PROBS = [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]
LOGITS = [float(torch.log(torch.tensor(p))) for p in PROBS]


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(temperature=1.0), [0, 1, 2, 3, 4, 5]),
        (SamplingParams(temperature=1.0, top_k=3), [0, 1, 2]),
        (SamplingParams(temperature=1.0, top_p=0.7), [0, 1, 2]),  # 0.4 + 0.25 < 0.7: the third token reaches it
        (SamplingParams(temperature=1.0, min_p=0.3), [0, 1, 2]),  # at least 0.3 * 0.4 = 0.12
        (SamplingParams(temperature=1.0, top_k=4, top_p=0.5), [0, 1]),  # of the kept 0.9, 0.4 < 0.45 <= 0.65
    ],
)
def test_filters_keep_their_tokens_in_proportion(params: SamplingParams, kept: list[int]) -> None:
    seen = frequencies(LOGITS, params)
    assert set(seen) == set(kept)
    mass = sum(PROBS[t] for t in kept)
    for token in kept:  # 4000 draws: a standard error of at most 0.008
        assert seen[token] == pytest.approx(PROBS[token] / mass, abs=0.035)


def test_temperature_sharpens_and_flattens() -> None:
    cold = frequencies(LOGITS, SamplingParams(temperature=0.25))
    hot = frequencies(LOGITS, SamplingParams(temperature=4.0))
    assert cold[0] > 0.75 > PROBS[0] + 0.3
    assert hot[0] < 0.3 and min(hot.values()) > 0.1


HOST_COPIES = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "numpy"}


class HostCopies(TorchFunctionMode):
    """Records every tensor-to-Python conversion and every move off an accelerator to the CPU: each is a
    device-to-host copy that waits for the device. (On a CPU run the moves are no-ops and not counted.)"""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        off_device = isinstance(args[0], torch.Tensor) and args[0].device.type != "cpu" if args else False
        target = [*args[1:], *(kwargs or {}).values()]
        to_host = off_device and (name == "cpu" or (name == "to" and any(str(a) == "cpu" for a in target)))
        if name in HOST_COPIES or to_host:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_a_step_copies_to_the_host_once(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = len(tokenizer)
    grammars = Grammars(tokenizer, vocab, [tokenizer.eos_token_id])
    grammar = Grammar(schema=None)
    samplers = [
        RowSampler.create(SamplingParams(temperature=0.0), vocab, None),
        RowSampler.create(SamplingParams(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=1), vocab, 1),
        RowSampler.create(SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.5, logprobs=2), vocab, None),
        RowSampler.create(
            SamplingParams(temperature=0.0, repetition_penalty=1.2, min_tokens=3), vocab, None, prompt=[4, 5], stop_tokens=frozenset({0})
        ),
        RowSampler.create(SamplingParams(temperature=1.0, grammar=grammar), vocab, 2, constraint=grammars.constraint(grammar)),
    ]
    logits = torch.randn(len(samplers), vocab, generator=torch.Generator().manual_seed(3))
    for _ in range(3):
        with HostCopies() as copies:
            choices = select_tokens(logits, samplers)
        assert copies.calls == ["tolist"]
        assert choices[2].logprob is not None and len(choices[2].top) == 2
