"""vLLM's sampling extras and the endpoints vLLM clients probe, against real server processes.

Each extra is checked for the change vLLM documents, not just for being accepted. The tiny model
never chooses its EOS (its output row is zero), so EOS-dependent extras run on a copy whose
generation config declares every token but four an end of sequence: without `ignore_eos` such a
model stops after its first token (`stop_heavy_server` in conftest.py).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import KEPT, STARTUP_DEADLINE, ServerProcess

MESSAGES: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stop_heavy(stop_heavy_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=stop_heavy_server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(client: openai.OpenAI, logprobs: int | None = None, **extra: Any) -> openai.types.Completion:
    return client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, logprobs=logprobs, extra_body=extra
    )


# --- EOS and stop tokens ---


def test_ignore_eos_reaches_max_tokens(stop_heavy: openai.OpenAI) -> None:
    stopped = greedy(stop_heavy)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage and stopped.usage.completion_tokens < 12
    ignored = greedy(stop_heavy, ignore_eos=True)
    assert ignored.choices[0].finish_reason == "length" and ignored.usage and ignored.usage.completion_tokens == 12


def test_min_tokens_holds_eos_back(stop_heavy: openai.OpenAI, tokenizer: Any) -> None:
    assert greedy(stop_heavy).usage.completion_tokens < 5  # type: ignore[union-attr]
    held = greedy(stop_heavy, min_tokens=5, logprobs=0)
    assert held.choices[0].finish_reason == "stop" and held.usage and held.usage.completion_tokens >= 5
    # Until then only the four tokens that are not EOS could be chosen.
    tokens = held.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert len(tokens) == held.usage.completion_tokens, "one logprobs entry per generated token"
    assert set(tokens[:5]) <= {tokenizer.decode([k]) for k in KEPT}


def test_stop_token_ids_stop_and_min_tokens_holds_them(client: openai.OpenAI, tokenizer: Any) -> None:
    every = list(range(len(tokenizer)))
    assert greedy(client).choices[0].finish_reason == "length"
    stopped = greedy(client, stop_token_ids=every)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage and stopped.usage.completion_tokens == 1
    assert stopped.choices[0].text == ""  # the stop token's text is not output
    # Held back for four tokens, only the tokens that are no stop tokens can be chosen; then they stop.
    held = greedy(client, logprobs=0, stop_token_ids=[t for t in every if t not in KEPT], min_tokens=4)
    assert held.choices[0].finish_reason == "stop" and held.usage and held.usage.completion_tokens >= 5
    tokens = held.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert len(tokens) == held.usage.completion_tokens, "one logprobs entry per generated token"
    assert set(tokens[:4]) <= {tokenizer.decode([k]) for k in KEPT}


def test_stop_string_kept_with_include_stop_str_in_output(client: openai.OpenAI) -> None:
    text = greedy(client).choices[0].text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].isalnum() and text.find(text[i : i + 2]) == i)
    at = text.find(stop)
    assert greedy(client, stop=[stop]).choices[0].text == text[:at]
    assert greedy(client, stop=[stop], include_stop_str_in_output=True).choices[0].text == text[: at + len(stop)]
    # min_tokens also holds stop strings back: with every token needed, the first match is skipped.
    late = greedy(client, stop=[stop], min_tokens=12)
    assert late.choices[0].finish_reason == "length" and late.choices[0].text == text


# --- sampling ---


def test_top_k_1_and_min_p_1_are_greedy(client: openai.OpenAI) -> None:
    text = greedy(client).choices[0].text
    for seed in range(3):
        for extra in ({"top_k": 1}, {"min_p": 1.0}):
            sampled = client.completions.create(
                model="tiny", prompt="Once upon a time", max_tokens=12, temperature=1.5, seed=seed, extra_body=extra
            )
            assert sampled.choices[0].text == text, extra
    # And off (-1 / 0) they leave sampling as it was.
    plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=1.5, seed=1)
    off = client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=1.5, seed=1, extra_body={"top_k": -1, "min_p": 0.0}
    )
    assert plain.choices[0].text == off.choices[0].text


def test_repetition_penalty_changes_greedy_output(client: openai.OpenAI) -> None:
    # The definition itself is unit-tested (test_constrained_units.py); here: it reaches the engine.
    base = client.completions.create(model="tiny", prompt="one two three four", max_tokens=24, temperature=0)
    penalized = client.completions.create(
        model="tiny", prompt="one two three four", max_tokens=24, temperature=0, extra_body={"repetition_penalty": 2.0}
    )
    assert penalized.choices[0].text != base.choices[0].text
    neutral = client.completions.create(
        model="tiny", prompt="one two three four", max_tokens=24, temperature=0, extra_body={"repetition_penalty": 1.0}
    )
    assert neutral.choices[0].text == base.choices[0].text


def test_skip_special_tokens_and_echo(client: openai.OpenAI) -> None:
    prompt = "<|user|>Hello"
    echoed = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True)
    generated = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0)
    assert echoed.choices[0].text == "Hello" + generated.choices[0].text  # the special token skipped, as in the output
    kept = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, extra_body={"skip_special_tokens": False}
    )
    assert kept.choices[0].text.startswith(prompt)
    stream = client.completions.create(model="tiny", prompt=[prompt, "Paris"], max_tokens=3, temperature=0, echo=True, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts[0] == echoed.choices[0].text and texts[1].startswith("Paris")


def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI, tokenizer: Any) -> None:
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1)
    thinking_off = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=1, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    closed = len(tokenizer("<think></think>", add_special_tokens=False).input_ids)
    assert plain.usage and thinking_off.usage and thinking_off.usage.prompt_tokens == plain.usage.prompt_tokens + closed
    with pytest.raises(openai.BadRequestError, match="chat_template_kwargs"):
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=1, extra_body={"chat_template_kwargs": {"tokenize": True}}
        )


def test_openai_fields_that_change_nothing_are_accepted(client: openai.OpenAI) -> None:
    base = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0)
    same = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, temperature=0, user="u", metadata={"k": "v"}, store=False, service_tier="auto"
    )
    assert same.choices[0].message.content == base.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, extra_body={"frobnicate": 1})


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": 50}, ""),  # more than max_tokens
        ({"echo": True, "logprobs": 1}, "echo"),  # the prompt's logprobs are not computed
    ],
)
def test_extras_out_of_vllms_bounds_are_400(server: ServerProcess, extra: dict[str, Any], param: str) -> None:
    response = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10, **extra})
    assert response.status_code == 400, response.text
    assert param in (response.json()["error"]["param"] or "")


# --- endpoints ---


def test_health_version_and_model_by_id(server: ServerProcess) -> None:
    assert server.get("/health").status_code == 200
    assert server.get("/version").json()["version"]
    assert server.get("/v1/models/tiny").json()["id"] == "tiny"
    missing = server.get("/v1/models/gpt-4")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_health_is_503_until_the_model_is_ready(tiny_model_dir: Path, tmp_path: Path) -> None:
    proc = ServerProcess(tiny_model_dir, tmp_path / "server.log", load_delay_seconds=60)
    try:
        deadline = time.monotonic() + STARTUP_DEADLINE
        while time.monotonic() < deadline:  # until the process answers at all (its model is 60 s away)
            try:
                response = proc.get("/health")
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            raise AssertionError(proc.logs())
        assert response.status_code == 503 and response.json()["error"]["type"] == "service_unavailable_error"
        assert proc.get("/livez").status_code == 200  # alive, just not ready
    finally:
        proc.stop()


def test_tokenize_and_detokenize(server: ServerProcess, tokenizer: Any) -> None:
    ids = tokenizer("Hello there").input_ids
    tokenized = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "Hello there"}).json()
    assert tokenized == {"count": len(ids), "max_model_len": 2048, "tokens": ids}
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json() == {"prompt": "Hello there"}
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    text = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert httpx.post(server.url + "/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
