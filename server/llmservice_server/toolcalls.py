"""Tool calls in a model's own words: which format its chat template uses, the grammar that forces
a call, and the calls parsed back out of the text (whole, or as a stream arrives).

Three formats cover the common open models; the chat template says which one a model speaks:
- `hermes` (Hermes, Qwen2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one
  block per call, text around them is content;
- `llama3` (Llama 3.1-3.3 JSON tool calling): the whole answer is `{"name": ..., "parameters": {...}}`
  (optionally after `<|python_tag|>`, several joined by `;`);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` after any content.

Pure (no torch, no web framework): the HTTP process uses it, the engine only sees the `Grammar`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from .events import Grammar

ToolFormat = Literal["hermes", "llama3", "mistral"]

_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_MISTRAL_TAG = "[TOOL_CALLS]"
_NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class Parsed:
    content: str | None
    calls: list[ParsedCall] = field(default_factory=list)


def detect_format(chat_template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template renders calls in; None: the template knows no tools."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if _MISTRAL_TAG in chat_template:
        return "mistral"
    if _PYTHON_TAG in chat_template or "ipython" in chat_template:
        return "llama3"
    return None


def keeps_special_tokens(fmt: ToolFormat) -> bool:
    """Formats whose markers are special tokens: they must stay in the text for the parser (vLLM does the same)."""
    return fmt != "hermes"


def call_grammar(fmt: ToolFormat, tools: list[tuple[str, dict[str, Any] | None]]) -> Grammar:
    """A grammar whose every output is one call of one of `tools` (name, parameters schema), in `fmt`."""
    arguments_key = "parameters" if fmt == "llama3" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, arguments_key: parameters or _NO_ARGUMENTS},
            "required": ["name", arguments_key],
            "additionalProperties": False,
        }
        for name, parameters in tools
    ]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    text = json.dumps(schema, sort_keys=True)
    if fmt == "hermes":
        return Grammar(text, prefix="<tool_call>\n", suffix="\n</tool_call>")
    if fmt == "mistral":
        return Grammar(text, prefix=_MISTRAL_TAG + "[", suffix="]")
    return Grammar(text)


def parse(fmt: ToolFormat, text: str) -> Parsed:
    """Content and calls of a finished answer; text that is no well-formed call stays content."""
    if fmt == "hermes":
        calls: list[ParsedCall] = []
        for block in _HERMES_BLOCK.findall(text):
            call = _call(_json(block), "arguments")
            if call is None:
                return Parsed(text or None)
            calls.append(call)
        content = _HERMES_BLOCK.sub("", text).strip() if calls else text
        return Parsed(content or None, calls)
    if fmt == "mistral":
        head, tag, tail = text.partition(_MISTRAL_TAG)
        items = _json(tail) if tag else None
        found = [_call(item, "arguments") for item in items] if isinstance(items, list) else []
        if not found or any(c is None for c in found):
            return Parsed(text or None)
        return Parsed(head.strip() or None, [c for c in found if c is not None])
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return Parsed(text or None)
    parts = [_call(item, "parameters") for item in _split_objects(body)]
    if not parts or any(c is None for c in parts):
        return Parsed(text or None)
    return Parsed(None, [c for c in parts if c is not None])


class ToolStream:
    """Streams content while no call has begun; from a call's marker on, holds the text back for `parse`.

    `forced` (tool_choice required or a named function): the whole answer is a call, nothing is content.
    """

    def __init__(self, fmt: ToolFormat, *, forced: bool) -> None:
        self.fmt = fmt
        self.text = ""
        self._sent = 0
        self._held = forced  # from here on nothing is released until the end

    def push(self, piece: str) -> str:
        """Add generated text; the part that is surely content, to send now."""
        self.text += piece
        if self._held:
            return ""
        start = self._call_start()
        if start is not None:
            self._held = True
            return self._release(start)
        return self._release(len(self.text) - self._possible_marker())

    def finish(self) -> Parsed:
        """The answer's calls, and its content not sent yet (None when there is none)."""
        parsed = parse(self.fmt, self.text)
        if not parsed.calls:
            return Parsed(self._release(len(self.text)) or None)
        # What is left from the first marker on is calls, and for hermes maybe text between them.
        rest = _HERMES_BLOCK.sub("", self.text[self._sent :]) if self.fmt == "hermes" else ""
        return Parsed(rest.strip() or None, parsed.calls)

    def _call_start(self) -> int | None:
        if self.fmt == "llama3":
            stripped = self.text.lstrip()
            return 0 if stripped.startswith(("{", _PYTHON_TAG)) else None
        at = self.text.find("<tool_call>" if self.fmt == "hermes" else _MISTRAL_TAG, self._sent)
        return at if at >= 0 else None

    def _possible_marker(self) -> int:
        """Length of the text's end that could still turn into a call's marker."""
        if self.fmt == "llama3":
            stripped = self.text.lstrip()
            return len(self.text) if _PYTHON_TAG.startswith(stripped) else 0
        marker = "<tool_call>" if self.fmt == "hermes" else _MISTRAL_TAG
        for size in range(min(len(marker) - 1, len(self.text) - self._sent), 0, -1):
            if marker.startswith(self.text[-size:]):
                return size
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self._sent)
        piece = self.text[self._sent : end]
        self._sent = end
        return piece


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(item: Any, arguments_key: str) -> ParsedCall | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get(arguments_key, item.get("arguments", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        decoded = _json(arguments)
        arguments = decoded if isinstance(decoded, dict) else None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False))


def _split_objects(body: str) -> list[Any]:
    """Llama 3's parallel calls: JSON objects one after another, joined by `;` (or nothing)."""
    decoder = json.JSONDecoder()
    items: list[Any] = []
    at = 0
    while at < len(body):
        try:
            item, at = decoder.raw_decode(body, at)
        except ValueError:
            return [None]
        items.append(item)
        while at < len(body) and body[at] in "; \n\t":
            at += 1
    return items
