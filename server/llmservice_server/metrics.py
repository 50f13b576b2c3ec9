"""Prometheus metrics of the inference server, on an explicit registry.

Names follow vLLM so dashboards and autoscalers written for vLLM work unchanged. Every metric
carries the label `model_name` (the served model name).

| name | type | meaning |
| --- | --- | --- |
| `vllm:num_requests_running` | gauge | requests with sequences in the running batch |
| `vllm:num_requests_waiting` | gauge | requests admitted and waiting for a batch slot |
| `vllm:time_to_first_token_seconds` | histogram | arrival to first generated token |
| `vllm:inter_token_latency_seconds` | histogram | time between tokens of one sequence |
| `vllm:e2e_request_latency_seconds` | histogram | arrival to last token (or abort) |
| `vllm:request_queue_time_seconds` | histogram | arrival to joining the batch |
| `vllm:prompt_tokens_total` | counter | prompt tokens prefilled |
| `vllm:generation_tokens_total` | counter | tokens generated |
| `vllm:prefix_cache_queries_total` | counter | prompt tokens looked up in the prefix cache |
| `vllm:prefix_cache_hits_total` | counter | of those, tokens found (their K/V copied, not computed) |
| `vllm:request_success_total` | counter | finished requests, label `finished_reason` = stop, length, abort |
| `vllm:kv_cache_usage_perc` | gauge | share of the K/V pool's blocks held by requests, 0..1 (vLLM's name; not a percent) |
| `vllm:num_preemptions_total` | counter | rows preempted for K/V blocks (their K/V is recomputed when they resume) |
| `llmservice:requests_rejected_total` | counter | requests refused, label `reason` = queue_full, draining, not_ready |
| `llmservice:model_load_seconds` | gauge | time to load and warm the model |

With more than one uvicorn worker each worker is a process with its own engine; prometheus-client's
multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`, set by `main()`) makes `/metrics` of any worker
report the sum over all of them (gauges: `livesum`, load time: `max`).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """All server metrics, bound to one model name, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry, model_name: str) -> None:
        self.registry = registry
        labels = ["model_name"]

        def gauge(name: str, doc: str, mode: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)  # type: ignore[arg-type]

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, registry=registry, buckets=buckets)

        self._running = gauge("vllm:num_requests_running", "Requests in the running batch.", "livesum").labels(model_name)
        self._waiting = gauge("vllm:num_requests_waiting", "Requests waiting for a batch slot.", "livesum").labels(model_name)
        self.model_load_seconds = gauge("llmservice:model_load_seconds", "Seconds to load and warm the model.", "max").labels(model_name)
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS).labels(
            model_name
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Time between consecutive tokens of a sequence.", TOKEN_BUCKETS
        ).labels(model_name)
        self._e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS).labels(model_name)
        self._queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to joining the batch.", LATENCY_BUCKETS).labels(model_name)
        self._prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens prefilled.").labels(model_name)
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.").labels(model_name)
        self._cache_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.").labels(model_name)
        self._cache_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.").labels(model_name)
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "Share of the K/V cache's blocks in use, 0..1.", "livemax").labels(
            model_name
        )
        self.preemptions = counter("vllm:num_preemptions", "Rows preempted for K/V cache blocks.").labels(model_name)
        self._success = Counter("vllm:request_success", "Finished requests by reason.", [*labels, "finished_reason"], registry=registry)
        self._rejected = Counter("llmservice:requests_rejected", "Refused requests by reason.", [*labels, "reason"], registry=registry)
        self._model_name = model_name

    def set_queue(self, *, running: int, waiting: int) -> None:
        self._running.set(running)
        self._waiting.set(waiting)

    def scheduled(self, queue_seconds: float, prompt_tokens: int) -> None:
        self._queue_time.observe(queue_seconds)
        self._prompt_tokens.inc(prompt_tokens)

    def prefix_cache_lookup(self, queried: int, hit: int) -> None:
        self._cache_queries.inc(queried)
        self._cache_hits.inc(hit)

    def finished(self, reason: str, e2e_seconds: float) -> None:
        self._success.labels(self._model_name, reason).inc()
        self._e2e.observe(e2e_seconds)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(self._model_name, reason).inc()

    def exposition(self) -> bytes:
        """The text format of all metrics (merged over worker processes in multiprocess mode)."""
        if multiprocess_dir() is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged)  # type: ignore[no-untyped-call]  # prometheus-client leaves it untyped
        return generate_latest(merged)
