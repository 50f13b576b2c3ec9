"""The per-token SSE fast path renders exactly what the protocol models render; the handoff wakes the loop once per burst."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmservice_server.chunks import StreamChunks, sse
from llmservice_server.events import Delta, Done, Finished, TokenInfo
from llmservice_server.handoff import Handoff

texts = st.text(alphabet=st.characters(codec=None), max_size=40)  # surrogates, NUL, quotes, emoji
names = st.text(min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(text=texts, model=names, index=st.integers(0, 5), chat=st.booleans())
def test_fast_delta_is_the_model_rendering(text: str, model: str, index: int, chat: bool) -> None:
    chunks = StreamChunks(rid="chatcmpl-1", created=1700000000, model=model, chat=chat, logprobs=False)
    chunks.delta(Delta(index, "warm", []))  # the template is cached after the first use
    fast = chunks.delta(Delta(index, text, []))
    assert fast == sse(chunks.delta_payload(Delta(index, text, [])))
    payload = json.loads(fast.removeprefix("data: "))
    choice = payload["choices"][0]
    assert choice["index"] == index
    assert (choice["delta"]["content"] if chat else choice["text"]) == text
    assert payload["model"] == model


def test_chat_delta_shape_follows_openai() -> None:
    chunks = StreamChunks(rid="chatcmpl-1", created=5, model="m", chat=True, logprobs=False)
    payload = json.loads(chunks.delta(Delta(0, "hi", [])).removeprefix("data: "))
    assert payload == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None, "logprobs": None}],
        "usage": None,
    }
    role = json.loads(chunks.role(0).removeprefix("data: "))
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    end = json.loads(chunks.finished(Finished(0, "length", 3)).removeprefix("data: "))
    assert end["choices"][0]["finish_reason"] == "length" and end["choices"][0]["delta"] == {}
    usage = json.loads(chunks.usage(Done(4, 3, cached_tokens=2)).removeprefix("data: "))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 2}}


def test_completion_logprob_offsets_run_on_per_choice() -> None:
    chunks = StreamChunks(rid="cmpl-1", created=5, model="m", chat=False, logprobs=True)
    first = json.loads(chunks.delta(Delta(0, "ab", [TokenInfo("ab", -0.5, [])])).removeprefix("data: "))
    other = json.loads(chunks.delta(Delta(1, "x", [TokenInfo("x", -1.0, [])])).removeprefix("data: "))
    second = json.loads(chunks.delta(Delta(0, "c", [TokenInfo("c", -0.1, [])])).removeprefix("data: "))
    assert first["choices"][0]["logprobs"]["text_offset"] == [0]
    assert other["choices"][0]["logprobs"]["text_offset"] == [0]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]


@pytest.mark.asyncio
async def test_handoff_delivers_in_order_with_one_wakeup_per_burst() -> None:
    loop = asyncio.get_running_loop()
    wakeups = 0
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal wakeups
        wakeups += 1
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        handoff: Handoff[int] = Handoff(loop)
        queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(4)]

        def engine_step() -> None:  # one step feeding every request, posted from another thread
            for item in range(25):
                for queue in queues:
                    handoff.post(queue, item)

        thread = threading.Thread(target=engine_step)
        thread.start()
        thread.join()  # the loop did not run meanwhile: the whole burst is pending
        for queue in queues:
            assert [await asyncio.wait_for(queue.get(), 5) for _ in range(25)] == list(range(25))
        assert wakeups == 1
        handoff.post(queues[0], 99)  # the next burst schedules its own flush
        assert await asyncio.wait_for(queues[0].get(), 5) == 99
        assert wakeups == 2
    finally:
        loop.call_soon_threadsafe = original  # type: ignore[method-assign]
