"""The engine's own decoder forward computes what transformers' forward computes, for the models it adopts."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from llmservice_server.decoder import adopt
from llmservice_server.engine.kv_cache import KVCache
from llmservice_server.memory import KVShape
from llmservice_server.ragged import Chunk, RaggedStep, install

VOCAB = 96
SIZE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3}
SIZE |= {"num_attention_heads": 4, "num_key_value_heads": 2}
BLOCK = 4  # tokens per K/V block


def llama() -> Any:
    return LlamaForCausalLM(LlamaConfig(initializer_range=0.3, **SIZE))


def llama_with_biases() -> Any:  # attention_bias: q, k, v and o all carry one
    return LlamaForCausalLM(LlamaConfig(initializer_range=0.3, attention_bias=True, rope_theta=500.0, **SIZE))


def mistral() -> Any:  # every layer sees only the last 6 tokens
    return MistralForCausalLM(MistralConfig(initializer_range=0.3, sliding_window=6, **SIZE))


def qwen2() -> Any:  # biases on q, k, v; layer 0 full attention, layers 1-2 a window of 5
    return Qwen2ForCausalLM(Qwen2Config(initializer_range=0.3, use_sliding_window=True, sliding_window=5, max_window_layers=1, **SIZE))


def llama3_scaled_rope() -> Any:  # frequencies fixed at init: cos/sin come from the decoder's table
    rope = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    return LlamaForCausalLM(LlamaConfig(initializer_range=0.3, rope_parameters=rope | {"original_max_position_embeddings": 32}, **SIZE))


def llama_dynamic_rope() -> Any:  # frequencies recomputed past 64 positions: cos/sin from the rotary module every step
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    return LlamaForCausalLM(LlamaConfig(initializer_range=0.3, rope_parameters=rope, max_position_embeddings=64, **SIZE))


BUILDS = [llama, llama_with_biases, mistral, qwen2, llama3_scaled_rope, llama_dynamic_rope]


def built(build: Callable[[], Any]) -> Any:
    torch.manual_seed(0)
    model = build().to(torch.float32).eval()
    with torch.no_grad():  # biases are zero at init: random ones, so leaving one out shows
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.3)
    install(model)
    return model


def a_ragged_step(model: Any, later: int = 0) -> tuple[RaggedStep, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three running rows of different lengths (`later` tokens longer each) and the second chunk of a
    10-token prompt, their K/V so far random, in blocks scattered over the pool in no order."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    generator = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 9, 2]) + later
    kv_len = int(lengths.max()) + 1
    per_row = -(-kv_len // BLOCK)
    shape = KVShape(config.num_hidden_layers, config.num_key_value_heads, head_dim, 4)
    cache = KVCache.allocate(shape, blocks=3 * per_row + 3, block_tokens=BLOCK, dtype=torch.float32, device=torch.device("cpu"))
    for tensor in cache.layers:
        tensor.normal_(generator=generator)
    order = torch.randperm(cache.blocks, generator=generator).tolist()
    row_blocks = [order[i * per_row : (i + 1) * per_row] for i in range(3)]
    prompt_blocks = order[3 * per_row :]
    row_slots = torch.stack([cache.slots(blocks, kv_len) for blocks in row_blocks])
    prompt_slots = cache.slots(prompt_blocks, 10)
    write = torch.cat((row_slots[torch.arange(3), lengths], prompt_slots[4:]))
    table = torch.tensor(row_blocks)
    chunk = Chunk(4, 10, offset=3, blocks=torch.tensor(prompt_blocks))
    step = RaggedStep(cache, 3, lengths, table, write, kv_len, uniform=False, chunks=[chunk])
    ids = torch.cat((torch.tensor([7, 8, 9]), torch.arange(24, 30)))
    positions = torch.cat((lengths, torch.arange(4, 10)))
    return step, ids, positions, torch.tensor([0, 1, 2, 8])  # every row's logits, and the prompt's last


@pytest.mark.parametrize("build", BUILDS, ids=lambda build: build.__name__)
def test_fused_forward_gives_transformers_logits_and_kv(build: Callable[[], Any]) -> None:
    model = built(build)
    reference = copy.deepcopy(model)
    decoder = adopt(model)
    assert decoder is not None and decoder.layers == model.config.num_hidden_layers
    # Early positions, then rows 300 tokens on: past the first rotary table (256 positions), which
    # must grow, and past the dynamic RoPE's 64, whose frequencies must change.
    for later in (0, 300):
        agree_with_transformers(model, reference, decoder, later)


def agree_with_transformers(model: Any, reference: Any, decoder: Any, later: int) -> None:
    ours, theirs = a_ragged_step(model, later), a_ragged_step(reference, later)
    with torch.inference_mode():
        step, ids, positions, keep = ours
        logits = decoder(ids, positions, step, keep)
        step_ref, ids, positions, keep = theirs
        out = reference(input_ids=ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=keep, ragged=step_ref)
        expected = out.logits[0]
    assert logits.shape == (4, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert step.calls == step_ref.calls == model.config.num_hidden_layers
    for layer in range(model.config.num_hidden_layers):  # the K/V written for the next steps agree too
        torch.testing.assert_close(step.cache.layers[layer], step_ref.cache.layers[layer], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", BUILDS, ids=lambda build: build.__name__)
def test_adopting_leaves_transformers_forward_as_it_was_on_the_same_memory(build: Callable[[], Any]) -> None:
    model = built(build)
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    assert adopt(model) is not None
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    attention = model.model.layers[0].self_attn
    storage = attention.q_proj.weight.untyped_storage()  # q, k and v now views of one stacked weight
    assert attention.v_proj.weight.untyped_storage().data_ptr() == storage.data_ptr()
    assert storage.nbytes() == sum(p.weight.numel() * 4 for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    step, ids, positions, keep = a_ragged_step(model)
    with torch.inference_mode():  # transformers' forward still runs on the views
        out = model(input_ids=ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=keep, ragged=step)
    assert torch.isfinite(out.logits).all()


def gelu_llama() -> Any:
    return LlamaForCausalLM(LlamaConfig(hidden_act="gelu", **SIZE))


def llama_with_mlp_bias() -> Any:
    return LlamaForCausalLM(LlamaConfig(mlp_bias=True, **SIZE))


def gemma2() -> Any:
    return Gemma2ForCausalLM(Gemma2Config(head_dim=16, **SIZE))


@pytest.mark.parametrize("build", [gelu_llama, llama_with_mlp_bias, gemma2], ids=lambda build: build.__name__)
def test_what_the_fused_forward_does_not_compute_is_left_to_transformers(build: Callable[[], Any]) -> None:
    model = build().eval()
    weight = model.model.layers[0].self_attn.q_proj.weight
    assert adopt(model) is None
    assert model.model.layers[0].self_attn.q_proj.weight is weight  # nothing was restacked
