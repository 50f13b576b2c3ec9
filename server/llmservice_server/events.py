"""What crosses between the HTTP side and the engine: requests in, events out. No torch.

The server process (FastAPI, admission, streaming) imports this module and never the engine, so
with the engine in its own process (`engine_process`) the HTTP process does not load torch at
all: a few hundred MiB less per pod.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# Below this temperature sampling is greedy (vLLM's threshold): dividing logits by a subnormal
# temperature overflows to inf, and softmax of inf is NaN, which `multinomial` refuses.
GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Grammar:
    """What a row's output must match (the engine compiles it, `constraints.py`): JSON text that
    fits `schema` (any JSON value for `json_object`), between a fixed `prefix` and `suffix` (a tool
    call's markers)."""

    schema: str | None  # a JSON schema as JSON text; None: any JSON object
    prefix: str = ""
    suffix: str = ""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    seed: int | None = None
    # vLLM's extras, with vLLM's meanings (docs/api.md)
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens, as transformers and vLLM apply it
    min_tokens: int = 0  # EOS, stop_token_ids and stop strings are held back until this many were generated
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    grammar: Grammar | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def plain_greedy(self) -> bool:
        """The row's token is the argmax of its raw logits (the batch's shared fast path)."""
        return self.greedy and not self.penalized and self.min_tokens == 0 and self.grammar is None


FinishReason = Literal["stop", "length"]
FailureKind = Literal["timeout", "shutdown", "internal", "invalid"]  # invalid: the request's own fault (400)


@dataclass(frozen=True)
class GenerationRequest:
    prompts: list[list[int]]  # one or more tokenized prompts; rows = prompts x n
    max_tokens: list[int]  # per prompt, already checked against the context length
    params: SamplingParams
    n: int = 1
    stop: list[str] = field(default_factory=list)
    timeout: float = 600.0
    request_id: str = ""

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class TokenInfo:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(frozen=True)
class Delta:
    index: int
    text: str
    logprobs: list[TokenInfo]


@dataclass(frozen=True)
class Finished:
    index: int
    reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class Done:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those read from the prefix cache


@dataclass(frozen=True)
class Failed:
    kind: FailureKind
    message: str


Event = Delta | Finished | Done | Failed
Sink = Callable[[list[Event]], None]
