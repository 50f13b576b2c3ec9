"""The benchmark's load generator against the real server: its wire, its SSE reading, its numbers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from bench.http11 import LoopbackTransport
from bench.loadgen import LoadConfig, check_loopback, make_workload, run, run_benchmark

from .conftest import ServerProcess


def test_the_wire_keeps_one_connection_across_body_framings_and_errors(server: ServerProcess) -> None:
    async def exchange() -> tuple[LoopbackTransport, list[Any]]:
        transport = LoopbackTransport()
        async with httpx.AsyncClient(transport=transport, base_url=server.url) as client:
            models = await client.get("/v1/models")  # a Content-Length body
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 5,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with client.stream("POST", "/v1/chat/completions", json=body) as stream:  # chunked SSE
                events = [line async for line in stream.aiter_lines() if line.startswith("data:")]
            refused = await client.post("/v1/chat/completions", json={**body, "model": "no-such-model"})
            again = await client.get("/v1/models")
        return transport, [models, events, refused, again]

    transport, (models, events, refused, again) = run(exchange())
    assert models.status_code == 200 and models.json() == again.json()
    assert models.json()["data"][0]["id"] == "tiny"
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[5:]) for line in events[:-1]]
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert transport.opened == 1  # four exchanges, one after another, on one kept-alive connection


def test_a_benchmark_run_reports_every_request_and_keeps_connections_to_its_concurrency(server: ServerProcess) -> None:
    requests = make_workload(12, seed=3, prompt_words=(4, 12), output_tokens=(8, 16))
    config = LoadConfig(base_url=server.url, model="tiny", max_concurrency=4, livez_url=server.url + "/livez", max_duration=60)
    summary = run(run_benchmark(config, requests))
    assert (summary["completed"], summary["failed"], summary["incomplete"]) == (12, 0, 0)
    assert summary["tokens_from_usage"] and summary["streamed"]
    rows = summary["requests"]
    assert summary["total_output_tokens"] == sum(r["output_tokens"] for r in rows) > 0
    # The tiny model may end a reply at EOS, never past max_tokens.
    by_index = {spec.index: spec for spec in requests}
    assert all(1 <= r["output_tokens"] <= by_index[r["index"]].max_tokens for r in rows)
    assert all(0 < r["ttft_ms"] <= r["e2e_ms"] for r in rows)
    assert summary["output_throughput"] == pytest.approx(summary["total_output_tokens"] / summary["duration_s"])
    assert summary["livez_ms"]["p50"] is not None and summary["livez_ms"]["failures"] == 0
    assert 1 <= summary["connections_opened"] <= 4


def test_traffic_goes_to_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("http://192.0.2.1:8000")
    check_loopback("http://127.0.0.1:8000")


def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    """A server may close an idle keep-alive connection (uvicorn after 5 s): the next request goes out on a new one."""

    async def answer_once_then_hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # without "connection: close": the client believes it may reuse this one

    async def two_requests() -> tuple[list[str], int]:
        server = await asyncio.start_server(answer_once_then_hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport = LoopbackTransport()
        async with server, httpx.AsyncClient(transport=transport, base_url=f"http://127.0.0.1:{port}") as client:
            first = await client.get("/")
            await asyncio.sleep(0.05)  # the server's close reaches the idle connection
            second = await client.get("/")
        return [first.text, second.text], transport.opened

    texts, opened = asyncio.run(two_requests())
    assert texts == ["ok", "ok"]
    assert opened == 2


def test_a_repeat_is_the_same_work_in_other_words() -> None:
    first = make_workload(32, seed=5, prompt_words=(8, 24), output_tokens=(4, 40))
    assert make_workload(32, seed=5, prompt_words=(8, 24), output_tokens=(4, 40)) == first
    again = make_workload(32, seed=5, prompt_words=(8, 24), output_tokens=(4, 40), variant=1)
    assert [(r.prompt_words, r.max_tokens) for r in again] == [(r.prompt_words, r.max_tokens) for r in first]
    assert all(len(r.prompt.split()) == r.prompt_words for r in again)
    # No prompt of a repeat is one read before: a prefix cache finds only what prompts share.
    assert not {r.prompt for r in again} & {r.prompt for r in first}
