"""The official openai client against a real server process with the tiny model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from llmservice_server.engine.kv_blocks import BLOCK_TOKENS

from .conftest import ServerProcess
from .test_lifecycle import metric

MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_prompt_tokens(tokenizer: Any, messages: list[Any]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_chat_usage_is_exact(client: openai.OpenAI, tokenizer: Any) -> None:
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == chat_prompt_tokens(tokenizer, MESSAGES)
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12


def test_a_conversations_next_turn_reads_the_earlier_turns_from_the_prefix_cache(
    server: ServerProcess, client: openai.OpenAI, tokenizer: Any
) -> None:
    system = {"role": "system", "content": "You answer questions about the operator in one short sentence, politely."}
    turn = [system, {"role": "user", "content": "What does a HorizontalPodAutoscaler scale on?"}]
    hits_before = metric(server, "vllm:prefix_cache_hits_total")
    first = client.chat.completions.create(model="tiny", messages=turn, max_tokens=6, temperature=0)
    answer = first.choices[0].message.content
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    assert first.usage.prompt_tokens_details.cached_tokens == 0  # nothing began like this before
    following = [*turn, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the Service?"}]
    second = client.chat.completions.create(model="tiny", messages=following, max_tokens=6, temperature=0)
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    # At least the whole blocks of the first turn's prompt, which the second one begins with (blocks
    # of the first answer too, where its tokens render the same in the second prompt).
    first_prompt = first.usage.prompt_tokens
    assert second.usage.prompt_tokens == chat_prompt_tokens(tokenizer, following) > first_prompt
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first_prompt // BLOCK_TOKENS * BLOCK_TOKENS <= cached < second.usage.prompt_tokens and cached % BLOCK_TOKENS == 0
    assert metric(server, "vllm:prefix_cache_hits_total") - hits_before == second.usage.prompt_tokens_details.cached_tokens


def test_chat_stream_matches_non_stream_and_ends_with_usage(client: openai.OpenAI, tokenizer: Any) -> None:
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=15, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_completion_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 15
    assert chunks[-1].usage.prompt_tokens == chat_prompt_tokens(tokenizer, MESSAGES)


def test_stream_ends_with_done_on_the_wire(server: ServerProcess) -> None:
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"


def _readable_stop(text: str) -> tuple[str, int]:
    """A 2-character alphanumeric substring at its first occurrence, not at the very start."""
    for start in range(2, len(text) - 1):
        candidate = text[start : start + 2]
        if candidate.isalnum() and text.find(candidate) == start:
            return candidate, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string_is_cut_and_not_returned(client: openai.OpenAI) -> None:
    base = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0)
    text = base.choices[0].text
    stop, at = _readable_stop(text)
    stopped = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[:at]
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=30, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text[:at]


def test_stop_usage_counts_generated_tokens(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0)
    stop, _ = _readable_stop(base.choices[0].message.content or "")
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0, stop=stop, logprobs=True)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content is not None
    # One logprob entry per generated token, including the one that completed the stop string.
    assert reply.usage.completion_tokens == len(reply.choices[0].logprobs.content) < 30


def test_n_choices_and_seed_reproducibility(client: openai.OpenAI) -> None:
    def ask(seed: int) -> list[str]:
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0, n=3, seed=seed)
        assert [c.index for c in reply.choices] == [0, 1, 2]
        assert reply.usage is not None and reply.usage.completion_tokens == 48
        return [c.message.content or "" for c in reply.choices]

    first, again, other = ask(7), ask(7), ask(8)
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # the n rows are sampled independently


def test_chat_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)


def test_completion_logprobs_and_multiple_prompts(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="tiny", prompt=["Hello", "Paris is"], max_tokens=4, n=2, temperature=0, logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: both rows of one prompt agree
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.tokens is not None and choice.logprobs.top_logprobs is not None
        assert len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) == 4
        for token, top in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs, strict=True):
            # At most `logprobs` alternatives (two ids may decode to one string), and greedy chose the likeliest.
            assert 1 <= len(top) <= 2 and token in top
            assert top[token] == pytest.approx(max(top.values()))
    assert reply.usage is not None and reply.usage.completion_tokens == 16


def test_penalties_change_greedy_output(client: openai.OpenAI) -> None:
    plain = client.completions.create(model="tiny", prompt="one two", max_tokens=40, temperature=0)
    penalized = client.completions.create(
        model="tiny", prompt="one two", max_tokens=40, temperature=0, frequency_penalty=2.0, presence_penalty=2.0
    )
    assert plain.choices[0].text != penalized.choices[0].text


def test_async_client_concurrent_streams(server: ServerProcess) -> None:
    aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

    async def one(i: int) -> tuple[str, int]:
        stream = await aclient.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"Story number {i}"}],
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, usage = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def main() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        together = await asyncio.gather(*(one(i) for i in range(8)))
        alone = [await one(i) for i in range(8)]
        return together, alone

    together, alone = asyncio.run(main())
    # Batched with 7 others or alone: the same greedy text and token count (<= 20: EOS may stop it).
    assert together == alone
    assert all(0 < usage <= 20 for _, usage in together)


def test_request_id_is_echoed(server: ServerProcess) -> None:
    response = httpx.get(server.url + "/v1/models", headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = httpx.get(server.url + "/v1/models").headers["x-request-id"]
    assert len(generated) == 32


def test_chat_stream_with_two_choices_indexes_each_and_ends_with_one_usage(server: ServerProcess, client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 2}
    full = client.chat.completions.create(**ask)
    expected = [c.message.content for c in full.choices]
    assert expected[0] != expected[1]  # seeded per row: a swapped or mixed index shows in the text

    body = {**ask, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]

    *choice_chunks, last = chunks
    assert full.usage is not None
    assert last["choices"] == []
    counts = {"prompt_tokens", "completion_tokens", "total_tokens"}  # cached_tokens: the second read the first's prompt from the cache
    assert {key: last["usage"][key] for key in counts} == full.usage.model_dump(include=counts)
    assert all(chunk.get("usage") is None for chunk in choice_chunks)  # exactly one usage chunk, the last
    assert all(len(chunk["choices"]) == 1 for chunk in choice_chunks)
    for index in (0, 1):
        mine = [chunk["choices"][0] for chunk in choice_chunks if chunk["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in mine) == expected[index]
        finishes = [c["finish_reason"] for c in mine if c["finish_reason"] is not None]
        assert finishes == [full.choices[index].finish_reason]
        assert mine[-1]["finish_reason"] is not None  # nothing for a choice after its finish
    assert {chunk["choices"][0]["index"] for chunk in choice_chunks} == {0, 1}
