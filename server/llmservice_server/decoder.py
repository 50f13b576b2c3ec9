"""Llama-family decoders run by the engine's own forward, over the model's own weights.

Why: on CPU a small model's decode step is mostly Python, and much of that Python is
transformers' wrapping around the arithmetic: decorators merging kwargs and recording outputs,
a causal mask built every step that `ragged_attention` never reads, output dataclasses, one
module call per projection. On the tiny test model (2 layers, hidden 64) a 16-row decode step
took 0.97-1.45 ms through `model(...)` and 0.51-0.62 ms here (2 s of steps each, one thread,
AMD EPYC); on SmolLM2-135M, where the matmuls dominate, the two are within noise.

What it computes is transformers' arithmetic in transformers' order: RMSNorm in float32 and
scaled after the cast back, the model's own rotary module (so every RoPE scaling it knows
applies), rotate-half rotary, residual after attention and after the MLP, the final norm and
the output layer on the kept positions only (a norm is per position, so this equals norming
all and slicing). The changes: q/k/v and gate/up each run as one matmul, over weights
concatenated once at adoption (the modules' own parameters become views into those, so memory
does not grow and `model(...)` still runs on the same tensors: `Settings.fused_forward=False`, and
the tests that compare the two; the products are the same, a wider GEMM may round them
differently in the last bits); and, changing no bit, q and k are rotated in one pass over their
common view, and for RoPE types whose frequencies do not depend on the sequence
length (all but "dynamic" and "longrope") the rotary module's cos/sin are computed once for a
range of positions and looked up per step. The module computes each position on its own
(`position * inv_freq`, then cos and sin elementwise), so a looked-up row is the row it would
compute; a step then pays one index instead of the module's call, about 6 % of a tiny model's
decode step.

Adopted: transformers' own Llama, Mistral and Qwen2 classes (SmolLM2, TinyLlama, Llama 2/3,
Mistral, Qwen2/2.5) with a SiLU MLP without biases. Anything else (`adopt` returns None) runs
through `model(...)` as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.functional import embedding, linear, silu

from .ragged import RaggedStep

# Per architecture, the sliding window of one layer's attention (None: full attention), read the
# way transformers' own attention module reads it.
_WINDOWS: dict[str, Callable[[Any, Any], int | None]] = {
    "LlamaForCausalLM": lambda attention, config: None,
    "MistralForCausalLM": lambda attention, config: getattr(config, "sliding_window", None),
    "Qwen2ForCausalLM": lambda attention, config: getattr(attention, "sliding_window", None),
}


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    input_eps: float
    qkv: torch.Tensor  # [q + 2 kv, hidden]: q_proj, k_proj, v_proj stacked
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    post_norm: torch.Tensor
    post_eps: float
    gate_up: torch.Tensor  # [2 intermediate, hidden]: gate_proj, up_proj stacked
    down: torch.Tensor
    scaling: float
    window: int | None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    hidden = x.to(torch.float32)
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


# RoPE types whose module recomputes its frequencies from the positions it is given.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
_FIRST_TABLE_POSITIONS = 256


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _stack(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for `linears`, whose parameters become views into it."""
    biases = [layer.bias for layer in linears]
    with torch.no_grad():
        weight = torch.cat([layer.weight for layer in linears])
        bias = torch.cat([b for b in biases if b is not None]) if biases[0] is not None else None
    start = 0
    for layer in linears:
        end = start + layer.out_features
        layer.weight = nn.Parameter(weight[start:end], requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias[start:end], requires_grad=False)
        start = end
    return weight, bias


def _supported(model: Any) -> bool:
    cls = type(model)
    if cls.__name__ not in _WINDOWS or not cls.__module__.startswith("transformers.models."):
        return False  # another architecture, or remote code under a familiar name
    if getattr(model.config, "hidden_act", None) != "silu":
        return False
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if any(p.bias is not None for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return False
        if len({p.bias is None for p in (attention.q_proj, attention.k_proj, attention.v_proj)}) != 1:
            return False
    return True


class FusedDecoder:
    """`model(...)`'s logits for one ragged step, computed without transformers' per-call machinery."""

    def __init__(self, model: Any) -> None:
        inner, config = model.model, model.config
        window = _WINDOWS[type(model).__name__]
        self._embed: torch.Tensor = inner.embed_tokens.weight
        self._rotary: nn.Module = inner.rotary_emb
        self._norm: torch.Tensor = inner.norm.weight
        self._norm_eps = float(inner.norm.variance_epsilon)
        self._lm_head: torch.Tensor = model.lm_head.weight
        rope_type = str(getattr(self._rotary, "rope_type", ""))
        self._rope_table_ok = not any(kind in rope_type for kind in _LENGTH_DEPENDENT_ROPE)
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [positions, head_dim]
        first = inner.layers[0].self_attn
        self._head_dim = int(first.head_dim)
        self._heads = int(first.q_proj.out_features) // self._head_dim
        self._qk_width = int(first.q_proj.out_features + first.k_proj.out_features)  # q and k columns of qkv, v after
        self._intermediate = int(inner.layers[0].mlp.gate_proj.out_features)
        self._layers = [self._adopt_layer(layer, window(layer.self_attn, config)) for layer in inner.layers]

    @staticmethod
    def _adopt_layer(layer: Any, window: int | None) -> _Layer:
        attention, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _stack([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up, _ = _stack([mlp.gate_proj, mlp.up_proj])
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            input_eps=float(layer.input_layernorm.variance_epsilon),
            qkv=qkv,
            qkv_bias=qkv_bias,
            out=attention.o_proj.weight,
            out_bias=attention.o_proj.bias,
            post_norm=layer.post_attention_layernorm.weight,
            post_eps=float(layer.post_attention_layernorm.variance_epsilon),
            gate_up=gate_up,
            down=mlp.down_proj.weight,
            scaling=float(attention.scaling),
            window=window,
        )

    @property
    def layers(self) -> int:
        return len(self._layers)

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos and sin `[1, 1, T, head_dim]` of `positions`, all below `top`."""
        if not self._rope_table_ok:
            cos, sin = self._rotary(x, positions[None])
            return cos[:, None], sin[:, None]
        if self._rope_table is None or self._rope_table[0].shape[0] < top:
            size = max(_FIRST_TABLE_POSITIONS, 1 << (top - 1).bit_length())  # doubling: a handful of rebuilds per context
            every = torch.arange(size, device=positions.device)[None]
            cos, sin = self._rotary(x, every)
            self._rope_table = cos[0], sin[0]
        cos_table, sin_table = self._rope_table
        return cos_table[positions][None, None], sin_table[positions][None, None]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, step: RaggedStep, keep: torch.Tensor) -> torch.Tensor:
        """Logits `[len(keep), vocab]` of the packed tokens `ids` `[T]` at `positions` `[T]`, rows picked by `keep`."""
        tokens, head_dim, heads = int(ids.shape[0]), self._head_dim, self._heads
        k_end, intermediate = self._qk_width, self._intermediate
        x = embedding(ids, self._embed)[None]  # [1, T, hidden]
        cos, sin = self._cos_sin(x, positions, step.positions_below)
        for index, layer in enumerate(self._layers):
            qkv = linear(_rms_norm(x, layer.input_norm, layer.input_eps), layer.qkv, layer.qkv_bias)
            rotated = _rotate(qkv[..., :k_end].view(1, tokens, -1, head_dim).transpose(1, 2), cos, sin)  # q and k heads
            value = qkv[..., k_end:].view(1, tokens, -1, head_dim).transpose(1, 2)
            attended = step.attend(index, rotated[:, :heads], rotated[:, heads:], value, layer.scaling, layer.window)
            x = x + linear(attended.reshape(1, tokens, -1), layer.out, layer.out_bias)
            gate_up = linear(_rms_norm(x, layer.post_norm, layer.post_eps), layer.gate_up)
            x = x + linear(silu(gate_up[..., :intermediate]) * gate_up[..., intermediate:], layer.down)
        return linear(_rms_norm(x[0, keep], self._norm, self._norm_eps), self._lm_head)


def adopt(model: Any) -> FusedDecoder | None:
    """A fused decoder over `model`'s weights if its architecture is one this module computes; else None."""
    return FusedDecoder(model) if _supported(model) else None
