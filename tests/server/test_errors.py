"""Every error path answers in OpenAI's shape with the right status - and never a 5xx."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from .conftest import ServerProcess

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return dict(error)


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"temperature": 5}, "temperature"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"max_tokens": "many"}, "max_tokens"),
        # Strict types: a number or flag given as a string is refused, not converted.
        ({"max_tokens": "4"}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"stream": "true"}, "stream"),
        ({"n": 1.0}, "n"),
        ({"top_logprobs": 3}, None),  # without logprobs
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "robot", "content": "x"}]}, None),
        ({"seed": 2**64}, "seed"),
    ],
)
def test_validation_errors_are_400(server: ServerProcess, patch: dict[str, Any], param: str | None) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **patch})
    error = assert_openai_error(response, 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"functions": [{"name": "f"}]}, "functions"),  # the API before tools: an unknown field
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"frobnicate": True}, "frobnicate"),
    ],
)
def test_fields_we_cannot_honour_are_400(server: ServerProcess, patch: dict[str, Any], param: str) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **patch})
    assert_openai_error(response, 400, code="unsupported_parameter", param=param)


def test_lone_surrogates_are_400_not_500(server: ServerProcess) -> None:
    # Valid JSON escapes, invalid Unicode: the tokenizer raised on them (a 500).
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800"}]}'
    response = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, param="messages.0.content")
    body = b'{"model": "tiny", "prompt": "x", "stop": ["\\udfff"]}'
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, param="stop")


@pytest.mark.parametrize(
    "patch",
    [
        {"temperature": 5e-324},  # logits / t overflowed: NaN probabilities on the engine thread
        {"top_p": 5e-324},  # rounded to 0 in float32: an empty nucleus
        {"repetition_penalty": 5e-324, "temperature": 1.0},  # a seen token's logit divided to inf
        {"seed": 2**63 - 1, "n": 2, "temperature": 1.0},  # seed + row index beyond 64 bits
    ],
)
def test_extreme_sampling_values_are_served(server: ServerProcess, patch: dict[str, Any]) -> None:
    response = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, **patch}, timeout=60)
    assert response.status_code == 200, response.text
    assert all(choice["finish_reason"] for choice in response.json()["choices"])


def test_malformed_json_is_400(server: ServerProcess) -> None:
    response = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_context_overflow_counts_the_chat_template(server: ServerProcess, tokenizer: Any) -> None:
    # A prompt that nearly fills the 2048-token context, so the request that fits is quick.
    # Greedy: this model never picks EOS greedily, but sampling can (it did, once in CI).
    messages = [{"role": "user", "content": "Hello " * 1000}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    room = 2048 - prompt_tokens
    assert 0 < room < 100
    body = {**CHAT, "messages": messages, "max_tokens": room, "temperature": 0}
    fits = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert fits.status_code == 200, fits.text
    usage = fits.json()["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (prompt_tokens, room, 2048)
    over = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "messages": messages, "max_tokens": room + 1})
    assert_openai_error(over, 400, code="context_length_exceeded", param="messages")


def test_unknown_model_is_404(server: ServerProcess) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"


def test_unknown_route_is_openai_shaped_404(server: ServerProcess) -> None:
    assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_openai_error(httpx.get(server.url + "/v1/chat/completions"), 405)


@pytest.fixture(scope="module")
def tight_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Auth on, at most 2 running + 2 waiting sequences."""
    workdir = tmp_path_factory.mktemp("tight")
    key_file = workdir / "key"
    key_file.write_text("s3cret\n")
    proc = ServerProcess(tiny_model_dir, workdir / "server.log", max_num_seqs=2, max_queue=2, api_key_file=key_file)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def test_auth_required_on_api_but_not_on_health(tight_server: ServerProcess) -> None:
    url = tight_server.url
    assert_openai_error(httpx.get(url + "/v1/models"), 401, code="invalid_api_key")
    assert_openai_error(httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    for path in ("/livez", "/readyz", "/startupz", "/metrics"):
        assert httpx.get(url + path).status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2).choices


def test_burst_beyond_limits_gets_429_and_no_5xx(tight_server: ServerProcess) -> None:
    headers = {"Authorization": "Bearer s3cret"}

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight_server.url, headers=headers, timeout=180) as client:
            body = {**CHAT, "max_tokens": 200, "temperature": 0}
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=body) for _ in range(20)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 4  # 2 running + 2 waiting always fit
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected
    for response in rejected:
        assert int(response.headers["retry-after"]) >= 1
        assert_openai_error(response, 429, code="queue_full")
    n_too_big = httpx.post(tight_server.url + "/v1/chat/completions", json={**CHAT, "n": 3}, headers=headers)
    assert_openai_error(n_too_big, 400, param="n")
    metrics = httpx.get(tight_server.url + "/metrics").text
    assert 'llmservice:requests_rejected_total{model_name="tiny",reason="queue_full"}' in metrics
