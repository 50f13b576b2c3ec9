"""The seed article's design, as the naive baseline: one `model.generate` per request.

Two designs from the article (../shared/seed/fastapi-llm-article.txt), chosen with `--design`:

- `article` (default), its streaming endpoint as written: every request starts its own
  `threading.Thread(target=model.generate, kwargs=...)` with a `TextIteratorStreamer`, and the
  response's async generator iterates that streamer with a plain `for` loop, which blocks the event
  loop while it waits for the next piece of text, with an `await asyncio.sleep(0)` after each piece.
  No lock: concurrent requests run concurrent `generate` calls on the same model. A non-streaming
  request calls `model.generate` right in the async handler, as the article's
  `non_stream_generate` does.
- `locked`: the article's "run it in the threadpool" advice made safe: the handler hands the whole
  request to `run_in_executor`, a lock serializes the `generate` calls, and nothing is sent until
  the completion is done (a non-streaming answer even when `stream` is asked for). This is kinder to
  the machine than the design as written and is reported beside it.

Three things differ from the article on purpose, so that the systems are measured alike: the
prompt is the tokenizer's chat template (the article hand-writes Llama-2's `[INST]` format), the
last streamed chunk carries `usage` (the article's carries none, and the streamer emits words,
not tokens, so the load generator could not count tokens), and `/livez` and `/v1/models` exist.
It is OpenAI-compatible only as far as the load generator needs and is not part of the product.

    .venv/bin/python bench/baselines/seed_server.py --model /path/to/model-dir --port 8001 [--design locked]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


class Message(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    stream: bool = False


def create_app(model_dir: Path, design: str, device: str = "cpu", dtype: str = "float32") -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()  # type: ignore[no-untyped-call]  # untyped in transformers
    model.to(device)
    name = model_dir.name
    lock = threading.Lock()
    app = FastAPI()

    def inputs(request: ChatRequest) -> tuple[torch.Tensor, dict[str, Any]]:
        messages = [m.model_dump() for m in request.messages]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(str(text), add_special_tokens=False, return_tensors="pt").input_ids.to(model.device)
        sample = bool(request.temperature)
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "max_new_tokens": request.max_completion_tokens or request.max_tokens or 256,
            "do_sample": sample,
            "temperature": request.temperature if sample else None,
            "top_p": None,
            "top_k": None,
            "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id,
        }
        return ids, kwargs

    def completion(ids: torch.Tensor, out: torch.Tensor, stream: bool) -> dict[str, Any]:
        new = out[0, ids.shape[1] :]
        eos = tokenizer.eos_token_id
        finished = eos is not None and len(new) > 0 and int(new[-1]) == eos
        usage = {"prompt_tokens": ids.shape[1], "completion_tokens": len(new), "total_tokens": ids.shape[1] + len(new)}
        reason = "stop" if finished else "length"
        base = {"id": "chatcmpl-" + uuid.uuid4().hex, "created": int(time.time()), "model": name, "usage": usage}
        if stream:
            return base | {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}
        text = tokenizer.decode(new, skip_special_tokens=True)
        message = {"role": "assistant", "content": text}
        return base | {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": reason}]}

    def locked_generate(request: ChatRequest) -> dict[str, Any]:
        ids, kwargs = inputs(request)
        with lock, torch.inference_mode():
            out = model.generate(**kwargs)
        return completion(ids, out, stream=False)

    async def article_stream(request: ChatRequest) -> AsyncIterator[str]:
        ids, kwargs = inputs(request)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, torch.Tensor] = {}

        def run() -> None:  # the article's Thread(target=model.generate); kept here for `usage`
            result["out"] = model.generate(**kwargs, streamer=streamer)

        thread = threading.Thread(target=run)
        thread.start()
        rid, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        for text in streamer:  # blocks the event loop until the next piece of text, as written
            if text:
                chunk = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": name,
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                }
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                await asyncio.sleep(0)
        thread.join()
        yield f"data: {json.dumps(completion(ids, result['out'], stream=True))}\n\n"
        yield "data: [DONE]\n\n"

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: ChatRequest) -> dict[str, Any] | StreamingResponse:
        if design == "locked":
            return await asyncio.get_running_loop().run_in_executor(None, locked_generate, request)
        if request.stream:
            return StreamingResponse(article_stream(request), media_type="text/event-stream")
        ids, kwargs = inputs(request)
        with torch.no_grad():
            out = model.generate(**kwargs)  # on the event loop, as the article's non_stream_generate
        return completion(ids, out, stream=False)

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
    parser.add_argument("--design", choices=["article", "locked"], default="article")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.model, args.design, args.device, args.dtype), host=args.host, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
