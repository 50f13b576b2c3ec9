"""Server-sent events of one streamed request, rendered from the protocol models.

A streamed request sends one chunk per generated token, so rendering that chunk is the hottest
code on the event loop, and the loop shares the GIL with the engine thread: every microsecond spent
here is taken from decoding. A plain text delta (no logprobs) is therefore rendered once per choice
index through the protocol model with a marker in place of the text, split around the marker, and
from then on only the text is JSON-encoded and put between the two halves. Everything else (role,
finish, usage, logprobs, errors) goes through the models every time. `tests/server/test_chunks.py`
checks that both ways give the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

from .events import Delta, Done, Finished, TokenInfo
from .protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    DeltaFunction,
    DeltaToolCall,
    FinishReason,
    PromptTokensDetails,
    TokenLogprob,
    TopLogprob,
    Usage,
)

_MARKER = "\x00"  # stands for the text while a template is rendered; found by its JSON escape
_MARKER_JSON = json.dumps(_MARKER)


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, separators=(',', ':'))}\n\n"


class StreamChunks:
    """Renders the SSE events of one streamed chat or text completion."""

    def __init__(self, *, rid: str, created: int, model: str, chat: bool, logprobs: bool) -> None:
        self._rid = rid
        self._created = created
        self._model = model
        self.chat = chat
        self._logprobs = logprobs
        self._offsets: dict[int, int] = {}  # text offset per choice, for completion logprobs
        self._templates: dict[int, tuple[str, str]] = {}

    def role(self, index: int) -> str:
        return sse(self._chat_chunk(ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))))

    def delta(self, event: Delta) -> str:
        if self._logprobs:
            return sse(self.delta_payload(event))
        template = self._templates.get(event.index)
        if template is None:
            template = self._templates[event.index] = self._template(event.index)
        head, tail = template
        return head + json.dumps(event.text) + tail

    def delta_payload(self, event: Delta) -> dict[str, Any]:
        """The model-rendered chunk of a delta: the reference the template path must match."""
        if self.chat:
            logprobs = chat_logprobs(event.logprobs) if self._logprobs else None
            return self._chat_chunk(ChatChunkChoice(index=event.index, delta=ChatDelta(content=event.text), logprobs=logprobs))
        offset = self._offsets.get(event.index, 0)
        logprobs_of_text = completion_logprobs(event.logprobs, offset) if self._logprobs else None
        self._offsets[event.index] = offset + sum(len(info.token) for info in event.logprobs)
        choice = CompletionChoice(index=event.index, text=event.text, finish_reason=None, logprobs=logprobs_of_text)
        return self._completion(choice)

    def tool_calls(self, index: int, calls: list[tuple[str, str, str]]) -> str:
        """One chunk carrying whole calls (id, name, arguments): clients accumulate deltas, a whole one is a valid delta."""
        deltas = [
            DeltaToolCall(index=i, id=call_id, type="function", function=DeltaFunction(name=name, arguments=arguments))
            for i, (call_id, name, arguments) in enumerate(calls)
        ]
        return sse(self._chat_chunk(ChatChunkChoice(index=index, delta=ChatDelta(tool_calls=deltas))))

    def finished(self, event: Finished, reason: FinishReason | None = None) -> str:
        reason = reason or event.reason
        if self.chat:
            return sse(self._chat_chunk(ChatChunkChoice(index=event.index, delta=ChatDelta(), finish_reason=reason)))
        return sse(self._completion(CompletionChoice(index=event.index, text="", finish_reason=reason)))

    def usage(self, event: Done) -> str:
        last: ChatCompletionChunk | Completion
        if self.chat:
            last = ChatCompletionChunk(id=self._rid, created=self._created, model=self._model, choices=[], usage=usage_of(event))
        else:
            last = Completion(id=self._rid, created=self._created, model=self._model, choices=[], usage=usage_of(event))
        return sse(last.model_dump(mode="json"))

    def _template(self, index: int) -> tuple[str, str]:
        rendered = sse(self.delta_payload(Delta(index, _MARKER, [])))
        # rpartition: only null fields follow the text, so the last marker is the text's even if
        # the model name happens to contain one.
        head, marker, tail = rendered.rpartition(_MARKER_JSON)
        assert marker, "the chunk template lost its text"
        return head, tail

    def _chat_chunk(self, choice: ChatChunkChoice) -> dict[str, Any]:
        data = ChatCompletionChunk(id=self._rid, created=self._created, model=self._model, choices=[choice]).model_dump(mode="json")
        # OpenAI omits unset delta fields rather than sending nulls.
        data["choices"][0]["delta"] = {k: v for k, v in data["choices"][0]["delta"].items() if v is not None}
        return data

    def _completion(self, choice: CompletionChoice) -> dict[str, Any]:
        return Completion(id=self._rid, created=self._created, model=self._model, choices=[choice]).model_dump(mode="json")


def usage_of(event: Done) -> Usage:
    return Usage(
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        total_tokens=event.prompt_tokens + event.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=event.cached_tokens),
    )


def chat_logprobs(infos: list[TokenInfo]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            TokenLogprob(
                token=info.token,
                logprob=info.logprob,
                bytes=list(info.token.encode()),
                top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in info.top],
            )
            for info in infos
        ]
    )


def completion_logprobs(infos: list[TokenInfo], start: int) -> CompletionLogprobs:
    result = CompletionLogprobs()
    offset = start
    for info in infos:
        result.tokens.append(info.token)
        result.token_logprobs.append(info.logprob)
        result.top_logprobs.append({t: lp for t, lp in info.top})
        result.text_offset.append(offset)
        offset += len(info.token)
    return result
