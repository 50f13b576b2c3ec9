"""A load generator for OpenAI-compatible chat servers, with vLLM's benchmark metrics.

It sends `/v1/chat/completions` requests (streaming, `stream_options.include_usage`) over loopback
and measures each one from the client side, the way vLLM's `benchmarks/benchmark_serving.py`
defines the numbers:

- **TTFT**: request sent -> first chunk that carries generated text. A role-only chunk (some
  servers send `{"role": "assistant", "content": ""}` before any token exists) does not count.
  A non-streaming (JSON) answer has TTFT = end-to-end latency and no TPOT/ITL.
- **ITL**: the gaps between successive text-bearing chunks after the first.
- **TPOT**: (e2e - TTFT) / (output_tokens - 1), per request, for requests with >1 output token.
- **E2E latency**: request sent -> last byte of the response.
- **request / output-token throughput**: completed requests and output tokens over the benchmark
  duration (first request sent -> last request finished).
- **goodput**: completed requests per second that met every given SLO (TTFT, TPOT, E2E).

Output tokens come from the response's `usage.completion_tokens` when the server sends it (in a
final usage chunk, on the finish chunk, or in the JSON body), else from the count of text chunks.

Arrivals: a Poisson process at `request_rate` (gamma intervals with `burstiness`, 1.0 = Poisson,
as in vLLM) or all at once (`inf`), optionally capped at `max_concurrency` in-flight requests -
`request_rate=inf, max_concurrency=N` is the fixed-concurrency mode. Runs are bounded: a request
count, a duration after which no new request starts, and a hard deadline after which in-flight
requests are cancelled (and counted as incomplete). Only loopback addresses are accepted.

While the benchmark runs, a separate thread polls a health URL (e.g. `/livez`) every 50 ms and
records its latency: the server's event-loop responsiveness under load. A probe in the load
generator's own loop records how late its timers fire, so client-side lag is visible too.

    .venv/bin/python bench/loadgen.py --base-url http://127.0.0.1:8000 --max-concurrency 16 --num-prompts 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import random
import statistics
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.http11 import LoopbackTransport

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
LIVEZ_INTERVAL_SECONDS = 0.05
LAG_PROBE_INTERVAL_SECONDS = 0.01

# Words for synthetic prompts. Deterministic given the seed; real-ish English so a real tokenizer
# yields roughly one token per word and the tiny test tokenizer a few.
_TEXT = """
    the operator turns one object into the workload that serves a language model a deployment runs
    inference server service sits in front of it and horizontal autoscaler scales on queue depth
    requests join running batch between decode steps leave when they are finished what is capital
    of france paris city on seine hello how are you today fine thank tell me story about cat dog
    once upon time there was small robot who liked to count numbers one two three four five
    readiness true only after loaded warmed false again while draining please explain why
"""
_WORDS = tuple(_TEXT.split())


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"refusing to send load to {host!r}: only loopback ({', '.join(sorted(LOOPBACK_HOSTS))}) is allowed")


# --- workload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    index: int
    prompt: str
    prompt_words: int
    max_tokens: int


def make_workload(n: int, seed: int, prompt_words: tuple[int, int], output_tokens: tuple[int, int], variant: int = 0) -> list[RequestSpec]:
    """`n` requests with prompt and output lengths drawn uniformly from the inclusive ranges.

    Another `variant` of a seed has the same lengths and other words: a repeated run is the same
    work, but none of its prompts is one a server with a prefix cache has read before.
    """
    rng = random.Random(seed)
    other_words = random.Random(f"{seed}/{variant}")
    specs: list[RequestSpec] = []
    for i in range(n):
        words = rng.randint(*prompt_words)
        chosen = [rng.choice(_WORDS) for _ in range(words)]  # drawn for every variant: the lengths after it stay
        if variant:
            chosen = [other_words.choice(_WORDS) for _ in range(words)]
        specs.append(RequestSpec(index=i, prompt=" ".join(chosen), prompt_words=words, max_tokens=rng.randint(*output_tokens)))
    return specs


# --- one request -----------------------------------------------------------------------------------


@dataclass
class RequestResult:
    index: int
    success: bool = False
    error: str = ""
    streamed: bool = True
    start: float = 0.0  # perf_counter when sent
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    tokens_from_usage: bool = False
    chunks: int = 0

    @property
    def tpot(self) -> float | None:
        if not self.streamed or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def _chat_body(model: str, spec: RequestSpec, stream: bool, temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "temperature": temperature,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _chunk_text(data: dict[str, Any]) -> str | None:
    """Text carried by a chat/completion chunk (None if it carries none)."""
    texts: list[str] = []
    for choice in data.get("choices") or []:
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        if text:
            texts.append(str(text))
    return "".join(texts) if texts else None


def _usage_tokens(data: dict[str, Any]) -> tuple[int, int | None] | None:
    usage = data.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        prompt = usage.get("prompt_tokens")
        return int(usage["completion_tokens"]), int(prompt) if prompt is not None else None
    return None


async def send_request(
    client: httpx.AsyncClient, base_url: str, model: str, spec: RequestSpec, *, stream: bool = True, temperature: float = 0.0
) -> RequestResult:
    result = RequestResult(index=spec.index, streamed=stream)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    result.start = start = time.perf_counter()
    last = start
    text_chunks = 0
    try:
        async with client.stream("POST", url, json=_chat_body(model, spec, stream, temperature)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            if "text/event-stream" not in response.headers.get("content-type", ""):
                # Non-streaming answer: nothing arrives before the whole completion.
                data = json.loads(await response.aread())
                result.e2e = result.ttft = time.perf_counter() - start
                result.streamed = False
                text = _chunk_text({"choices": [{"text": c.get("message", {}).get("content")} for c in data.get("choices", [])]})
                usage = _usage_tokens(data)
                if usage is not None:
                    result.output_tokens, result.prompt_tokens = usage
                    result.tokens_from_usage = True
                else:
                    result.output_tokens = 1 if text else 0
                result.success = True
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators, comments (":"), event names
                payload = line[5:].strip()
                if payload == "[DONE]":
                    continue  # read on to the body's end, so the connection can carry the next request
                now = time.perf_counter()
                data = json.loads(payload)
                result.chunks += 1
                if "error" in data and not data.get("choices"):
                    result.error = f"stream error: {json.dumps(data['error'])[:200]}"
                    return result
                if _chunk_text(data) is not None:
                    if text_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    text_chunks += 1
                    last = now
                usage = _usage_tokens(data)
                if usage is not None:
                    result.output_tokens, result.prompt_tokens = usage
                    result.tokens_from_usage = True
        result.e2e = time.perf_counter() - start
        if not result.tokens_from_usage:
            result.output_tokens = text_chunks
        if text_chunks == 0:
            result.ttft = result.e2e
        result.success = True
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# --- side probes -----------------------------------------------------------------------------------


class LivezPoller:
    """Polls a health URL every 50 ms from a process of its own (own connection), recording latency.

    Not a thread of the load generator: that thread would wait for the GIL the generator's event
    loop holds (half a core of Python at 32 streams), and the wait would be counted as the server's
    (a /livez p99 of 34 ms at 32 streams as a thread; see docs/benchmarks.md).
    """

    def __init__(self, url: str, interval: float = LIVEZ_INTERVAL_SECONDS) -> None:
        check_loopback(url)
        self.url = url
        self.interval = interval
        self.latencies: list[float] = []
        self.failures = 0
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_poll_livez, args=(url, interval, child), name="livez-poller", daemon=True)

    async def __aenter__(self) -> LivezPoller:
        await asyncio.to_thread(self._start)  # the child takes a second to import: not on the loop
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._stop)

    def _start(self) -> None:
        self._process.start()
        if not self._conn.poll(60) or self._conn.recv() != "ready":  # polling from the first request on
            raise RuntimeError("the /livez poller did not start")

    def _stop(self) -> None:
        self._conn.send("stop")
        if self._conn.poll(10):
            self.latencies, self.failures = self._conn.recv()
        self._process.join(timeout=5)


def _poll_livez(url: str, interval: float, conn: Connection) -> None:
    """The poller process: GET `url` every `interval` until told to stop, then send back what it measured."""
    latencies: list[float] = []
    failures = 0
    with httpx.Client(timeout=5.0) as client:
        conn.send("ready")
        next_at = time.perf_counter()
        while True:
            started = time.perf_counter()
            try:
                ok = client.get(url).status_code == 200
            except httpx.HTTPError:
                ok = False
            elapsed = time.perf_counter() - started
            if ok:
                latencies.append(elapsed)
            else:
                failures += 1
            next_at += interval
            if conn.poll(max(0.0, next_at - time.perf_counter())):
                break
            next_at = max(next_at, time.perf_counter() - interval)
    conn.send((latencies, failures))


async def _lag_probe(lags: list[float], stop: asyncio.Event) -> None:
    """How late this loop wakes from a 10 ms sleep: the load generator's own scheduling delay."""
    while not stop.is_set():
        before = time.perf_counter()
        await asyncio.sleep(LAG_PROBE_INTERVAL_SECONDS)
        lags.append(max(0.0, time.perf_counter() - before - LAG_PROBE_INTERVAL_SECONDS))


# --- the benchmark ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, r: RequestResult) -> bool:
        if self.ttft_ms is not None and r.ttft * 1000 > self.ttft_ms:
            return False
        tpot = r.tpot
        if self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms:
            return False
        return not (self.e2e_ms is not None and r.e2e * 1000 > self.e2e_ms)


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    model: str
    request_rate: float = math.inf  # requests/s (Poisson); inf = all at once
    max_concurrency: int | None = None  # in-flight cap; with rate=inf this is fixed concurrency
    burstiness: float = 1.0
    max_duration: float = 120.0  # no new request starts after this many seconds
    drain_timeout: float = 120.0  # in-flight requests get this long after max_duration
    seed: int = 0
    stream: bool = True
    temperature: float = 0.0
    livez_url: str | None = None
    slo: SLO = SLO()


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _dist_ms(values: Sequence[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values]
    return {
        "mean": statistics.fmean(ms) if ms else None,
        "p50": _pct(ms, 50),
        "p90": _pct(ms, 90),
        "p99": _pct(ms, 99),
        "max": max(ms) if ms else None,
        "n": len(ms),
    }


def summarize(results: list[RequestResult], duration: float, slo: SLO) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    good = sum(1 for r in ok if slo.met(r))
    tpots = [t for r in ok if (t := r.tpot) is not None]
    return {
        "completed": len(ok),
        "failed": sum(1 for r in results if not r.success and r.error != "incomplete"),
        "incomplete": sum(1 for r in results if r.error == "incomplete"),
        "errors": sorted({r.error for r in results if r.error and r.error != "incomplete"})[:5],
        "duration_s": duration,
        "total_output_tokens": output,
        "total_prompt_tokens": prompt,
        "tokens_from_usage": all(r.tokens_from_usage for r in ok) if ok else None,
        "streamed": all(r.streamed for r in ok) if ok else None,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": output / duration if duration > 0 else 0.0,
        "total_token_throughput": (output + prompt) / duration if duration > 0 else 0.0,
        "goodput": good / duration if duration > 0 else 0.0,
        "slo": asdict(slo),
        "ttft_ms": _dist_ms([r.ttft for r in ok]),
        "tpot_ms": _dist_ms(tpots),
        "itl_ms": _dist_ms([gap for r in ok for gap in r.itl]),
        "e2e_ms": _dist_ms([r.e2e for r in ok]),
    }


T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run the load generator's loop: uvloop's when it is installed (the server's own pin), else asyncio's.

    The client shares the machine with the server it measures. With 16 streams of the tiny model it
    spent 250 us of CPU per streamed token on asyncio's loop and 150 us on uvloop's (2 cores,
    docs/benchmarks.md): a third of a core handed back to the server under test.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def run_benchmark(config: LoadConfig, requests: Sequence[RequestSpec]) -> dict[str, Any]:
    """Send `requests` per `config`; return the summary (and per-request rows under `requests`)."""
    check_loopback(config.base_url)
    rng = random.Random(config.seed)
    slots = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency is not None else None
    results: list[RequestResult] = []
    tasks: list[asyncio.Task[RequestResult]] = []
    lags: list[float] = []
    stop_probe = asyncio.Event()
    probe = asyncio.create_task(_lag_probe(lags, stop_probe))
    poller = LivezPoller(config.livez_url) if config.livez_url else None
    cpu_before = time.process_time()
    # Our own wire (bench/http11.py): httpcore's cost per SSE event was taken from the server under test.
    transport = LoopbackTransport()
    async with httpx.AsyncClient(transport=transport) as client:

        async def one(spec: RequestSpec) -> RequestResult:
            try:
                return await send_request(client, config.base_url, config.model, spec, stream=config.stream, temperature=config.temperature)
            finally:
                if slots is not None:
                    slots.release()  # the slot was taken by the arrival loop below

        async with contextlib.AsyncExitStack() as stack:
            if poller is not None:
                await stack.enter_async_context(poller)
            start = time.perf_counter()
            for spec in requests:
                if time.perf_counter() - start > config.max_duration:
                    break
                if slots is not None:
                    # An arrival waits for a free in-flight slot; the next inter-arrival interval starts after it.
                    await slots.acquire()
                    if time.perf_counter() - start > config.max_duration:
                        slots.release()
                        break
                tasks.append(asyncio.create_task(one(spec)))
                if math.isfinite(config.request_rate):
                    theta = 1.0 / (config.request_rate * config.burstiness)
                    await asyncio.sleep(rng.gammavariate(config.burstiness, theta))
                else:
                    await asyncio.sleep(0)
            remaining = max(1.0, config.max_duration + config.drain_timeout - (time.perf_counter() - start))
            done, pending = await asyncio.wait(tasks, timeout=remaining) if tasks else (set(), set())
            for task in pending:
                task.cancel()
            for task in tasks:
                if task in done and not task.cancelled() and task.exception() is None:
                    results.append(task.result())
                else:
                    results.append(RequestResult(index=-1, error="incomplete"))
            ends = [r.start + r.e2e for r in results if r.success]
            duration = (max(ends) if ends else time.perf_counter()) - start
    stop_probe.set()
    await probe
    summary = summarize(results, duration, config.slo)
    summary["config"] = {
        "request_rate": None if math.isinf(config.request_rate) else config.request_rate,
        "max_concurrency": config.max_concurrency,
        "burstiness": config.burstiness,
        "max_duration_s": config.max_duration,
        "num_prompts": len(requests),
        "sent": len(tasks),
        "seed": config.seed,
        "stream": config.stream,
        "temperature": config.temperature,
    }
    summary["client_loop_lag_ms"] = _dist_ms(lags)
    summary["client_cpu_s"] = time.process_time() - cpu_before
    summary["connections_opened"] = transport.opened
    if poller is not None:
        summary["livez_ms"] = _dist_ms(poller.latencies) | {"failures": poller.failures}
    summary["requests"] = [
        {
            "index": r.index,
            "ok": r.success,
            "ttft_ms": round(r.ttft * 1000, 3),
            "e2e_ms": round(r.e2e * 1000, 3),
            "tpot_ms": None if r.tpot is None else round(r.tpot * 1000, 3),
            "output_tokens": r.output_tokens,
            "prompt_tokens": r.prompt_tokens,
            "chunks": r.chunks,
            "error": r.error or None,
        }
        for r in results
    ]
    return summary


# --- CLI -----------------------------------------------------------------------------------------


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    low, high = int(lo), int(hi or lo)
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"bad range {text!r}: want LOW:HIGH with 1 <= LOW <= HIGH")
    return low, high


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: first of GET /v1/models)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf: all at once)")
    parser.add_argument("--burstiness", type=float, default=1.0)
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--max-duration", type=float, default=120.0)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--prompt-words", type=_range, default=(16, 64), help="LOW:HIGH words per prompt")
    parser.add_argument("--output-tokens", type=_range, default=(32, 96), help="LOW:HIGH max_tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stream", action="store_true")
    parser.add_argument("--livez-path", default="/livez", help="health path to poll every 50 ms ('' = none)")
    parser.add_argument("--slo-ttft-ms", type=float, default=None)
    parser.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--slo-e2e-ms", type=float, default=None)
    parser.add_argument("--per-request", action="store_true", help="include per-request rows in the JSON")
    args = parser.parse_args(argv)
    check_loopback(args.base_url)
    model = args.model
    if model is None:
        with httpx.Client(timeout=10.0) as client:
            model = client.get(args.base_url.rstrip("/") + "/v1/models").json()["data"][0]["id"]
    config = LoadConfig(
        base_url=args.base_url,
        model=model,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        burstiness=args.burstiness,
        max_duration=args.max_duration,
        drain_timeout=args.drain_timeout,
        seed=args.seed,
        stream=not args.no_stream,
        livez_url=args.base_url.rstrip("/") + args.livez_path if args.livez_path else None,
        slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms),
    )
    workload = make_workload(args.num_prompts, args.seed, args.prompt_words, args.output_tokens)
    summary = run(run_benchmark(config, workload))
    if not args.per_request:
        summary.pop("requests")
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
