"""One forward for a ragged batch: the running rows' next tokens and newcomers' prompt chunks together.

Why: with a padded `[rows, len]` batch, a newcomer's prompt needs a forward of its own (one more
pass over the weights per join), newcomers read together are padded to the longest prompt (on
the benchmark's SmolLM2 workload 42 % of the prompt tokens read were padding), and transformers'
`DynamicCache` concatenates every layer's whole cache on every step. Here the tokens of one
engine step are packed into a single sequence `[1, T]`: first one decode token per running row,
then any prompt chunks. The model runs its linear layers over the packed tokens as usual; only
attention has to know which token belongs to which row, so the model's attention is swapped for
`ragged_attention` (through transformers' attention interface), which writes each token's K/V
into the engine's one K/V pool (`engine/kv_cache.py`) and attends row by row:

- every token of the step has a slot in the pool (`write`): one `index_copy_` per layer puts
  the step's K/V there;
- running rows gather their blocks (`row_blocks`, `[rows, blocks]`) and attend in one SDPA
  call with a per-row length mask;
- a prompt chunk gathers the blocks of its prompt up to its end and attends causally.

Slots are fixed and lengths advance only after a forward succeeds, so a failed forward can be
rerun without the chunks (the engine does that to fail only the newcomers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

if TYPE_CHECKING:
    from .engine.kv_cache import KVCache

ATTENTION = "llmservice_ragged"
# Attention options of other models that this implementation does not honour: a model that
# passes one of them (not None) is refused at warm-up instead of computing something else.
_UNSUPPORTED = ("softcap", "s_aux")
_LAYER_KINDS = {"full_attention", "sliding_attention"}


class UnsupportedModel(RuntimeError):
    """The model's attention cannot run ragged (soft-capping, attention sinks, other layer kinds, no attention interface)."""


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens `start..end` of one prompt, at `offset` in the packed sequence."""

    start: int
    end: int
    offset: int
    blocks: torch.Tensor  # the pool blocks holding the prompt's tokens 0..end (on the device)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window, built once per step

    def mask(self, window: int | None, device: torch.device) -> torch.Tensor | None:
        """[end - start, end] True = attend: causal, and within `window` tokens of the query if set.

        None for a first chunk no window cuts into: plain causal attention (`is_causal`).
        """
        if self.start == 0 and (window is None or window >= self.end):
            return None
        if window not in self.masks:
            columns = torch.arange(self.end, device=device)[None, :]
            queries = torch.arange(self.start, self.end, device=device)[:, None]
            allowed = columns <= queries
            if window is not None:  # transformers' sliding window: the last `window` tokens, itself included
                allowed &= columns > queries - window
            self.masks[window] = allowed
        return self.masks[window]


@dataclass
class RaggedStep:
    """What one forward carries; handed to the model as the `ragged` keyword, read by `ragged_attention`."""

    cache: KVCache
    rows: int  # decode tokens, one per running row, packed first
    row_columns: torch.Tensor  # [rows] the position of each decode token (the row's length)
    row_blocks: torch.Tensor  # [rows, ceil(kv_len / block_tokens)] each row's blocks (past its length: masked)
    write: torch.Tensor  # [T] the pool slot of every packed token
    kv_len: int  # columns the running rows attend over (their longest length + 1)
    uniform: bool  # every running row has kv_len - 1 tokens
    chunks: list[Chunk]
    calls: int = 0  # attention calls seen (checked against the model's layers)
    row_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    @property
    def positions_below(self) -> int:
        """A bound on the step's positions, known without reading a tensor: a row's token is at its
        length (below `kv_len`), a chunk's below its end."""
        return max([self.kv_len, *(chunk.end for chunk in self.chunks)])

    def row_mask(self, window: int | None) -> torch.Tensor | None:
        """[rows, 1, 1, kv_len] True = attend: a row's tokens up to the one written this step.

        None when every row attends to all `kv_len` columns (rows of one length, no window
        cutting in): SDPA then runs unmasked, its fastest path (one stream is always this case).
        """
        if self.uniform and (window is None or window >= self.kv_len):
            return None
        if window not in self.row_masks:
            columns = torch.arange(self.kv_len, device=self.row_columns.device)[None, :]
            allowed = columns <= self.row_columns[:, None]
            if window is not None:
                allowed &= columns > self.row_columns[:, None] - window
            self.row_masks[window] = allowed[:, None, None, :]
        return self.row_masks[window]

    def _gather(self, pool: torch.Tensor, blocks: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first `tokens` of each row of `blocks` `[rows, n]`: each `[rows, kv_heads, tokens, dim]`."""
        size = self.cache.block_tokens
        rows, count = blocks.shape
        shape = pool.shape[1:]
        gathered = pool.view(-1, size, *shape).index_select(0, blocks.flatten()).view(rows, count * size, *shape)[:, :tokens]
        return gathered[:, :, 0].transpose(1, 2), gathered[:, :, 1].transpose(1, 2)

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, window: int | None
    ) -> torch.Tensor:
        self.calls += 1
        q, k, v = query[0], key[0], value[0]  # [heads, T, dim], [kv_heads, T, dim]
        pool = self.cache.layers[layer]  # [slots, 2, kv_heads, dim]
        pool.index_copy_(0, self.write, torch.stack((k, v)).permute(2, 0, 1, 3))
        out = q.new_empty((q.shape[1], q.shape[0], q.shape[2]))  # [T, heads, dim]
        rows = self.rows
        if rows:
            keys, values = self._gather(pool, self.row_blocks, self.kv_len)  # [rows, kv_heads, kv_len, dim]
            attended = scaled_dot_product_attention(
                q[:, :rows].transpose(0, 1).unsqueeze(2),
                keys,
                values,
                attn_mask=self.row_mask(window),
                scale=scale,
                enable_gqa=True,
            )
            out[:rows] = attended[:, :, 0]
        for chunk in self.chunks:
            part = slice(chunk.offset, chunk.offset + chunk.end - chunk.start)
            mask = chunk.mask(window, q.device)
            keys, values = self._gather(pool, chunk.blocks[None], chunk.end)  # [1, kv_heads, end, dim]
            attended = scaled_dot_product_attention(
                q[None, :, part],
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,
                scale=scale,
                enable_gqa=True,
            )
            out[part] = attended[0].transpose(0, 1)
        return out.unsqueeze(0)


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; returns `[1, T, heads, dim]`."""
    step = kwargs.get("ragged")
    if not isinstance(step, RaggedStep):
        raise UnsupportedModel("the ragged attention runs only inside the engine's forward")
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise UnsupportedModel(f"this model's attention uses {name}, which the batching engine does not support")
    layer = module.layer_idx
    if not isinstance(layer, int):
        raise UnsupportedModel("this model's attention modules carry no layer index")
    window = kwargs.get("sliding_window")
    return step.attend(layer, query, key, value, scaling, window if isinstance(window, int) else None), None


def install(model: Any) -> None:
    """Route the model's attention through `ragged_attention` (refusing models that cannot)."""
    config = model.config
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not kinds <= _LAYER_KINDS:
        others = sorted(kinds - _LAYER_KINDS)
        raise UnsupportedModel(f"this model has {others} layers; the batching engine runs full and sliding-window attention only")
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        raise UnsupportedModel("this model's attention does not go through transformers' attention interface")
    AttentionInterface.register(ATTENTION, ragged_attention)
    model.set_attn_implementation(ATTENTION)
