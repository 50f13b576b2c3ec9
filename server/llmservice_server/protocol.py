"""OpenAI request, response, chunk and error models (the wire format, parsed at the edge).

Requests are strict: an unknown field, or a known field set to something we cannot honour
(logit_bias, suffix, best_of other than n, ...), is a 400 that names the field, never a silently
different answer. Fields we accept but that change nothing we can observe (`user`, `metadata`,
`store`, `service_tier`) are kept so clients that always send them keep working. vLLM's sampling
extras (`top_k`, `min_p`, ..., sent by clients in `extra_body`) have vLLM's meanings and bounds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, TypeAdapter, WithJsonSchema, field_validator, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128  # OpenAI's own limit; their size is bounded against the context in `prompt_bounds`

# The documented shape of `stop` and `prompt` (the OpenAPI document): the limits the validators
# below enforce, so a request that fits the document is one the server can take. Validation itself
# stays in the validators, which name the field in their 400.
_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
STOP_SCHEMA = WithJsonSchema({"anyOf": [_TEXT, {"type": "array", "maxItems": MAX_STOP_SEQUENCES, "items": _TEXT}, {"type": "null"}]})
PROMPT_SCHEMA = WithJsonSchema(
    {
        "anyOf": [
            _TEXT,
            {"type": "array", "minItems": 1, "items": _TEXT},
            _TOKEN_IDS,
            {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
        ]
    }
)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a 64-bit seed, as vLLM accepts (torch refuses larger ones)


def _valid_unicode(value: object) -> None:
    """JSON can spell lone surrogates (`"\\ud800"`); no tokenizer or response encoder can handle them."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("text must be valid Unicode (lone surrogates are not allowed)") from None
    elif isinstance(value, list):
        for item in value:
            _valid_unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _valid_unicode(key)
            _valid_unicode(item)


class Strict(BaseModel):
    # strict: "max_tokens": "20" or "stream": "yes" is a 400, as OpenAI answers, not a silent
    # conversion (a JSON integer still fills a float field).
    model_config = ConfigDict(extra="forbid", strict=True)

    @field_validator("*")
    @classmethod
    def _no_lone_surrogates(cls, value: object) -> object:
        _valid_unicode(value)
        return value


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class _Message(Strict):
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class PromptMessage(_Message):
    role: Literal["system", "developer", "user"]
    content: str | list[TextPart]


class AssistantTurn(_Message):
    """An earlier assistant turn: text, calls, or both (content may be null or left out with calls, as OpenAI allows)."""

    role: Literal["assistant"]
    tool_calls: list[ToolCall] | None = None


class ToolMessage(_Message):
    """A tool's result, answering the call `tool_call_id`."""

    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


ChatMessage = Annotated[PromptMessage | AssistantTurn | ToolMessage, Field(discriminator="role")]


class FunctionDefinition(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: a function without arguments
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class ResponseFormatText(Strict):
    type: Literal["text"]


class ResponseFormatJsonObject(Strict):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")]


class SamplingFields(Strict):
    """Fields shared by both endpoints, with OpenAI's ranges."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: Annotated[str | list[str] | None, STOP_SCHEMA] = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted and ignored: they do not change what is generated (docs/api.md).
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # Accepted only at their "off" value; anything else is a 400 (see `unsupported_field`).
    logit_bias: dict[str, float] | None = None
    # vLLM's extras, with vLLM's bounds.
    top_k: int | None = Field(None, ge=-1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @model_validator(mode="after")
    def _min_tokens_within_max(self) -> SamplingFields:
        limit = self.token_limit()
        if limit is not None and self.min_tokens > limit:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be at most the maximum number of tokens ({limit})")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported_field(self) -> str | None:
        """The first field set to a value this server cannot honour, if any."""
        if self.logit_bias:
            return "logit_bias"
        return None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: extra variables for the chat template
    add_generation_prompt: bool = True  # vLLM's

    @field_validator("tools")
    @classmethod
    def _tools_count(cls, value: list[Any] | None) -> list[Any] | None:
        if value is not None and len(value) > MAX_TOOLS:
            raise ValueError(f"at most {MAX_TOOLS} tools are allowed")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or []]
        if self.tool_choice not in (None, "none", "auto") and not names:
            raise ValueError("tool_choice other than none/auto needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        if len(set(names)) != len(names):
            raise ValueError("tool names must be unique")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_mode(self) -> Literal["none", "auto", "required", "named"]:
        """How tools are used: none (not offered), auto (the model decides), required / named (decoding forces a call)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None or self.tool_choice == "auto":
            return "auto"
        return "required" if self.tool_choice == "required" else "named"


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: Annotated[Prompt, PROMPT_SCHEMA]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value: Prompt) -> Prompt:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value

    def token_limit(self) -> int | None:
        return self.max_tokens

    def unsupported_field(self) -> str | None:
        if self.echo and self.logprobs is not None:
            return "echo"  # with logprobs it would need the prompt's logprobs, which are not computed
        if self.best_of is not None and self.best_of != self.n:
            return "best_of"
        if self.suffix:
            return "suffix"
        return super().unsupported_field()


# --- responses -----------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # read from the prefix cache, not computed


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChatLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llmservice"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletion(Strict):
    """vLLM's /tokenize for a prompt."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeChat(Strict):
    """vLLM's /tokenize for a message list: the chat template applied, as /v1/chat/completions applies it."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class Detokenized(BaseModel):
    prompt: str


class Version(BaseModel):
    version: str


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    """The body of /livez, /readyz and /startupz (200 when the probe passes, 503 otherwise)."""

    status: Literal["alive", "dead", "ready", "not ready", "started", "starting"]
    stage: str
    error: str | None = None
    uptime_seconds: float | None = None
    stages: dict[str, float] | None = Field(
        default=None, description="/startupz: seconds spent in each start-up phase so far (fetch, load, warmup)."
    )
    progress: dict[str, int] | None = Field(
        default=None, description="/startupz while the model downloads: bytes_done, bytes_total, files_done, files_total."
    )


# --- server-sent events (documentation of the stream format in the OpenAPI document) -----------


class _EventData:
    """JSON schema of an SSE `data` field: `[DONE]`, or a JSON document of the `payload` type."""

    def __init__(self, payload: Any) -> None:
        self.payload = payload

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        content = handler(TypeAdapter(self.payload).core_schema)
        return {"anyOf": [{"const": "[DONE]"}, {"type": "string", "contentMediaType": "application/json", "contentSchema": content}]}


class ChatStreamEvent(BaseModel):
    """One event of a streamed chat completion: a chunk, one error event, or the final `[DONE]`."""

    data: Annotated[str, _EventData(ChatCompletionChunk | ErrorResponse)]


class CompletionStreamEvent(BaseModel):
    """One event of a streamed completion: a chunk, one error event, or the final `[DONE]`."""

    data: Annotated[str, _EventData(Completion | ErrorResponse)]
