"""The K/V budget end to end: a server whose K/V cache holds about 4 of 16 long rows serves all 16,
with the text a server without that limit gives, by preempting rows instead of failing them."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import openai

from .conftest import ServerProcess
from .test_engine_process import engine_pid
from .test_lifecycle import metric

PROMPTS = [f"Request {i}: tell me a long story about the number {i}" for i in range(16)]
MAX_TOKENS = 400
RSS_MARGIN = 128 * 2**20  # what a step allocates besides the pool (activations, logits) and the allocator keeps


async def completions(url: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    try:
        replies = await asyncio.gather(
            *(client.completions.create(model="tiny", prompt=p, max_tokens=MAX_TOKENS, temperature=0) for p in PROMPTS)
        )
    finally:
        await client.close()
    for reply in replies:
        assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS, reply
    return [reply.choices[0].text for reply in replies]


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_sixteen_long_rows_in_a_cache_for_four_all_finish_with_the_unlimited_text(
    server: ServerProcess, tiny_model_dir: Path, tmp_path: Path
) -> None:
    expected = asyncio.run(completions(server.url))
    # The tiny model's K/V is 512 bytes a token: 1 MiB holds 2048 tokens, about 4 of these rows.
    small = ServerProcess(tiny_model_dir, tmp_path / "small.log", max_num_seqs=16, max_queue=32, kv_cache_mib=1)
    try:
        small.wait_ready()
        engine = engine_pid(small)
        loaded_rss = rss(engine)
        samples: list[tuple[float, int]] = []  # (vllm:kv_cache_usage_perc, engine RSS) while the requests run
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                samples.append((metric(small, "vllm:kv_cache_usage_perc"), rss(engine)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            texts = asyncio.run(completions(small.url))
        finally:
            done.set()
            sampler.join()
        assert texts == expected  # no token lost, none repeated, none different
        assert metric(small, "vllm:num_preemptions_total") > 0
        assert samples, "no metrics sampled while the requests ran"
        assert max(usage for usage, _ in samples) <= 1.0
        assert max(usage for usage, _ in samples) > 0.5  # the samples saw a busy cache
        assert max(memory for _, memory in samples) - loaded_rss <= 2**20 + RSS_MARGIN
        assert metric(small, "vllm:kv_cache_usage_perc") == 0.0  # every block back once the requests are over
    finally:
        small.stop()
