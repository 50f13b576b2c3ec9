"""Failures stay as small as they are, with the engine's own fused forward running (faults injected
inside it, not by wrapping the model, which would turn the fused forward off)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prometheus_client import CollectorRegistry
from torch import nn

from llmservice_server.engine import Engine
from llmservice_server.events import Failed, GenerationRequest
from llmservice_server.loader import LoadedModel, load
from llmservice_server.metrics import Metrics
from llmservice_server.settings import Settings

from .test_engine import GREEDY, Collector, run, start_engine, started

TABLE = 256  # positions in the fused decoder's first rotary table: a row passing them makes it ask for more


class FaultyRotary(nn.Module):
    """The model's rotary module, except when asked for positions past the first table: then `fault()` runs first."""

    def __init__(self, rotary: nn.Module, fault: Callable[[], None]) -> None:
        super().__init__()
        self.rotary = rotary
        self.rope_type = getattr(rotary, "rope_type", "default")
        self.fault = fault

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> Any:
        if positions.shape[-1] > TABLE:
            self.fault()
        return self.rotary(x, positions)


def faulty_engine(tiny_model_dir: Path, fault: Callable[[], None], metrics: Metrics | None = None, **settings: Any) -> Engine:
    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        loaded = load(settings, stage)
        inner = loaded.model.model
        inner.rotary_emb = FaultyRotary(inner.rotary_emb, fault)
        return dataclasses.replace(loaded, eos_token_ids=frozenset())  # every row runs to max_tokens

    engine = Engine(Settings(model=str(tiny_model_dir), dtype="float32", **settings), metrics, loader=loader)
    engine.start()
    assert engine.wait_settled(60) and engine.ready, engine.error
    assert engine.runner.decoder is not None  # the fused forward runs
    return engine


def test_a_newcomer_whose_prompt_fails_fails_alone_in_the_fused_forward(tiny_model_dir: Path) -> None:
    engine = start_engine(tiny_model_dir)
    try:
        assert engine.runner.decoder is not None
        running = started(engine, GenerationRequest(prompts=[[5, 6]], max_tokens=[300], params=GREEDY))
        vocab = engine.loaded.model.get_input_embeddings().weight.shape[0]
        (bad,) = run(engine, [GenerationRequest(prompts=[[5, vocab + 7, 6]], max_tokens=[5], params=GREEDY)])  # no such token
        assert bad.events == [Failed("internal", "internal error while reading the prompt")]
        assert running.done.wait(60)
        assert running.finish().completion_tokens == 300 and not any(isinstance(e, Failed) for e in running.events)
        (after,) = run(engine, [GenerationRequest(prompts=[[5, 6]], max_tokens=[300], params=GREEDY)])
        assert after.text() == running.text()  # the failure left nothing behind in the rows' K/V
    finally:
        engine.stop()


def test_an_error_that_poisons_the_device_fails_the_engine(tiny_model_dir: Path) -> None:
    def poison() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine = faulty_engine(tiny_model_dir, poison)
    try:
        sink = Collector()
        engine.submit(GenerationRequest(prompts=[[5, 6]], max_tokens=[400], params=GREEDY), sink)
        assert engine.wait_ended(60)  # what the server waits on before it exits non-zero
        assert engine.stage == "failed" and engine.error is not None and "illegal memory access" in engine.error
        assert sink.done.wait(10) and sink.events[-1] == Failed("internal", "internal error: the engine failed")
        assert not engine.alive() and not engine.ready  # /livez and /readyz: 503
    finally:
        engine.stop()


def test_out_of_memory_in_a_step_preempts_a_row_and_every_row_completes(tiny_model_dir: Path) -> None:
    reference = start_engine(tiny_model_dir)
    requests = [GenerationRequest(prompts=[[5 + i, 6]], max_tokens=[300], params=GREEDY) for i in range(4)]
    try:
        expected = [sink.text() for sink in run(reference, requests)]
    finally:
        reference.stop()
    failures = [1]

    def out_of_memory_once() -> None:
        if failures:
            failures.pop()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    metrics = Metrics(CollectorRegistry(), "tiny")
    engine = faulty_engine(tiny_model_dir, out_of_memory_once, metrics)
    try:
        sinks = run(engine, requests)
    finally:
        engine.stop()
    assert not failures  # it happened
    assert [sink.text() for sink in sinks] == expected
    assert metrics.preemptions._value.get() == 1


def test_a_step_longer_than_the_step_timeout_makes_the_engine_not_alive(tiny_model_dir: Path) -> None:
    release = threading.Event()
    engine = faulty_engine(tiny_model_dir, lambda: release.wait(30), step_timeout_seconds=0.3)
    try:
        assert engine.alive()
        sink = Collector()
        engine.submit(GenerationRequest(prompts=[[5, 6]], max_tokens=[300], params=GREEDY), sink)
        deadline = time.monotonic() + 30
        while engine.alive():  # the row reaches the hanging step, and 0.3 s later the engine is not alive
            assert time.monotonic() < deadline, "a hung step never showed"
            time.sleep(0.02)
        release.set()
        assert sink.done.wait(60) and sink.finish().completion_tokens == 300
        assert engine.alive()
    finally:
        release.set()
        engine.stop()
