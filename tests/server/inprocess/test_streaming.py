"""SSE framing of streamed answers, a failure mid-stream, and a client that goes away."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from devtools.fake_engine import FakeEngine, fail_after, hold
from fastapi import FastAPI

from llmservice_server.events import Failed

from .conftest import MODEL, AppFactory

pytestmark = pytest.mark.asyncio

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "stream": True}
COMPLETION = {"model": MODEL, "prompt": "The capital", "max_tokens": 5, "stream": True}


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads in order; fails on anything else in the body (SSE framing)."""
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.text
    assert body.endswith("\n\n"), body
    frames = body[: -len("\n\n")].split("\n\n")
    assert all(frame.startswith("data: ") and "\n" not in frame for frame in frames), frames
    return [frame[len("data: ") :] for frame in frames]


def chunks(events: list[str]) -> list[dict[str, Any]]:
    assert events[-1] == "[DONE]"
    assert "[DONE]" not in events[:-1]
    return [json.loads(event) for event in events[:-1]]


async def test_streamed_chat_is_role_deltas_finish_usage_then_done(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}})

    assert response.status_code == 200
    parsed = chunks(sse_events(response))
    assert {c["object"] for c in parsed} == {"chat.completion.chunk"}
    assert len({c["id"] for c in parsed}) == 1
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in parsed if c["choices"])
    assert text == "Hello world"
    finishes = [c["choices"][0]["finish_reason"] for c in parsed if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"]
    assert parsed[-1]["choices"] == []  # the usage chunk comes last
    assert parsed[-1]["usage"]["completion_tokens"] == 2


async def test_streamed_completion_is_text_chunks_then_done(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json=COMPLETION)

    parsed = chunks(sse_events(response))
    assert {c["object"] for c in parsed} == {"text_completion"}
    assert [c["choices"][0]["text"] for c in parsed] == ["Hello", " world", ""]
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("path, body", [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)])
async def test_a_failure_mid_stream_is_one_error_event_then_done(
    client: httpx.AsyncClient, engine: FakeEngine, path: str, body: dict[str, Any]
) -> None:
    engine.script = fail_after("Hel", Failed("internal", "the step failed"))

    response = await client.post(path, json=body)

    assert response.status_code == 200  # the status went out with the first chunk
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(event) for event in events[:-1]]
    errors = [p for p in payloads if "error" in p]
    assert payloads[-1] is errors[-1]  # the error is the last event before [DONE] ...
    assert len(errors) == 1  # ... and the only one
    assert errors[0]["error"]["message"] == "the step failed"
    assert set(errors[0]["error"]) == {"message", "type", "param", "code"}
    assert any("Hel" in json.dumps(p) for p in payloads[:-1])  # what came before the failure was sent


async def test_a_failure_before_an_unstreamed_answer_is_its_status(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.script = fail_after("Hel", Failed("timeout", "request timed out after 600 s"))

    response = await client.post("/v1/completions", json={**COMPLETION, "stream": False})

    assert response.status_code == 408
    assert response.json()["error"] == {
        "message": "request timed out after 600 s",
        "type": "timeout_error",
        "param": None,
        "code": "timeout",
    }


async def call_then_disconnect(app: FastAPI, path: str, body: dict[str, Any], engine: FakeEngine) -> list[dict[str, Any]]:
    """One ASGI request whose client goes away once the engine has it; the messages the app sent.

    `httpx.ASGITransport` reports a disconnect only after the whole response, so this speaks ASGI
    itself: the body, then `http.disconnect` as soon as the request reached the engine.
    """
    sent: list[dict[str, Any]] = []
    body_read = False

    async def receive() -> dict[str, Any]:
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await engine.submitted()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"server"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("server", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=5)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_goes_away_cancels_its_request(make_app: AppFactory, engine: FakeEngine, stream: bool) -> None:
    app = make_app()
    engine.script = hold("Hel")  # the engine would never finish it on its own

    await call_then_disconnect(app, "/v1/completions", {**COMPLETION, "stream": stream}, engine)

    [ticket] = engine.tickets
    assert ticket.cancelled.is_set()
    assert app.state.serving.admission.in_flight == 0
    assert app.state.serving.idle.is_set()
