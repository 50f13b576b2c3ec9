"""OpenAI requests in, engine events out: validation, admission, streaming and responses.

The routes hand a parsed request here. Checks that need the model (chat template, token counts,
context length) run after the cheap ones (model name, unsupported fields, n, sizes against the
context: `prompt_bounds`); a slot is taken from admission before the prompt is tokenised (in a
worker thread), so a flood of large prompts waits for - or is refused by - admission, not in RAM.
Engine events arrive on an `asyncio.Queue` per request (through the `Handoff`: one `loop.call_soon_threadsafe` per burst); a client that
disconnects puts a marker on the same queue, which cancels the request and frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic_core import to_json
from starlette.types import Receive, Scope, Send

from .admission import Admission, Admitted, Rejected
from .backend import Backend, Cancellable
from .chunks import StreamChunks, chat_logprobs, completion_logprobs, sse, usage_of
from .errors import APIError, bad_request
from .events import Delta, Done, Event, Failed, Finished, GenerationRequest, Grammar, SamplingParams, TokenInfo
from .handoff import Handoff
from .metrics import Metrics
from .prompt_bounds import PromptBounds, Refusal, first_refusal, longest_entry, tokenize_bounded, too_many_tokens
from .protocol import (
    AssistantMessage,
    AssistantTurn,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Detokenized,
    DetokenizeRequest,
    ErrorResponse,
    FinishReason,
    FunctionCall,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    ResponseToolCall,
    TokenizeChat,
    TokenizeCompletion,
    Tokenized,
    ToolMessage,
    Usage,
)
from .settings import Settings
from .toolcalls import Parsed, ToolFormat, ToolStream, call_grammar, detect_format, keeps_special_tokens, parse

log = logging.getLogger(__name__)

_FAILURE_STATUS = {"timeout": 408, "shutdown": 503, "internal": 500, "invalid": 400}
# apply_chat_template's own parameters: chat_template_kwargs may not set them behind the request's back.
_TEMPLATE_PARAMETERS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
_DISCONNECTED = object()  # put on a request's queue when its client goes away


@dataclass
class Lease:
    """A request's hold on the server: its admission slot and its engine ticket. Closed once."""

    admission: Admission
    admitted: Admitted
    on_release: Callable[[], None]
    ticket: Cancellable | None = None
    finished: bool = False
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ticket is not None and not self.finished:
            self.ticket.cancel()  # client gone or stream aborted: free the batch rows now
        self.admission.release(self.admitted)
        self.on_release()


class LeasedStream(StreamingResponse):
    """A streaming response that always closes its lease, even if the body never starts."""

    def __init__(self, content: AsyncIterator[str], lease: Lease, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._lease = lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._lease.close()


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools: the format the model writes calls in, and whether decoding forces one."""

    fmt: ToolFormat
    forced: bool
    parallel: bool = True  # parallel_tool_calls: false keeps only the first call of an answer


@dataclass
class Prepared:
    prompts: list[list[int]]
    max_tokens: list[int]
    params: SamplingParams
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: bool
    tools: ToolUse | None = None
    echo: list[str] | None = None  # completions' echo: each prompt's text, put before its choices' text


@dataclass
class Collected:
    """Non-streaming accumulation of one choice."""

    text: list[str] = field(default_factory=list)
    logprobs: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None


class Serving:
    def __init__(self, settings: Settings, engine: Backend, admission: Admission, metrics: Metrics, model_name: str) -> None:
        self.settings = settings
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self.model_name = model_name
        self.idle = asyncio.Event()
        self.idle.set()
        self._handoff: Handoff[object] | None = None  # made on the serving loop, at the first request
        self._bounds: PromptBounds | None = None  # read from the model at the first request

    # --- entry points ---

    async def chat(self, body: ChatCompletionRequest, http: Request) -> Response:
        self._check_common(body.model, body.unsupported_field(), body.n)
        self._check_ready()
        bounds = await self._prompt_bounds()
        self._refuse(_chat_refusal(bounds, body))
        tools = self._tool_use(body)
        admitted = self._admit(body.n)
        try:
            prompt = await asyncio.to_thread(self.render_chat, body, bounds.context)
            prepared = self._prepare([prompt], body.token_limit(), body, "messages", body.logprobs, body.top_logprobs or 0)
            prepared.tools = tools
            prepared.params = _with_chat_constraints(prepared.params, body, tools)
        except BaseException:
            self._release(admitted)
            raise
        return await self._run(prepared, http, admitted, chat=True)

    async def completion(self, body: CompletionRequest, http: Request) -> Response:
        self._check_common(body.model, body.unsupported_field(), body.n)
        self._check_ready()
        bounds = await self._prompt_bounds()
        self._refuse(_completion_refusal(bounds, body))
        admitted = self._admit(_prompt_count(body) * body.n)
        try:
            prompts = await asyncio.to_thread(self._tokenize_prompts, body, bounds.context)
            top = body.logprobs or 0
            prepared = self._prepare(prompts, body.token_limit(), body, "prompt", body.logprobs is not None, top)
            if body.echo:
                tokenizer, skip = self.engine.loaded.tokenizer, body.skip_special_tokens
                prepared.echo = await asyncio.to_thread(lambda: [str(tokenizer.decode(p, skip_special_tokens=skip)) for p in prompts])
        except BaseException:
            self._release(admitted)
            raise
        return await self._run(prepared, http, admitted, chat=False)

    async def tokenize(self, body: TokenizeCompletion | TokenizeChat) -> Tokenized:
        """vLLM's /tokenize: a prompt's ids, or a message list's through the chat template."""
        self._check_model(body.model)
        self._check_ready()
        if isinstance(body, TokenizeChat):
            ids = await asyncio.to_thread(self.render_chat, body)
        else:
            tokenizer = self.engine.loaded.tokenizer
            ids = await asyncio.to_thread(lambda: list(tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids))
        return Tokenized(count=len(ids), max_model_len=self.engine.loaded.max_model_len, tokens=ids)

    async def detokenize(self, body: DetokenizeRequest) -> Detokenized:
        self._check_model(body.model)
        self._check_ready()
        self._check_ids([body.tokens], "tokens")
        tokenizer = self.engine.loaded.tokenizer
        return Detokenized(prompt=str(await asyncio.to_thread(tokenizer.decode, body.tokens)))

    # --- validation ---

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _check_common(self, model: str, unsupported: str | None, n: int) -> None:
        self._check_model(model)
        if unsupported is not None:
            raise bad_request(f"{unsupported} is not supported by this server", unsupported, "unsupported_parameter")
        if n > self.settings.max_num_seqs:
            raise bad_request(f"n must be at most {self.settings.max_num_seqs} (max-num-seqs)", "n")

    def _check_ready(self) -> None:
        if self.admission.draining or not self.engine.ready:
            self._reject(self.admission.try_acquire(0, ready=self.engine.ready))

    async def _prompt_bounds(self) -> PromptBounds:
        if self._bounds is None:
            self._bounds = await asyncio.to_thread(self._read_bounds)  # walks the vocabulary once
        return self._bounds

    def _read_bounds(self) -> PromptBounds:
        loaded = self.engine.loaded
        tokenizer = loaded.tokenizer
        return PromptBounds(loaded.max_model_len, longest_entry(tokenizer.get_vocab()), len(tokenizer))

    def _refuse(self, refusal: Refusal | None) -> None:
        if refusal is not None:
            raise _refused(refusal)

    def _admit(self, rows: int) -> Admitted:
        if rows > self.settings.max_num_seqs:
            raise bad_request(f"prompts x n must be at most {self.settings.max_num_seqs} (max-num-seqs)", "n")
        admitted = self._reject(self.admission.try_acquire(rows, ready=self.engine.ready))
        self.idle.clear()
        return admitted

    def _release(self, admitted: Admitted) -> None:
        """Give back a slot taken for a request that failed before it reached the engine."""
        self.admission.release(admitted)
        self._released()

    def _reject(self, decision: Admitted | Rejected) -> Admitted:
        if isinstance(decision, Admitted):
            return decision
        self.metrics.rejected(decision.reason)
        headers = {"Retry-After": str(decision.retry_after)}
        raise APIError(decision.status, decision.message, code=decision.reason, headers=headers)

    def _tool_use(self, body: ChatCompletionRequest) -> ToolUse | None:
        mode = body.tool_mode()
        if mode == "none":
            return None
        fmt = detect_format(getattr(self.engine.loaded.tokenizer, "chat_template", None))
        if fmt is None:
            raise bad_request("this model's chat template does not support tools", "tools", "unsupported_parameter")
        return ToolUse(fmt, forced=mode in ("required", "named"), parallel=body.parallel_tool_calls is not False)

    def render_chat(self, body: ChatCompletionRequest | TokenizeChat, context: int | None = None) -> list[int]:
        """The prompt's token ids: the messages (and tools) through the model's chat template."""
        tokenizer = self.engine.loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages")
        extra = body.chat_template_kwargs or {}
        reserved = sorted(_TEMPLATE_PARAMETERS & extra.keys())
        if reserved:
            raise bad_request(f"chat_template_kwargs may not set {', '.join(reserved)}", "chat_template_kwargs")
        offered = body.tools if not isinstance(body, ChatCompletionRequest) or body.tool_mode() != "none" else None
        tools: list[dict[Any, Any] | Callable[..., Any]] | None = None
        if offered:
            tools = [tool.model_dump(mode="json", exclude_none=True) for tool in offered]
        try:
            text = tokenizer.apply_chat_template(
                [_template_message(m) for m in body.messages],
                tools=tools,
                tokenize=False,
                add_generation_prompt=body.add_generation_prompt,
                **extra,
            )
        except Exception as exc:  # jinja templates raise for shapes they refuse (e.g. role order)
            raise bad_request(f"chat template rejected the messages: {exc}", "messages") from exc
        # The template already places the special tokens; do not add BOS a second time.
        if context is None:  # /tokenize: counting is the point, and the body limit bounds the text
            return list(tokenizer(str(text), add_special_tokens=False).input_ids)
        ids = tokenize_bounded(lambda t: tokenizer(t, add_special_tokens=False).input_ids, str(text), context)
        if ids is None:
            raise _refused(too_many_tokens(context, "messages"))
        return ids

    def _tokenize_prompts(self, body: CompletionRequest, context: int) -> list[list[int]]:
        tokenizer = self.engine.loaded.tokenizer
        prompt = body.prompt
        if isinstance(prompt, str):
            texts: list[str] = [prompt]
        elif all(isinstance(p, str) for p in prompt):
            texts = [str(p) for p in prompt]
        elif all(isinstance(p, int) for p in prompt):
            return self._check_ids([[int(p) for p in prompt if isinstance(p, int)]])
        else:
            return self._check_ids([[int(t) for t in p] for p in prompt if isinstance(p, list)])
        encoded: list[list[int]] = []
        for text in texts:
            ids = tokenize_bounded(lambda t: tokenizer(t).input_ids, text, context)
            if ids is None:
                raise _refused(too_many_tokens(context, "prompt"))
            encoded.append(ids)
        if any(not ids for ids in encoded):
            raise bad_request("prompt must not be empty", "prompt")
        return encoded

    def _check_ids(self, prompts: list[list[int]], param: str = "prompt") -> list[list[int]]:
        vocab = len(self.engine.loaded.tokenizer)
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise bad_request(f"{param} token ids must be in [0, {vocab})", param)
        return prompts

    def _prepare(
        self,
        prompts: list[list[int]],
        limit: int | None,
        body: ChatCompletionRequest | CompletionRequest,
        param: str,
        logprobs: bool,
        top_logprobs: int,
    ) -> Prepared:
        context = self.engine.loaded.max_model_len
        max_tokens: list[int] = []
        for prompt in prompts:
            wanted = limit if limit is not None else context - len(prompt)
            if len(prompt) + max(wanted, 1) > context:
                raise bad_request(
                    f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{len(prompt) + max(wanted, 1)} tokens ({len(prompt)} in the {param}, {max(wanted, 1)} in the completion).",
                    param,
                    "context_length_exceeded",
                )
            max_tokens.append(wanted)
        if len(prompts) * body.n > self.settings.max_num_seqs:
            raise bad_request(f"prompts x n must be at most {self.settings.max_num_seqs} (max-num-seqs)", "n")
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            logprobs=top_logprobs if logprobs else None,
            seed=body.seed,
            top_k=max(body.top_k or 0, 0),
            min_p=body.min_p or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            min_tokens=body.min_tokens,
            stop_token_ids=frozenset(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
        )
        include_usage = body.stream_options.include_usage if body.stream_options else False
        return Prepared(prompts, max_tokens, params, body.n, body.stop_list(), body.stream, include_usage, logprobs)

    # --- running ---

    def _handoff_for(self, loop: asyncio.AbstractEventLoop) -> Handoff[object]:
        if self._handoff is None or self._handoff.loop is not loop:
            self._handoff = Handoff(loop)
        return self._handoff

    async def _run(self, prepared: Prepared, http: Request, admitted: Admitted, *, chat: bool) -> Response:
        lease = Lease(self.admission, admitted, self._released)
        try:
            queue: asyncio.Queue[object] = asyncio.Queue()
            handoff = self._handoff_for(asyncio.get_running_loop())

            def sink(events: list[Event]) -> None:
                handoff.post(queue, events)

            request = GenerationRequest(
                prompts=prepared.prompts,
                max_tokens=prepared.max_tokens,
                params=prepared.params,
                n=prepared.n,
                stop=prepared.stop,
                timeout=self.settings.request_timeout_seconds,
                request_id=http.headers.get("x-request-id", ""),
            )
            lease.ticket = self.engine.submit(request, sink)
            created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            if prepared.stream:
                chunks = StreamChunks(rid=rid, created=created, model=self.model_name, chat=chat, logprobs=prepared.logprobs)
                body = self._stream(queue, lease, prepared, chunks)
                return LeasedStream(body, lease, {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            watcher = asyncio.ensure_future(_watch_disconnect(http, queue))
            try:
                return await self._collect(queue, lease, prepared, chat, rid, created)
            finally:
                watcher.cancel()
        except BaseException:
            lease.close()
            raise

    def _released(self) -> None:
        if self.admission.idle:
            self.idle.set()

    async def _batches(self, queue: asyncio.Queue[object], lease: Lease) -> AsyncIterator[list[Event] | None]:
        """Engine events as they arrive, all that are waiting at once, up to Done/Failed; None when the client went away.

        Taking every waiting batch together is what lets a loop that fell behind catch up with one
        write per request instead of one per token.
        """
        while True:
            items = [await queue.get()]
            while not queue.empty():
                items.append(queue.get_nowait())
            events: list[Event] = []
            for item in items:
                if item is _DISCONNECTED:
                    yield None
                    return
                assert isinstance(item, list)
                for event in item:
                    events.append(event)
                    if isinstance(event, Done | Failed):
                        lease.finished = True
                        yield events
                        return
            yield events

    async def _collect(
        self, queue: asyncio.Queue[object], lease: Lease, prepared: Prepared, chat: bool, rid: str, created: int
    ) -> Response:
        try:
            choices = [Collected() for _ in range(len(prepared.prompts) * prepared.n)]
            async for events in self._batches(queue, lease):
                if events is None:
                    return Response(status_code=499)  # nobody to answer; the ticket is cancelled on close
                for event in events:
                    if isinstance(event, Failed):
                        raise APIError(_FAILURE_STATUS[event.kind], event.message, code=event.kind)
                    if isinstance(event, Delta):
                        choices[event.index].text.append(event.text)
                        choices[event.index].logprobs.extend(event.logprobs)
                    elif isinstance(event, Finished):
                        choices[event.index].finish_reason = event.reason
                    elif isinstance(event, Done):
                        return JSONResponse(self._final(choices, prepared, chat, rid, created, usage_of(event)))
            raise APIError(500, "generation ended without a result")
        finally:
            lease.close()

    def _final(self, choices: list[Collected], prepared: Prepared, chat: bool, rid: str, created: int, usage: Usage) -> dict[str, Any]:
        reasons: list[FinishReason] = ["length" if c.finish_reason == "length" else "stop" for c in choices]
        if chat:
            messages = []
            for i, c in enumerate(choices):
                text = "".join(c.text)
                parsed = parse(prepared.tools.fmt, text) if prepared.tools is not None else Parsed(text)
                calls = _response_calls(parsed, prepared.tools)
                if calls and reasons[i] == "stop":
                    reasons[i] = "tool_calls"
                messages.append(AssistantMessage(content=parsed.content if calls else text, tool_calls=calls or None))
            return ChatCompletion(
                id=rid,
                created=created,
                model=self.model_name,
                usage=usage,
                choices=[
                    ChatChoice(
                        index=i,
                        message=messages[i],
                        finish_reason=reasons[i],
                        logprobs=chat_logprobs(c.logprobs) if prepared.logprobs else None,
                    )
                    for i, c in enumerate(choices)
                ],
            ).model_dump(mode="json")
        return Completion(
            id=rid,
            created=created,
            model=self.model_name,
            usage=usage,
            choices=[
                CompletionChoice(
                    index=i,
                    text=(prepared.echo[i // prepared.n] if prepared.echo else "") + "".join(c.text),
                    finish_reason=reasons[i],
                    logprobs=completion_logprobs(c.logprobs, 0) if prepared.logprobs else None,
                )
                for i, c in enumerate(choices)
            ],
        ).model_dump(mode="json")

    async def _stream(self, queue: asyncio.Queue[object], lease: Lease, prepared: Prepared, chunks: StreamChunks) -> AsyncIterator[str]:
        try:
            rows = len(prepared.prompts) * prepared.n
            tools = prepared.tools
            streams = [ToolStream(tools.fmt, forced=tools.forced) for _ in range(rows)] if tools is not None else []
            if chunks.chat:
                yield "".join(chunks.role(index) for index in range(rows))
            elif prepared.echo:
                yield "".join(chunks.delta(Delta(i, prepared.echo[i // prepared.n], [])) for i in range(rows))
            async for events in self._batches(queue, lease):
                if events is None:
                    return
                yield "".join(part for event in events for part in _stream_parts(event, streams, tools, chunks, prepared.include_usage))
            yield sse("[DONE]")
        except Exception as exc:  # after the stream started the status is sent: one error event, then [DONE]
            log.exception("Stream failed")
            error_body = ErrorResponse.model_validate({"error": {"message": str(exc) or "internal error", "type": "server_error"}})
            yield sse(error_body.model_dump(mode="json"))
            yield sse("[DONE]")
        finally:
            lease.close()


def _stream_parts(event: Event, streams: list[ToolStream], tools: ToolUse | None, chunks: StreamChunks, include_usage: bool) -> list[str]:
    """The SSE chunks one engine event becomes (with tools: content as it comes, a call once it is whole)."""
    if isinstance(event, Failed):
        error = APIError(_FAILURE_STATUS[event.kind], event.message, code=event.kind).body()
        return [sse(error.model_dump(mode="json"))]
    if isinstance(event, Delta):
        if not streams:
            return [chunks.delta(event)]
        released = Delta(event.index, streams[event.index].push(event.text), event.logprobs)
        return [chunks.delta(released)] if released.text or released.logprobs else []
    if isinstance(event, Finished):
        parts: list[str] = []
        reason: FinishReason = event.reason
        if streams:
            parsed = streams[event.index].finish()
            if parsed.content:
                parts.append(chunks.delta(Delta(event.index, parsed.content, [])))
            calls = _response_calls(parsed, tools)
            if calls:
                parts.append(chunks.tool_calls(event.index, [(c.id, c.function.name, c.function.arguments) for c in calls]))
                reason = "tool_calls" if reason == "stop" else reason
        parts.append(chunks.finished(event, reason))
        return parts
    if isinstance(event, Done) and include_usage:
        return [chunks.usage(event)]
    return []


def _with_chat_constraints(params: SamplingParams, body: ChatCompletionRequest, tools: ToolUse | None) -> SamplingParams:
    """The grammar a chat request's output must follow: a forced tool call, else its response_format."""
    grammar: Grammar | None = None
    if tools is not None and tools.forced:
        offered = body.tools or []
        named = body.tool_choice.function.name if body.tool_mode() == "named" else None  # type: ignore[union-attr]
        grammar = call_grammar(tools.fmt, [(t.function.name, t.function.parameters) for t in offered if named in (None, t.function.name)])
    elif isinstance(body.response_format, ResponseFormatJsonObject):
        grammar = Grammar(None)
    elif isinstance(body.response_format, ResponseFormatJsonSchema):
        schema = body.response_format.json_schema.schema_
        grammar = Grammar(json.dumps(schema if schema is not None else {}, sort_keys=True))
    skip_special = params.skip_special_tokens and not (tools is not None and keeps_special_tokens(tools.fmt))
    return replace(params, grammar=grammar, skip_special_tokens=skip_special)


def _template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (transformers' convention: a call's arguments as a mapping)."""
    rendered: dict[str, Any] = {"role": "system" if message.role == "developer" else message.role, "content": message.text()}
    if isinstance(message, AssistantTurn) and message.tool_calls:
        rendered["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in message.tool_calls
        ]
    if isinstance(message, ToolMessage):
        rendered["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        rendered["name"] = message.name
    return rendered


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def _response_calls(parsed: Parsed, tools: ToolUse | None) -> list[ResponseToolCall]:
    calls = parsed.calls if tools is None or tools.parallel else parsed.calls[:1]
    return [
        ResponseToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=call.name, arguments=call.arguments))
        for call in calls
    ]


def _refused(refusal: Refusal) -> APIError:
    return bad_request(refusal.message, refusal.param, refusal.code)


def _prompt_count(body: CompletionRequest) -> int:
    prompt = body.prompt
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return 1
    return len(prompt)


def _common_refusal(bounds: PromptBounds, body: ChatCompletionRequest | CompletionRequest) -> Refusal | None:
    return first_refusal(
        bounds.stop(len(s) for s in body.stop_list()),
        bounds.logit_bias(len(body.logit_bias)) if body.logit_bias else None,
    )


def _chat_refusal(bounds: PromptBounds, body: ChatCompletionRequest) -> Refusal | None:
    return first_refusal(
        bounds.messages(len(body.messages), sum(len(m.text()) for m in body.messages)),
        bounds.tools(len(to_json(body.tools))) if body.tools else None,
        _common_refusal(bounds, body),
    )


def _completion_refusal(bounds: PromptBounds, body: CompletionRequest) -> Refusal | None:
    prompt = body.prompt
    if isinstance(prompt, str):
        sized = bounds.prompt_texts([len(prompt)])
    elif all(isinstance(p, str) for p in prompt):
        sized = bounds.prompt_texts(len(p) for p in prompt if isinstance(p, str))
    elif all(isinstance(p, int) for p in prompt):
        sized = bounds.token_ids([len(prompt)])
    else:
        sized = bounds.token_ids(len(p) for p in prompt if isinstance(p, list))
    return first_refusal(sized, _common_refusal(bounds, body))


async def _watch_disconnect(http: Request, queue: asyncio.Queue[object]) -> None:
    # The body has been read, so the next ASGI message can only be the disconnect.
    while (await http.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(_DISCONNECTED)
