"""An OpenAPI document that tells the truth: every status a route answers, in the shape it answers.

FastAPI documents a 422 for request validation; this server answers 400 in OpenAI's error shape,
so the 422 is dropped and each route declares its real statuses (`errors(...)`). Streams are
documented as `text/event-stream` whose `schema` describes one event (the OpenAPI 3.1 reading):
a JSON chunk, one error event, or `[DONE]`. Schemathesis checks responses against this document
(tests/server/test_schemathesis.py), so a drift between the document and the server fails a test.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .protocol import ChatStreamEvent, CompletionStreamEvent, ErrorResponse

Responses = dict[int | str, dict[str, Any]]

_ERROR_DESCRIPTIONS = {
    400: "Invalid request: a field is malformed, out of range or unsupported, or prompt plus completion exceed the context.",
    401: "Missing or wrong API key (only when the server was started with one).",
    404: "No such model.",
    408: "Generation ran longer than the server's request timeout.",
    413: "The request body is larger than the server's limit (`--max-request-mib`).",
    429: "Too many sequences in flight; retry after `Retry-After` seconds.",
    500: "Internal error.",
    503: "The model is not loaded yet, the server is draining, or it holds too many connections; retry after `Retry-After` seconds.",
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer", "minimum": 1}}}
_STREAM_EVENTS: list[type[BaseModel]] = [ChatStreamEvent, CompletionStreamEvent]
_COMPONENTS = "#/components/schemas/{model}"


def errors(*statuses: int) -> Responses:
    """OpenAI-shaped error responses for `statuses` (429 and 503 carry Retry-After)."""
    responses: Responses = {}
    for status in statuses:
        responses[status] = {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[status]}
        if status in {429, 503}:
            responses[status]["headers"] = _RETRY_AFTER
    return responses


def generation(result: type[BaseModel], event: type[BaseModel]) -> Responses:
    """The responses of a generating route: `result` as JSON, or a stream of `event`s."""
    ok = {
        "model": result,
        "description": "The result; with `stream: true` a stream of server-sent events that ends with `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": {"$ref": _COMPONENTS.format(model=event.__name__)}}},
    }
    return {200: ok, **errors(400, 401, 404, 408, 413, 429, 500, 503)}


class DocumentedApp(FastAPI):
    """FastAPI whose generated document is corrected once, then cached as usual."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            document = super().openapi()
            _drop_validation_422(document)
            _add_stream_events(document)
        return self.openapi_schema  # type: ignore[return-value]  # set by super().openapi()


def _drop_validation_422(document: dict[str, Any]) -> None:
    for path in document.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _add_stream_events(document: dict[str, Any]) -> None:
    _, definitions = models_json_schema([(model, "serialization") for model in _STREAM_EVENTS], ref_template=_COMPONENTS)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in definitions.get("$defs", {}).items():
        schemas.setdefault(name, schema)  # models FastAPI already documented (Completion, Usage, ...) keep its copy
