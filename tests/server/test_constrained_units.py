"""Unit tests of constrained decoding, tool-call parsing and vLLM's sampling extras (no server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmservice_server.constraints import Grammars, InvalidGrammar
from llmservice_server.events import Grammar, SamplingParams
from llmservice_server.protocol import ChatCompletionRequest
from llmservice_server.sampling import RowSampler, apply_repetition_penalty, min_p_filter, select_tokens, top_k_filter
from llmservice_server.textstream import StopMatcher
from llmservice_server.toolcalls import ToolFormat, ToolStream, call_grammar, detect_format, parse

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def grammars(tiny_tokenizer: PreTrainedTokenizerBase) -> Grammars:
    return Grammars(tiny_tokenizer, len(tiny_tokenizer), [tiny_tokenizer.eos_token_id])


def generate(
    grammars: Grammars, tokenizer: Any, grammar: Grammar, seed: int, rows: int = 1, steps: int = 300, *, must_finish: bool = True
) -> list[str | None]:
    """Sample under the grammar from random logits (what a random model does); the rows' texts (None: not finished)."""
    eos = tokenizer.eos_token_id
    params = SamplingParams(temperature=1.0, grammar=grammar)
    samplers = [RowSampler.create(params, len(tokenizer), seed + i, constraint=grammars.constraint(grammar)) for i in range(rows)]
    ids: list[list[int]] = [[] for _ in range(rows)]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        live = [i for i in range(rows) if not ids[i] or ids[i][-1] != eos]
        if not live:
            break
        logits = torch.randn(len(live), len(tokenizer), generator=generator) * 3
        for i, choice in zip(live, select_tokens(logits, [samplers[i] for i in live]), strict=True):
            ids[i].append(choice.token)
    finished = [row[-1] == eos for row in ids]
    assert all(finished) or not must_finish, "a row did not finish its grammar"
    assert [s.constraint is not None and s.constraint.terminated for s in samplers] == finished
    return [tokenizer.decode(row, skip_special_tokens=True) if done else None for row, done in zip(ids, finished, strict=True)]


def test_schema_output_always_parses_and_validates(grammars: Grammars, tiny_tokenizer: Any) -> None:
    # 8 rows at once, 8 times: the batched mask gives each row its own grammar state. Random logits
    # reach every corner xgrammar leaves open (raw control characters, surrogates): json.loads and
    # the schema must accept every text.
    grammar = Grammar(json.dumps(PERSON))
    for seed in range(0, 64, 8):
        for text in generate(grammars, tiny_tokenizer, grammar, seed, rows=8):
            assert text is not None
            jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_an_object(grammars: Grammars, tiny_tokenizer: Any) -> None:
    # Keys and values are unbounded: uniform random logits do not always close them in 300 tokens.
    texts = generate(grammars, tiny_tokenizer, Grammar(None), 0, rows=16, must_finish=False)
    done = [text for text in texts if text is not None]
    assert len(done) >= 4, texts
    assert all(isinstance(json.loads(text), dict) for text in done)


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_forced_tool_call_is_one_call_of_an_offered_tool(grammars: Grammars, tiny_tokenizer: Any, fmt: ToolFormat) -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}
    tools: list[tuple[str, dict[str, Any] | None]] = [("get_weather", weather), ("noop", None)]
    grammar = call_grammar(fmt, tools)
    for seed in range(10):
        (text,) = generate(grammars, tiny_tokenizer, grammar, seed)
        assert text is not None
        parsed = parse(fmt, text)
        assert parsed.content is None and len(parsed.calls) == 1, text
        call = parsed.calls[0]
        schema = dict(tools)[call.name] or {"type": "object", "properties": {}, "additionalProperties": False}
        jsonschema.validate(json.loads(call.arguments), schema)


def test_a_schema_xgrammar_cannot_compile_is_the_requests_fault(grammars: Grammars) -> None:
    with pytest.raises(InvalidGrammar):
        grammars.constraint(Grammar(json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}, "required": ["a"]})))


# --- tool-call formats ---


def test_the_format_comes_from_the_chat_template() -> None:
    assert detect_format("{% for m in messages %}<tool_call>{% endfor %}") == "hermes"
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("<|start_header_id|>ipython<|end_header_id|>") == "llama3"
    assert detect_format("{{ messages }}") is None


def test_calls_are_parsed_in_each_format() -> None:
    hermes = parse("hermes", 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert hermes.content == "Let me look." and [(c.name, json.loads(c.arguments)) for c in hermes.calls] == [("f", {"x": 1})]
    llama = parse("llama3", '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}')
    assert llama.content is None and [c.name for c in llama.calls] == ["f", "g"]
    mistral = parse("mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": "{\\"x\\": 2}"}]')
    assert mistral.content == "ok" and json.loads(mistral.calls[0].arguments) == {"x": 2}
    # Text that only looks like a call stays content, unchanged.
    assert parse("hermes", "<tool_call>{not json}</tool_call>").calls == []
    assert parse("llama3", "{ hello").content == "{ hello"


def test_a_stream_sends_content_and_holds_a_call_until_it_is_whole() -> None:
    stream = ToolStream("hermes", forced=False)
    sent = [stream.push(piece) for piece in ["Hi <", "tool", '_call>{"name": "f", ', '"arguments": {}}</tool_call>']]
    assert "".join(sent) == "Hi "  # "<" was held: it could have begun the marker
    finished = stream.finish()
    assert finished.content is None and [c.name for c in finished.calls] == ["f"]
    plain = ToolStream("hermes", forced=False)
    assert plain.push("a <b") == "a <b" and plain.finish().content is None


def test_tool_choice_must_name_an_offered_tool() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "f"}}]}
    named = ChatCompletionRequest.model_validate({**base, "tool_choice": {"type": "function", "function": {"name": "f"}}})
    assert named.tool_mode() == "named"
    with pytest.raises(ValueError, match="not among the tools"):
        ChatCompletionRequest.model_validate({**base, "tool_choice": {"type": "function", "function": {"name": "g"}}})
    with pytest.raises(ValueError, match="tool_call_id"):  # a tool result answers a call
        ChatCompletionRequest.model_validate({**base, "messages": [{"role": "tool", "content": "x"}]})


# --- vLLM's sampling extras ---


def test_top_k_and_min_p_keep_the_likeliest_tokens() -> None:
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    assert top_k_filter(probs, 2).tolist() == [0.0, 0.5, 0.0, 0.25]
    assert torch.equal(top_k_filter(probs, 0), probs)  # 0 (and vLLM's -1): off
    assert min_p_filter(probs, 0.4).tolist() == [0.0, 0.5, 0.0, 0.25]  # below 0.4 * 0.5 goes


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits() -> None:
    logits = torch.tensor([2.0, -2.0, 2.0])
    seen = torch.tensor([True, True, False])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [1.0, -4.0, 2.0]
    # The prompt counts as seen: token 1 is penalized from the first step.
    sampler = RowSampler.create(SamplingParams(temperature=0.0, repetition_penalty=10.0), 3, None, prompt=[1])
    assert select_tokens(torch.tensor([[0.0, 5.0, 1.0]]), [sampler])[0].token == 2


def test_min_tokens_holds_stop_tokens_back_until_reached() -> None:
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=frozenset({2}))
    sampler = RowSampler.create(params, 3, None, stop_tokens=frozenset({0}))
    logits = torch.tensor([[9.0, 1.0, 8.0]])  # EOS (0) first, the stop token id (2) second
    assert [select_tokens(logits, [sampler])[0].token for _ in range(3)] == [1, 1, 0]


def test_stop_strings_can_be_kept_and_wait_for_min_tokens() -> None:
    kept = StopMatcher(["END"], include_stop=True)
    assert kept.push("abEN") + kept.push("Dx") == "abEND" and kept.stopped
    early = StopMatcher(["END"])
    assert early.push("END", match=False) == "END" and not early.stopped  # before min_tokens: text, not a stop
    assert early.push("xEND") == "x" and early.stopped
