"""What the HTTP side needs of an engine, whether it runs on a thread here or in a child process.

`Engine` (a thread in this process) and `EngineProcess` (the same engine in a child process) both
satisfy `Backend`; serving, routes and the drain only ever see this protocol.
"""

from __future__ import annotations

from typing import Protocol

from transformers import PreTrainedTokenizerBase

from .events import GenerationRequest, Sink
from .startup import StageClock


class ModelFacts(Protocol):
    """What request validation reads from the loaded model."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def max_model_len(self) -> int: ...


class StepClock(Protocol):
    """When the engine's running step began (`time.monotonic()`), 0.0 between steps."""

    value: float


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Backend(Protocol):
    stage: str  # starting, delayed, fetching, loading, loading_model, warming, ready, failed, stopped
    error: str | None
    load_seconds: float | None
    stages: StageClock  # seconds per start-up phase (fetch, load, warmup)

    @property
    def ready(self) -> bool: ...

    @property
    def loaded(self) -> ModelFacts: ...

    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def wait_settled(self, timeout: float | None = None) -> bool: ...

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Block until the engine has failed for good (`stage` "failed") or was stopped; never on the event loop."""
        ...

    def submit(self, request: GenerationRequest, sink: Sink) -> Cancellable: ...

    def abort_all(self, message: str) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...
