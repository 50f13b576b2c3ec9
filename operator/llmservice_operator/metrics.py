"""The operator's own Prometheus metrics, on a registry passed in (never the global one)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reconciles = Counter(
            "llmservice_operator_reconciles",
            "Reconciles of LLMServices by result (applied, unchanged, invalid, conflict, waiting, retry, gone).",
            ["result"],
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "llmservice_operator_reconcile_duration_seconds",
            "Wall time of one reconcile of one LLMService.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.api_requests = Counter(
            "llmservice_operator_api_requests",
            "Requests to the Kubernetes API server by verb and HTTP status code.",
            ["verb", "code"],
            registry=registry,
        )
        self.cold_start = Histogram(
            "llmservice_operator_cold_start_seconds",
            "Seconds of each phase of a replica's cold start (scheduling, image, fetch, load, warmup, other, total), "
            "observed once per pod when it first becomes ready.",
            ["phase"],
            buckets=(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0),
            registry=registry,
        )
        self.stored_objects = Gauge(
            "llmservice_operator_stored_objects",
            "Objects held in the operator's in-memory store, by kind.",
            ["kind"],
            registry=registry,
        )
        self.leader = Gauge(
            "llmservice_operator_leader",
            "1 while this operator process holds the leader Lease and reconciles (always 1 without leader election).",
            registry=registry,
        )
