"""Routes, OpenAI-shaped errors, admission and the OpenAPI document, against a scripted engine."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from devtools.fake_engine import FakeEngine, hold
from transformers import PreTrainedTokenizerFast

from .conftest import MODEL, AppFactory

pytestmark = pytest.mark.asyncio

ERROR_FIELDS = {"message", "type", "param", "code"}


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_FIELDS, body
    error: dict[str, Any] = body["error"]
    return error


async def test_chat_answers_what_the_engine_sent_through_the_openai_client(
    client: httpx.AsyncClient, engine: FakeEngine, tokenizer: PreTrainedTokenizerFast
) -> None:
    api = openai.AsyncOpenAI(base_url="http://server/v1", api_key="unused", http_client=client)
    answer = await api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)

    assert answer.choices[0].message.content == "Hello world"
    assert answer.choices[0].finish_reason == "stop"
    [ticket] = engine.tickets
    # The engine got the chat template's rendering, and the limit the request asked for.
    assert tokenizer.decode(ticket.request.prompts[0]) == "<|user|>Hi<|end|><|assistant|>"
    assert ticket.request.max_tokens == [5]
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ticket.request.prompts[0]), 2)


async def test_completion_with_n_gets_one_choice_per_row(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "The capital", "max_tokens": 3, "n": 2})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "Hello world", "stop"),
        (1, "Hello world", "stop"),
    ]
    assert engine.tickets[0].request.n == 2
    assert body["usage"]["completion_tokens"] == 4


async def test_models_and_probes_answer_from_the_engine_state(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    models = (await client.get("/v1/models")).json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, 256)]
    assert (await client.get("/readyz")).status_code == 200

    engine.stage = "loading"
    ready = await client.get("/readyz")
    assert (ready.status_code, ready.json()["stage"]) == (503, "loading")
    refused = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi"})
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    assert error_of(refused)["type"] == "service_unavailable_error"
    assert engine.tickets == []


@pytest.mark.parametrize(
    ("path", "body", "status", "param", "code"),
    [
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages", "invalid_value"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "bogus": 1},
            400,
            "bogus",
            "unsupported_parameter",
        ),
        ("/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "Hi"}]}, 404, "model", "model_not_found"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "n": 99}, 400, "n", "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 10_000}, 400, "prompt", "context_length_exceeded"),
        ("/v1/completions", {"model": MODEL, "prompt": [100_000]}, 400, "prompt", "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "Hi", "temperature": "hot"}, 400, "temperature", "invalid_value"),
    ],
)
async def test_bad_input_is_one_openai_error_that_never_reaches_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, body: dict[str, Any], status: int, param: str, code: str
) -> None:
    response = await client.post(path, json=body)

    assert response.status_code == status, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert error["message"]
    assert engine.tickets == []


async def test_unknown_routes_methods_and_json_are_openai_errors_too(client: httpx.AsyncClient) -> None:
    assert error_of(await client.get("/v1/nothing-here"))["type"] == "not_found_error"
    wrong_method = await client.get("/v1/completions")
    assert (wrong_method.status_code, error_of(wrong_method)["type"]) == (405, "invalid_request_error")
    broken = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert (broken.status_code, error_of(broken)["type"]) == (400, "invalid_request_error")


async def test_a_full_server_answers_429_with_retry_after_and_frees_the_slot(make_app: AppFactory, engine: FakeEngine) -> None:
    app = make_app(max_num_seqs=1, max_queue=0)
    request = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://server") as client:
        engine.script = hold("Hel")  # the first request keeps the one slot
        first = asyncio.ensure_future(client.post("/v1/completions", json=request))
        held = await engine.submitted()

        refused = await client.post("/v1/completions", json=request)
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert (error_of(refused)["type"], error_of(refused)["code"]) == ("rate_limit_error", "queue_full")
        assert len(engine.tickets) == 1

        first.cancel()  # the held request's caller gives up: its rows and its slot are freed
        with contextlib.suppress(asyncio.CancelledError):
            await first
        assert held.cancelled.is_set()

        engine.script = FakeEngine(engine.loaded.tokenizer).script  # the default reply
        assert (await client.post("/v1/completions", json=request)).status_code == 200


async def test_the_openapi_document_describes_the_api(client: httpx.AsyncClient) -> None:
    response = await client.get("/openapi.json")

    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "429", "503"} <= set(chat["responses"])
    assert "422" not in chat["responses"]  # validation failures are documented as 400 with the OpenAI shape
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "Retry-After" in chat["responses"]["429"]["headers"]
    assert {"/v1/completions", "/v1/models", "/readyz", "/metrics"} <= set(document["paths"])


async def test_an_api_key_guards_the_api_but_not_the_probes(make_app: AppFactory, engine: FakeEngine, tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("s3cret\n")
    transport = httpx.ASGITransport(app=make_app(api_key_file=key_file))
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        request = {"model": MODEL, "prompt": "Hi"}
        refused = await client.post("/v1/completions", json=request, headers={"Authorization": "Bearer wrong"})
        assert (refused.status_code, error_of(refused)["code"]) == (401, "invalid_api_key")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/readyz")).status_code == 200
        allowed = await client.post("/v1/completions", json=request, headers={"Authorization": "Bearer s3cret"})
        assert allowed.status_code == 200
    assert len(engine.tickets) == 1


async def test_a_body_over_the_limit_is_413_before_it_is_parsed(make_app: AppFactory, engine: FakeEngine) -> None:
    transport = httpx.ASGITransport(app=make_app(max_request_mib=0.01))  # about 10 KiB
    async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
        response = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 20_000})
    assert response.status_code == 413
    assert error_of(response)["type"] == "invalid_request_error"
    assert engine.tickets == []
