"""Loading: weights placed by from_pretrained on a GPU, and a model too large refused before its weights are read."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from llmservice_server.engine import Engine
from llmservice_server.loader import load_kwargs
from llmservice_server.settings import Settings

from .conftest import build_tiny_model


def test_on_a_gpu_weights_are_read_onto_the_device_not_into_host_memory_first(tiny_model_dir: Path) -> None:
    settings = Settings(model=str(tiny_model_dir))
    assert load_kwargs(settings, torch.device("cuda", 1), None) == {"device_map": {"": 1}}
    assert load_kwargs(settings, torch.device("cuda", 1), "model.gguf") == {}  # GGUF: dequantized on the host
    assert load_kwargs(settings, torch.device("cpu"), None) == {}
    # The same keyword on the CPU: transformers (with accelerate) takes it and places every weight.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, device_map={"": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_a_context_no_memory_could_hold_is_refused_before_the_weights_are_read(tiny_model_dir: Path) -> None:
    # 2**40 tokens of 512 bytes of K/V: 512 TiB for one sequence; the check runs on the config alone.
    engine = Engine(Settings(model=str(tiny_model_dir), dtype="float32", max_model_len=2**40))
    engine.start()
    try:
        assert engine.wait_settled(60)
        assert engine.stage == "failed" and engine.error is not None
        assert engine.error.startswith("DoesNotFit: the model does not fit on cpu: weights 0.00 GiB + K/V 524288.00 GiB"), engine.error
    finally:
        engine.stop()


def test_a_kv_cache_too_small_for_one_sequence_is_refused_naming_the_context_that_fits(tmp_path: Path) -> None:
    # Four layers: 1 KiB of K/V per token, so 1 MiB holds 1024 tokens; the model's context is 2048.
    model_dir = build_tiny_model(tmp_path / "four-layers", layers=4)
    engine = Engine(Settings(model=str(model_dir), dtype="float32", kv_cache_mib=1))
    engine.start()
    try:
        assert engine.wait_settled(60)
        assert engine.stage == "failed" and engine.error is not None
        assert "--max-model-len 2048 does not fit; the largest --max-model-len that fits is 1024" in engine.error, engine.error
    finally:
        engine.stop()
    fits = Engine(Settings(model=str(model_dir), dtype="float32", kv_cache_mib=1, max_model_len=1024))
    fits.start()
    try:
        assert fits.wait_settled(60) and fits.ready, fits.error
    finally:
        fits.stop()
