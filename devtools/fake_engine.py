"""A scripted stand-in for the server's engine: the `Backend` protocol without a model or torch.

The in-process server tests build the real FastAPI app (`create_app`) around a `FakeEngine`, so
routes, validation, admission, OpenAI-shaped errors and SSE framing run exactly as deployed while
the engine's answers are fixed by the test. A script maps each submitted request to the event
batches the engine sends back; a script that ends without `Done` or `Failed` leaves the request
running until it is cancelled, which the fake records.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from llmservice_server.events import Delta, Done, Event, Failed, Finished, GenerationRequest, Sink
from llmservice_server.startup import StageClock

Script = Callable[[GenerationRequest], Iterable[list[Event]]]


def reply(*pieces: str) -> Script:
    """Every row of the request answers `pieces` (one Delta each) and stops; then usage."""

    def script(request: GenerationRequest) -> Iterable[list[Event]]:
        for piece in pieces:
            yield [Delta(row, piece, []) for row in range(request.rows)]
        yield [Finished(row, "stop", len(pieces)) for row in range(request.rows)]
        prompt_tokens = sum(len(prompt) for prompt in request.prompts)
        yield [Done(prompt_tokens, len(pieces) * request.rows)]

    return script


def fail_after(piece: str, failure: Failed) -> Script:
    """One Delta on row 0, then the request fails."""

    def script(request: GenerationRequest) -> Iterable[list[Event]]:
        yield [Delta(0, piece, [])]
        yield [failure]

    return script


def hold(*pieces: str) -> Script:
    """Send `pieces` and keep the request running: only a cancel ends it."""

    def script(request: GenerationRequest) -> Iterable[list[Event]]:
        for piece in pieces:
            yield [Delta(0, piece, [])]

    return script


@dataclass(frozen=True)
class Loaded:
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int


@dataclass
class Ticket:
    request: GenerationRequest
    open: bool = True  # no Done or Failed sent, not cancelled
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.open = False
        self.cancelled.set()


class FakeEngine:
    """A `Backend` that is ready at once and answers each request from `script` (default `reply("Hello", " world")`)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int = 256, script: Script | None = None) -> None:
        self.stage = "ready"
        self.error: str | None = None
        self.load_seconds: float | None = 0.0
        self.stages = StageClock()
        self.script = script or reply("Hello", " world")
        self.tickets: list[Ticket] = []  # every submitted request, in order
        self.aborted: list[str] = []  # abort_all messages
        self._loaded = Loaded(tokenizer, max_model_len)
        self._ended = threading.Event()
        self._submitted = asyncio.Event()  # set on each submit (which runs on the serving loop)

    @property
    def ready(self) -> bool:
        return self.stage == "ready"

    @property
    def loaded(self) -> Loaded:
        return self._loaded

    def alive(self) -> bool:
        return self.stage not in ("failed", "stopped")

    def start(self) -> None:
        pass  # nothing to load

    def wait_settled(self, timeout: float | None = None) -> bool:
        return True

    def wait_ended(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def submit(self, request: GenerationRequest, sink: Sink) -> Ticket:
        # The script runs here, on the caller's thread; the sink hands the batches to the event loop
        # (`Handoff`), as the engine thread's would, so none is handled before `submit` returns.
        ticket = Ticket(request)
        self.tickets.append(ticket)
        self._submitted.set()
        for batch in self.script(request):
            sink(batch)
            if any(isinstance(event, Done | Failed) for event in batch):
                ticket.open = False
        return ticket

    async def submitted(self, count: int = 1, within: float = 5.0) -> Ticket:
        """Wait until `count` requests reached the engine (at most `within` seconds); the `count`th one's ticket."""
        async with asyncio.timeout(within):
            while len(self.tickets) < count:
                self._submitted.clear()
                await self._submitted.wait()
        return self.tickets[count - 1]

    def abort_all(self, message: str) -> None:
        self.aborted.append(message)

    def stop(self, timeout: float = 10.0) -> None:
        self.stage = "stopped"
        self._ended.set()
