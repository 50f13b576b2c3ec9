"""The batching engine in-process: batched greedy == sequential greedy, EOS, cancel, timeout."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForCausalLM

from llmservice_server.engine import Engine, Ticket
from llmservice_server.engine.kv_blocks import BLOCK_TOKENS
from llmservice_server.events import Delta, Done, Event, Failed, Finished, GenerationRequest, SamplingParams
from llmservice_server.loader import LoadedModel, load
from llmservice_server.metrics import Metrics
from llmservice_server.ragged import ATTENTION, RaggedStep
from llmservice_server.settings import Settings
from llmservice_server.threads import EXPLORE_EVERY, FIRST_STEPS

GREEDY = SamplingParams(temperature=0.0)
TEXTS = [
    "Hello",
    "What is the capital of France? The capital",
    "Once upon a time there was a small robot who liked",
    "A",
    "Readiness is true only after the model is loaded and warmed, and false again while draining.",
]


class Collector:
    """A sink that records events and signals when the request is over."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()

    def __call__(self, events: list[Event]) -> None:
        self.events.extend(events)
        if any(isinstance(e, Done | Failed) for e in events):
            self.done.set()

    def text(self, index: int = 0) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta) and e.index == index)

    def finish(self, index: int = 0) -> Finished:
        return next(e for e in self.events if isinstance(e, Finished) and e.index == index)


def start_engine(model_dir: Path, loader: Callable[[Settings, Callable[[str], None]], LoadedModel] = load, **settings: Any) -> Engine:
    engine = Engine(Settings(model=str(model_dir), dtype="float32", **settings), loader=loader)
    engine.start()
    deadline = time.monotonic() + 60
    while not engine.ready:
        assert engine.stage != "failed", engine.error
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return engine


def run(engine: Engine, requests: list[GenerationRequest], stagger: float = 0.0) -> list[Collector]:
    sinks = []
    for request in requests:
        sink = Collector()
        engine.submit(request, sink)
        sinks.append(sink)
        time.sleep(stagger)
    for sink in sinks:
        assert sink.done.wait(60)
    return sinks


# 512: every prompt here is read in one forward; 8: in chunks of 8 padded tokens between decode steps.
@pytest.fixture(scope="module", params=[512, 8], ids=["whole-prompts", "8-token-prefill-chunks"])
def engine(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Any:
    engine = start_engine(tiny_model_dir, max_num_seqs=8, prefill_chunk_tokens=request.param)
    yield engine
    engine.stop()


def test_batched_greedy_equals_sequential_greedy(engine: Engine, tiny_model_dir: Path) -> None:
    tokenizer = engine.loaded.tokenizer
    # Every step runs through the ragged attention (running rows and prompt chunks in one forward).
    assert engine.loaded.model.config._attn_implementation == ATTENTION
    prompts = [list(tokenizer(t, add_special_tokens=False).input_ids) for t in TEXTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all different lengths: real padding
    requests = [GenerationRequest(prompts=[p], max_tokens=[48], params=GREEDY) for p in prompts]
    # Staggered submission: later requests are spliced into a batch that is already decoding.
    batched = run(engine, requests, stagger=0.01)
    sequential = [run(engine, [r])[0] for r in requests]
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    for prompt, together, alone in zip(prompts, batched, sequential, strict=True):
        generated = reference.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt) :]
        expected = tokenizer.decode(generated, skip_special_tokens=True)
        assert together.text() == alone.text() == expected
        assert together.finish().completion_tokens == 48
    # The prompts were read before, so the sequential runs began from the prefix cache (whole
    # blocks, one token always left to read): cached K/V give the reference's tokens too.
    cached = [next(e for e in alone.events if isinstance(e, Done)).cached_tokens for alone in sequential]
    assert cached == [(len(p) - 1) // BLOCK_TOKENS * BLOCK_TOKENS for p in prompts] and max(cached) > 0


def test_n_rows_share_a_prompt_and_count_usage(engine: Engine) -> None:
    request = GenerationRequest(prompts=[[5, 6, 7], [8]], max_tokens=[5, 7], params=GREEDY, n=2)
    (sink,) = run(engine, [request])
    done = next(e for e in sink.events if isinstance(e, Done))
    assert done == Done(prompt_tokens=4, completion_tokens=2 * 5 + 2 * 7)
    assert sink.text(0) == sink.text(1) and sink.text(2) == sink.text(3)


def test_eos_finishes_with_stop(tiny_model_dir: Path) -> None:
    # Declare the first greedy token of the prompt to be EOS: the row must stop right there.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        token_id = int(reference(torch.tensor([[5, 6, 7]])).logits[0, -1].argmax())

    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        return dataclasses.replace(load(settings, stage), eos_token_ids=frozenset({token_id}))

    engine = start_engine(tiny_model_dir, loader=loader)
    try:
        (sink,) = run(engine, [GenerationRequest(prompts=[[5, 6, 7]], max_tokens=[10], params=GREEDY)])
    finally:
        engine.stop()
    assert sink.finish() == Finished(0, "stop", 1)
    assert sink.text() == ""


def test_cancel_and_timeout_leave_the_batch(engine: Engine) -> None:
    long = GenerationRequest(prompts=[[5, 6]], max_tokens=[1500], params=GREEDY)
    sink = Collector()
    ticket: Ticket = engine.submit(long, sink)
    deadline = time.monotonic() + 10
    while not sink.events and time.monotonic() < deadline:
        time.sleep(0.01)
    ticket.cancel()
    # The engine stays usable and the cancelled request never finishes normally.
    (after,) = run(engine, [GenerationRequest(prompts=[[5]], max_tokens=[3], params=GREEDY)])
    assert after.finish().completion_tokens == 3
    assert not any(isinstance(e, Done) for e in sink.events)

    timed = Collector()
    engine.submit(dataclasses.replace(long, timeout=0.2), timed)
    assert timed.done.wait(30)
    failure = timed.events[-1]
    assert isinstance(failure, Failed) and failure.kind == "timeout"


def test_seeded_sampling_is_reproducible_in_a_batch(engine: Engine) -> None:
    sampled = SamplingParams(temperature=1.0, top_p=0.9, seed=11)
    alone = run(engine, [GenerationRequest(prompts=[[5, 6, 7]], max_tokens=[20], params=sampled)])[0].text()
    crowd = [GenerationRequest(prompts=[[9, 10]], max_tokens=[30], params=SamplingParams(temperature=1.0)) for _ in range(3)]
    together = run(engine, [*crowd, GenerationRequest(prompts=[[5, 6, 7]], max_tokens=[20], params=sampled)])
    assert together[-1].text() == alone


POISON = 7  # a token id whose prefill the faulty model refuses


class FaultyModel:
    """The real model, except: a step reading a prompt that holds POISON fails; `fail_decode` fails one step of running rows."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.fail_decode = threading.Event()

    def __getattr__(self, name: str) -> Any:  # config, set_attn_implementation, ...
        return getattr(self.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        step: RaggedStep = kwargs["ragged"]
        prompt_tokens = kwargs["input_ids"][0, step.rows :]  # packed after one decode token per running row
        if bool((prompt_tokens == POISON).any()):
            raise RuntimeError("poisoned prompt")
        if step.rows and self.fail_decode.is_set():
            self.fail_decode.clear()
            raise RuntimeError("decode step failed")
        return self.model(**kwargs)


@pytest.fixture
def faulty(tiny_model_dir: Path) -> Any:
    models: list[FaultyModel] = []

    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        loaded = load(settings, stage)
        models.append(FaultyModel(loaded.model))
        return dataclasses.replace(loaded, model=models[-1])

    engine = start_engine(tiny_model_dir, loader=loader)
    yield engine, models[0]
    engine.stop()


def started(engine: Engine, request: GenerationRequest) -> Collector:
    sink = Collector()
    engine.submit(request, sink)
    deadline = time.monotonic() + 30
    while not sink.events:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)
    return sink


def test_a_failing_prefill_fails_only_its_own_request(faulty: Any) -> None:
    engine, _ = faulty
    running = started(engine, GenerationRequest(prompts=[[5, 6]], max_tokens=[300], params=GREEDY))
    (bad,) = run(engine, [GenerationRequest(prompts=[[5, POISON, 6]], max_tokens=[5], params=GREEDY)])
    assert bad.events == [Failed("internal", "internal error while reading the prompt")]
    assert not running.done.is_set()  # it was in the batch while the newcomer failed
    assert running.done.wait(60)
    assert running.finish().completion_tokens == 300
    assert not any(isinstance(e, Failed) for e in running.events)


def test_a_failing_decode_step_fails_the_batch_and_the_engine_goes_on(faulty: Any) -> None:
    engine, model = faulty
    victims = [started(engine, GenerationRequest(prompts=[[5, 8 + i]], max_tokens=[1000], params=GREEDY)) for i in range(2)]
    model.fail_decode.set()
    for victim in victims:
        assert victim.done.wait(30)
        assert victim.events[-1] == Failed("internal", "internal error while generating")
    assert engine.ready and engine.alive()
    (after,) = run(engine, [GenerationRequest(prompts=[[5, 6]], max_tokens=[3], params=GREEDY)])
    assert after.finish().completion_tokens == 3


@pytest.mark.parametrize(("chunk", "interleaved"), [(16, True), (4096, False)])
def test_running_streams_keep_decoding_while_a_long_prompt_is_read(tiny_model_dir: Path, chunk: int, interleaved: bool) -> None:
    engine = start_engine(tiny_model_dir, max_num_seqs=4, prefill_chunk_tokens=chunk)
    try:
        timeline: list[tuple[str, Event]] = []  # appended by the engine thread, in the order it emits

        def sink(name: str, collector: Collector) -> Callable[[list[Event]], None]:
            def record(events: list[Event]) -> None:
                timeline.extend((name, e) for e in events)
                collector(events)

            return record

        running, newcomer = Collector(), Collector()
        engine.submit(GenerationRequest(prompts=[[5, 6, 7]], max_tokens=[300], params=GREEDY), sink("running", running))
        deadline = time.monotonic() + 30
        while not any(isinstance(e, Finished | Delta) for e in running.events):
            assert time.monotonic() < deadline
            time.sleep(0.001)
        long_prompt = [10 + i % 400 for i in range(800)]  # 800 tokens: 50 chunks of 16
        engine.submit(GenerationRequest(prompts=[long_prompt], max_tokens=[1], params=GREEDY), sink("newcomer", newcomer))
        assert newcomer.done.wait(60) and running.done.wait(60)
        first_newcomer = next(i for i, (name, _) in enumerate(timeline) if name == "newcomer")
        running_before = sum(1 for name, _ in timeline[:first_newcomer] if name == "running")
        # Read in one forward, the prompt stalls the running stream (it had emitted a token or two
        # when the newcomer arrived); read in 50 chunks, about 50 decode steps go on in between.
        assert (running_before > 30) is interleaved, running_before
    finally:
        engine.stop()


@pytest.mark.parametrize("prefix_cache_mib", [128, 0], ids=["cache", "no-cache"])
def test_a_prompt_that_begins_like_an_earlier_one_reads_only_the_rest(tiny_model_dir: Path, prefix_cache_mib: int) -> None:
    recorders: list[ThreadRecorder] = []

    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        loaded = load(settings, stage)
        recorders.append(ThreadRecorder(loaded.model))
        return dataclasses.replace(loaded, model=recorders[-1])

    shared = [10 + i for i in range(2 * BLOCK_TOKENS + 3)]  # a "system prompt": two whole blocks and some
    first, second = [*shared, 200, 201, 202], [*shared, 300, 301]
    engine = start_engine(tiny_model_dir, loader=loader, prefix_cache_mib=prefix_cache_mib)
    try:
        (earlier,) = run(engine, [GenerationRequest(prompts=[first], max_tokens=[8], params=GREEDY)])
        recorders[0].steps.clear()
        (later,) = run(engine, [GenerationRequest(prompts=[second], max_tokens=[24], params=GREEDY)])
    finally:
        engine.stop()
    cached = 2 * BLOCK_TOKENS if prefix_cache_mib else 0
    assert next(e for e in earlier.events if isinstance(e, Done)).cached_tokens == 0
    assert next(e for e in later.events if isinstance(e, Done)) == Done(len(second), completion_tokens=24, cached_tokens=cached)
    assert recorders[0].steps[0][0] == len(second) - cached  # its prompt's forward read only the rest
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    generated = reference.generate(torch.tensor([second]), max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, len(second) :]
    assert later.text() == engine.loaded.tokenizer.decode(generated, skip_special_tokens=True)


class ThreadRecorder:
    """The real model, recording each step's token count and the CPU threads torch had for it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.steps: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        self.steps.append((int(kwargs["input_ids"].shape[1]), torch.get_num_threads()))
        return self.model(**kwargs)


@pytest.mark.parametrize(("torch_threads", "large_step_threads"), [(0, 2), (1, 1)], ids=["per-step", "fixed"])
def test_torch_gets_every_core_only_for_large_steps(tiny_model_dir: Path, torch_threads: int, large_step_threads: int) -> None:
    recorders: list[ThreadRecorder] = []

    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        loaded = load(settings, stage)
        recorders.append(ThreadRecorder(loaded.model))
        return dataclasses.replace(loaded, model=recorders[-1])

    # Two cores; hidden size 64: a step is large from ceil(2.5e6 / 64**2) = 611 tokens.
    engine = start_engine(tiny_model_dir, loader=loader, cpus=2, torch_threads=torch_threads, prefill_chunk_tokens=1024)
    try:
        assert engine.loaded.threads is not None and engine.loaded.threads.min_tokens == (611 if not torch_threads else 1)
        recorder = recorders[0]
        recorder.steps.clear()
        long_prompt = [10 + i % 400 for i in range(700)]
        run(engine, [GenerationRequest(prompts=[long_prompt], max_tokens=[3], params=GREEDY)])
    finally:
        engine.stop()
    assert recorder.steps[0] == (700, large_step_threads)  # the prompt, read in one step
    assert recorder.steps[1:] == [(1, 1), (1, 1)]  # its decode steps leave a core to HTTP


class SlowOnOneThread(ThreadRecorder):
    """A CPU where a step the engine gives one thread takes 10 ms longer (the plan's guess for small steps
    is wrong there). The model itself runs on one thread either way, so only that difference counts."""

    def __call__(self, **kwargs: Any) -> Any:
        chosen = torch.get_num_threads()
        self.steps.append((int(kwargs["input_ids"].shape[1]), chosen))
        if chosen == 1:
            time.sleep(0.01)
        torch.set_num_threads(1)
        try:
            return self.model(**kwargs)
        finally:
            torch.set_num_threads(chosen)


def test_the_engine_moves_each_step_size_to_the_thread_count_it_measured_faster(tiny_model_dir: Path) -> None:
    recorders: list[ThreadRecorder] = []

    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        loaded = load(settings, stage)
        recorders.append(SlowOnOneThread(loaded.model))
        return dataclasses.replace(loaded, model=recorders[-1], eos_token_ids=frozenset())  # every row runs to max_tokens

    engine = start_engine(tiny_model_dir, loader=loader, cpus=2)
    try:
        recorder = recorders[0]
        recorder.steps.clear()
        run(engine, [GenerationRequest(prompts=[[10, 11, 12]], max_tokens=[3 * EXPLORE_EVERY], params=GREEDY)])
    finally:
        engine.stop()
    decode = [threads for tokens, threads in recorder.steps if tokens == 1]
    assert len(decode) == 3 * EXPLORE_EVERY - 1  # the first token comes from the prompt's step
    assert decode[:FIRST_STEPS] == [1] * FIRST_STEPS  # the plan: a one-token step leaves a core to HTTP
    assert decode[FIRST_STEPS : 2 * FIRST_STEPS] == [2] * FIRST_STEPS  # then two threads, timed ...
    assert decode[2 * FIRST_STEPS :].count(1) <= 1  # ... were faster here: one thread is only re-timed now and then


class UsageRecorder:
    """The real model, recording the K/V pool's usage at every step (read by the engine thread itself)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.engine: Engine | None = None
        self.usage: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, **kwargs: Any) -> Any:
        if self.engine is not None:
            self.usage.append(self.engine.pool.usage())
        return self.model(**kwargs)


def test_a_full_kv_pool_preempts_and_resumes_rows_with_the_text_they_would_have_had(tiny_model_dir: Path) -> None:
    # Tiny model: 512 bytes of K/V per token, 1 MiB = 2048 tokens; 16 rows of ~500 tokens need 4 times that.
    prompts = [[10 + i, 20 + i % 5, 30 + i % 3] for i in range(16)]
    requests = [GenerationRequest(prompts=[p], max_tokens=[500], params=GREEDY) for p in prompts]
    free = start_engine(tiny_model_dir, max_num_seqs=16)
    try:
        expected = [sink.text() for sink in run(free, requests)]
    finally:
        free.stop()
    recorders: list[UsageRecorder] = []

    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        loaded = load(settings, stage)
        recorders.append(UsageRecorder(loaded.model))
        return dataclasses.replace(loaded, model=recorders[-1])

    # The transformers forward here (the recorder wraps the model); the fused one below.
    for fused_loader, fused in ((loader, False), (load, True)):
        metrics = Metrics(CollectorRegistry(), "tiny")
        engine = Engine(Settings(model=str(tiny_model_dir), dtype="float32", max_num_seqs=16, kv_cache_mib=1), metrics, loader=fused_loader)
        engine.start()
        assert engine.wait_settled(60) and engine.ready, engine.error
        if not fused:
            recorders[0].engine = engine
        try:
            assert (engine.runner.decoder is not None) == fused
            assert engine.pool.total * BLOCK_TOKENS == 2048
            sinks = run(engine, requests)
        finally:
            engine.stop()
        assert [sink.text() for sink in sinks] == expected  # no token lost, none repeated, none different
        assert all(sink.finish().completion_tokens == 500 for sink in sinks)
        assert all(next(e for e in sink.events if isinstance(e, Done)).completion_tokens == 500 for sink in sinks)
        assert metrics.preemptions._value.get() > 0
    usage = recorders[0].usage
    assert max(usage) <= 1.0 and max(usage) > 0.9  # full, never over
