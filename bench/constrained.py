"""Throughput of constrained decoding (response_format json_schema) against free text, 16 streams.

Starts the server on the tiny test model, then alternates rounds: 16 concurrent clients each send
`--requests` chat completions, either free text (`ignore_eos`, `max_tokens` fixed) or under a JSON
schema (the grammar ends each answer; its length varies with the sampled strings). Throughput is
generated tokens (from `usage`) over the round's wall time; the report is the median of the rounds.

    .venv/bin/python -m bench.constrained --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from devtools.ports import free_port
from devtools.tiny_model import build_tiny_model

STREAMS = 16
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "retired": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "retired"],
    "additionalProperties": False,
}
FREE_TOKENS = 48  # about what the schema's answers take


async def one_client(client: httpx.AsyncClient, url: str, body: dict[str, Any], requests: int, seed: int) -> int:
    tokens = 0
    for i in range(requests):
        response = await client.post(url, json={**body, "seed": seed * 1000 + i}, timeout=300)
        response.raise_for_status()
        reply = response.json()
        if "response_format" in body:
            json.loads(reply["choices"][0]["message"]["content"])  # every answer parses, or the round is void
        tokens += reply["usage"]["completion_tokens"]
    return tokens


async def round_tokens_per_second(base: str, constrained: bool, requests: int) -> float:
    body: dict[str, Any] = {"model": "tiny", "messages": [{"role": "user", "content": "Describe a person."}], "temperature": 1.0}
    if constrained:
        body |= {"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}}
        body |= {"max_tokens": 400}
    else:
        body |= {"max_tokens": FREE_TOKENS, "ignore_eos": True}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=STREAMS)) as client:
        started = time.perf_counter()
        counts = await asyncio.gather(*[one_client(client, base + "/v1/chat/completions", body, requests, s) for s in range(STREAMS)])
        return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="requests per client per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "model")
        port = free_port()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "llmservice_server.main", "--model", str(model), "--served-model-name", "tiny"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(STREAMS)]
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(base + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            else:
                raise SystemExit("server did not become ready")
            asyncio.run(round_tokens_per_second(base, True, 1))  # compile the grammar, warm both paths
            asyncio.run(round_tokens_per_second(base, False, 1))
            free, constrained = [], []
            for _ in range(args.rounds):
                free.append(asyncio.run(round_tokens_per_second(base, False, args.requests)))
                constrained.append(asyncio.run(round_tokens_per_second(base, True, args.requests)))
            f, c = statistics.median(free), statistics.median(constrained)
            print(f"free text    {f:8.1f} tok/s  rounds {[round(x, 1) for x in free]}")
            print(f"json_schema  {c:8.1f} tok/s  rounds {[round(x, 1) for x in constrained]}")
            print(f"constrained / free: {c / f:.2f} (cost {100 * (1 - c / f):.0f} %)")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
