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
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: chosen token plus k alternatives
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


FinishReason = Literal["stop", "length"]
FailureKind = Literal["timeout", "shutdown", "internal"]


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
