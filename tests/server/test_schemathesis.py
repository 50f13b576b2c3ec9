"""Schemathesis over the server's own OpenAPI document, against a real server process.

Generated requests, valid and invalid, go to /v1/chat/completions, /v1/completions, /v1/models and
the health endpoints. Every response must be a documented status (`status_code_conformance`),
have a documented media type, match the documented schema - the JSON body, or each server-sent
event of a stream (`response_schema_conformance`) - and never be a 5xx (`not_a_server_error`).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from .conftest import ServerProcess

MAX_EXAMPLES = 30  # per operation
MAX_TOKENS = 16  # the tiny model is fast, but a request without a limit may fill the 2048-token context
CONTEXT = 2048
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
GENERATING = {"/v1/chat/completions", "/v1/completions"}
# OpenAI fields the server accepts only at their "off" value (anything else is a 400 by design).
REFUSED_BY_DESIGN = ("logit_bias", "best_of", "suffix")
OPERATIONS = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("GET", "/version"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/startupz"),
    ("GET", "/metrics"),
]


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> schemathesis.BaseSchema:
    # The document the running server publishes, not one built in the test process.
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def servable(case: schemathesis.Case, model: str, vocab: int) -> schemathesis.Case:
    """What a client of this server sends: the served model, its token ids, no feature refused by design."""
    body = case.body
    if isinstance(body, dict):
        body["model"] = model
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            body["prompt"] = [token % vocab for token in prompt]
        elif isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
            body["prompt"] = [[token % vocab for token in ids] for ids in prompt]
        for key in REFUSED_BY_DESIGN:
            body.pop(key, None)
        if not body.get("stream"):
            body.pop("stream_options", None)
        if not body.get("logprobs"):
            body.pop("top_logprobs", None)
        consistent_extras(body)
    return case


def consistent_extras(body: dict[str, Any]) -> None:
    """Rules across fields that a JSON schema cannot state: a tool_choice names an offered tool,
    min_tokens fits the token limit, chat_template_kwargs leave apply_chat_template's own arguments."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    names = [t["function"]["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if len(set(names)) != len(names):
        body.pop("tools", None)
        names = []
    choice = body.get("tool_choice")
    if (choice in ("required",) or isinstance(choice, dict)) and not (
        names and (choice == "required" or (isinstance(choice, dict) and choice.get("function", {}).get("name") in names))
    ):
        body.pop("tool_choice", None)
    limit = as_token_count(body.get("max_completion_tokens", body.get("max_tokens")))
    if isinstance(body.get("min_tokens"), int) and body["min_tokens"] > min(limit or MAX_TOKENS, MAX_TOKENS):
        body.pop("min_tokens")
    if isinstance(body.get("chat_template_kwargs"), dict):
        body.pop("chat_template_kwargs")  # arbitrary template variables; tested with the real ones in test_vllm_extras.py


def as_token_count(value: object) -> int | None:
    """The integer the server reads from `value` (JSON validation is lax: "2000" and 2000.0 count)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def bound_generation(case: schemathesis.Case) -> None:
    """Clamp token counts the server would accept to MAX_TOKENS; larger ones stay (a fast 400)."""
    body = case.body
    if not isinstance(body, dict) or case.path not in GENERATING:
        return
    limits = [key for key in ("max_tokens", "max_completion_tokens") if key in body]
    for key in limits:
        count = as_token_count(body[key])
        if count is not None and MAX_TOKENS < count <= CONTEXT:
            body[key] = MAX_TOKENS
    if not limits or all(body[key] is None for key in limits):
        body["max_tokens"] = MAX_TOKENS


@pytest.mark.timeout(900)
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_server_conforms_to_its_openapi_document(
    server: ServerProcess, tokenizer: Any, api_schema: schemathesis.BaseSchema, method: str, path: str
) -> None:
    operation = api_schema[path][method]
    cases = operation.as_strategy(GenerationMode.POSITIVE)
    if path in GENERATING:
        # Requests this server serves (the document cannot name the model: any string is a model
        # name to the schema), schema-valid ones as generated (another model: 404; a refused
        # feature such as echo or tools: 400), and invalid ones (400).
        model = server.get("/v1/models").json()["data"][0]["id"]
        served = cases.map(lambda case: servable(case, model, len(tokenizer)))
        cases = st.one_of(served, cases, operation.as_strategy(GenerationMode.NEGATIVE))
    seen: list[int] = []

    @given(case=cases)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=timedelta(seconds=30),  # per example, generous: the box is shared with a benchmark
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
        database=None,
    )
    def check(case: schemathesis.Case) -> None:
        bound_generation(case)
        response = case.call(timeout=60)
        seen.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    check()
    assert seen, "no request was sent"
    if path in GENERATING:  # generation ran, and refusals were exercised
        assert {200, 400} <= set(seen), sorted(set(seen))


def test_the_document_declares_the_real_error_statuses(server: ServerProcess) -> None:
    document: dict[str, Any] = server.get("/openapi.json").json()
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(chat) == {"200", "400", "401", "404", "408", "413", "429", "500", "503"}  # no 422: validation answers 400
    assert chat["429"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "Retry-After" in chat["503"]["headers"]
    assert chat["200"]["content"]["text/event-stream"]["schema"] == {"$ref": "#/components/schemas/ChatStreamEvent"}
    assert set(document["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
