"""The seed article's design, as a baseline: one `model.generate` per request, in a thread.

This is what the issue calls the naive baseline, written the way the seed article writes it:
a FastAPI app whose handler hands each request to the default threadpool
(`loop.run_in_executor(None, ...)`, the article's "async" idea), where one `model.generate` call
produces the whole completion. The model is not thread-safe, so a lock serializes the calls:
requests run one at a time, and nothing is sent until a completion is done - the response is a
plain (non-streaming) chat completion even when `stream` is asked for, so a client's TTFT equals
its end-to-end latency. It is OpenAI-compatible only as far as the load generator needs
(`/v1/chat/completions`, `/v1/models`, `/livez`) and is not part of the product.

    .venv/bin/python bench/baselines/seed_server.py --model /path/to/model-dir --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False  # accepted, not honoured: the seed design streams nothing


def create_app(model_dir: Path) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # type: ignore[no-untyped-call]  # untyped in transformers
    name = model_dir.name
    lock = threading.Lock()
    app = FastAPI()

    def generate(request: ChatRequest) -> dict[str, Any]:
        messages = [m.model_dump() for m in request.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(str(text), add_special_tokens=False, return_tensors="pt").input_ids
        limit = request.max_completion_tokens or request.max_tokens or 256
        sample = bool(request.temperature)
        with lock, torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=limit,
                do_sample=sample,
                temperature=request.temperature if sample else None,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        new = out[0, ids.shape[1] :]
        eos = tokenizer.eos_token_id
        finished = eos is not None and len(new) > 0 and int(new[-1]) == eos
        return {
            "id": "chatcmpl-" + uuid.uuid4().hex,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)},
                    "finish_reason": "stop" if finished else "length",
                }
            ],
            "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(new), "total_tokens": ids.shape[1] + len(new)},
        }

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest) -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(None, generate, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "seed"}]}

    @app.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "alive"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="seed-article baseline server")
    parser.add_argument("--model", type=Path, required=True, help="local model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(args.model), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
