"""Build a tiny, random-weight Llama model with a locally trained tokenizer.

Tests and benchmarks need a real model that loads through the same code path as a real one
(`from_pretrained` on a directory) but runs in milliseconds on a laptop CPU and never touches a
model hub. The weights are random (fixed seed), the tokenizer is a byte-level BPE trained here on
`tiny_tokenizer`'s text, so every build is byte-for-byte reproducible.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from devtools.tiny_tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "SEED", "build_tiny_model", "build_tokenizer"]  # the tokenizer's names stay reachable here

SEED = 1234


def build_tiny_model(
    path: Path, *, max_position_embeddings: int = 2048, hidden_size: int = 64, intermediate_size: int = 128, layers: int = 2
) -> Path:
    """Save a tiny model + tokenizer into `path` (created if needed) and return it.

    The defaults (139,584 parameters) are what the tests use; the benchmark also builds a wider and
    deeper one (hidden 256, 4 layers: 3.4 M parameters, the size of the benchmark issue's first
    measurement).
    """
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 16,  # head size 16, two query heads per K/V head
        num_key_value_heads=hidden_size // 32,
        max_position_embeddings=max_position_embeddings,
        # A larger init spread than the default 0.02 makes the random next-token distribution
        # peaked, so greedy decoding does not hinge on floating-point near-ties.
        initializer_range=0.3,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()  # type: ignore[arg-type]  # transformers' wrapper types `to` wrongly
    with torch.no_grad():
        # A zero output row gives EOS logit 0, far below the top logits of this peaked random
        # model: greedy runs last exactly max_tokens, so length/cancel/drain tests are exact.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    build_tiny_model(Path(sys.argv[1]))
