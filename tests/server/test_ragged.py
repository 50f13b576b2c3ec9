"""The ragged forward on other attention layouts: sliding windows decode as transformers does, the rest is refused."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llmservice_server.engine import Engine
from llmservice_server.events import GenerationRequest, SamplingParams
from llmservice_server.loader import LoadedModel, load
from llmservice_server.settings import Settings

from .test_engine import run, start_engine

SIZE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2}


def mistral(vocab: int) -> Any:  # every layer sees only the last 6 tokens
    return MistralForCausalLM(MistralConfig(vocab_size=vocab, sliding_window=6, initializer_range=0.3, **SIZE))


def qwen2(vocab: int) -> Any:  # layer 0 full attention, layers 1-2 a window of 5
    config = Qwen2Config(vocab_size=vocab, use_sliding_window=True, sliding_window=5, max_window_layers=1, initializer_range=0.3, **SIZE)
    assert config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    return Qwen2ForCausalLM(config)


def gemma2(vocab: int) -> Any:  # soft-capped attention logits: SDPA cannot do that
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, head_dim=16, **SIZE))


def engine_with(tiny_model_dir: Path, build: Callable[[int], Any], **settings: Any) -> tuple[Engine, Any]:
    """An engine serving a random model of another architecture (with the tiny tokenizer); and a copy for reference."""
    references: list[Any] = []

    def loader(settings: Settings, stage: Callable[[str], None]) -> LoadedModel:
        loaded = load(settings, stage)
        torch.manual_seed(0)
        model = build(loaded.vocab_size).to(torch.float32).eval()
        with torch.no_grad():  # as in the tiny model: greedy never meets EOS, so lengths are exact
            model.lm_head.weight[sorted(loaded.eos_token_ids)] = 0.0
        references.append(copy.deepcopy(model))
        return dataclasses.replace(loaded, model=model)

    engine = Engine(Settings(model=str(tiny_model_dir), dtype="float32", **settings), loader=loader)
    engine.start()
    assert engine.wait_settled(60)
    return engine, references[0] if references else None


@pytest.mark.parametrize("build", [mistral, qwen2], ids=["mistral-window-6", "qwen2-full-then-window-5"])
@pytest.mark.parametrize("chunk", [512, 4], ids=["whole-prompts", "4-token-chunks"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused-forward", "transformers-forward"])
def test_sliding_window_models_decode_as_transformers_does(
    tiny_model_dir: Path, build: Callable[[int], Any], chunk: int, fused: bool
) -> None:
    engine, reference = engine_with(tiny_model_dir, build, max_num_seqs=4, prefill_chunk_tokens=chunk, fused_forward=fused)
    try:
        assert engine.ready, engine.error
        assert (engine.runner.decoder is not None) == fused
        prompts = [[5 + i for i in range(length)] for length in (3, 9, 14)]  # shorter and longer than the windows
        lengths = [20, 7, 12]
        greedy = SamplingParams(temperature=0.0)
        requests = [GenerationRequest(prompts=[p], max_tokens=[n], params=greedy) for p, n in zip(prompts, lengths, strict=True)]
        together = run(engine, requests, stagger=0.005)
    finally:
        engine.stop()
    tokenizer = engine.loaded.tokenizer
    with torch.inference_mode():
        for prompt, n, sink in zip(prompts, lengths, together, strict=True):
            generated = reference.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(prompt) :]
            assert sink.text() == tokenizer.decode(generated, skip_special_tokens=True)


def test_attention_the_engine_cannot_batch_is_refused_at_load(tiny_model_dir: Path) -> None:
    engine, _ = engine_with(tiny_model_dir, gemma2)
    try:
        assert engine.stage == "failed"
        assert engine.error is not None and "softcap" in engine.error
    finally:
        engine.stop()


def test_the_kv_pool_is_allocated_once_and_requests_give_its_blocks_back(tiny_model_dir: Path) -> None:
    engine = start_engine(tiny_model_dir, max_num_seqs=4, kv_cache_mib=1)
    try:
        cache = engine.scheduler.cache
        assert cache is not None
        storage = [t.data_ptr() for t in cache.layers]
        assert cache.nbytes <= 2**20 and engine.pool.usage() == 0.0
        run(engine, [GenerationRequest(prompts=[[5, 6, 7]], max_tokens=[40], params=SamplingParams(temperature=0.0))] * 3)
        assert engine.scheduler.cache is cache and [t.data_ptr() for t in cache.layers] == storage  # never regrown
        assert engine.pool.usage() == 0.0  # every block back (some still findable in the prefix cache)
    finally:
        engine.stop()
