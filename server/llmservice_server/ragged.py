"""One forward for a ragged batch: the running rows' next tokens and newcomers' prompt chunks together.

Why: with a padded `[rows, len]` batch, a newcomer's prompt needs a forward of its own (one more
pass over the weights per join), newcomers read together are padded to the longest prompt (on
the benchmark's SmolLM2 workload 42 % of the prompt tokens read were padding), and transformers'
`DynamicCache` concatenates every layer's whole cache on every step. Here the tokens of one
engine step are packed into a single sequence `[1, T]`: first one decode token per running row,
then any prompt chunks. The model runs its linear layers over the packed tokens as usual; only
attention has to know which token belongs to which row, so the model's attention is swapped for
`ragged_attention` (through transformers' attention interface), which writes each token's K/V in
place and attends row by row:

- running rows live in preallocated slots `[slots, kv_heads, capacity, head_dim]` per layer, row
  `i` in slot `i` with its tokens in columns `0..length-1`; a decode token's K/V is written at its
  row's length, and all rows attend in one SDPA call with a per-row length mask;
- a prompt being read has a buffer of its own sized to the prompt; each chunk attends causally to
  what was read before it; when the last chunk is through, the prompt's K/V is copied into a slot
  (one per choice, `n > 1`) and its rows join the running batch.

Writes go to fixed columns and lengths advance only after a forward succeeds, so a failed forward
can be rerun without the chunks (the engine does that to fail only the newcomers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers import AttentionInterface

ATTENTION = "llmservice_ragged"
_MIN_COLUMNS = 64
# Attention options of other models that this implementation does not honour: a model that
# passes one of them (not None) is refused at warm-up instead of computing something else.
_UNSUPPORTED = ("softcap", "s_aux")
_LAYER_KINDS = {"full_attention", "sliding_attention"}


class UnsupportedModel(RuntimeError):
    """The model's attention cannot run ragged (soft-capping, attention sinks, other layer kinds, no attention interface)."""


def _pow2_at_least(n: int, floor: int) -> int:
    size = floor
    while size < n:
        size *= 2
    return size


@dataclass(eq=False)
class PromptKV:
    """K/V of one prompt while it is read, chunk by chunk."""

    tokens: torch.Tensor  # [len] on the CPU: packed with the step's other tokens before one copy to the device
    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    read: int = 0  # tokens already through the model

    @classmethod
    def create(cls, prompt: list[int], layers: int) -> PromptKV:
        return cls(torch.tensor(prompt, dtype=torch.long), [None] * layers, [None] * layers)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def begin_with(self, prefix: torch.Tensor) -> None:
        """Start from the K/V of the prompt's first `n` tokens, `[layers, 2, kv_heads, n, head_dim]`
        (a prefix cache hit): reading goes on from token `n`."""
        count = int(prefix.shape[3])
        shape = (1, prefix.shape[2], self.length, prefix.shape[4])
        for index in range(len(self.keys)):
            keys, values = prefix.new_zeros(shape), prefix.new_zeros(shape)
            keys[0, :, :count] = prefix[index, 0]
            values[0, :, :count] = prefix[index, 1]
            self.keys[index], self.values[index] = keys, values
        self.read = count

    def stacked(self, start: int, end: int) -> torch.Tensor:
        """K/V of tokens `start..end` of every layer, `[layers, 2, kv_heads, end - start, head_dim]` (read ones only)."""
        pairs = []
        for keys, values in zip(self.keys, self.values, strict=True):
            assert keys is not None and values is not None
            pairs.append(torch.stack((keys[0, :, start:end], values[0, :, start:end])))
        return torch.stack(pairs)

    def layer(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.keys[index], self.values[index]
        if keys is None or values is None:  # zeros: masked-out columns must not hold NaN (0 * NaN)
            shape = (1, like.shape[0], self.length, like.shape[-1])
            keys = self.keys[index] = like.new_zeros(shape)
            values = self.values[index] = like.new_zeros(shape)
        return keys, values


@dataclass(eq=False)
class Slots:
    """The running rows' K/V: one `[slots, kv_heads, columns, head_dim]` pair per layer, grown by doubling."""

    layers: int
    max_rows: int  # the engine's max_num_seqs: rows never grow past it (unless one request needs more)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    @property
    def slots(self) -> int:
        return int(self.keys[0].shape[0]) if self.keys else 0

    @property
    def columns(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    def reserve(self, rows: int, columns: int, like: torch.Tensor) -> None:
        """Make room for `rows` x `columns`, keeping what is there; `like` gives K/V's shape and dtype."""
        if rows <= self.slots and columns <= self.columns:
            return
        new_rows = min(max(_pow2_at_least(rows, 1), self.slots), max(self.max_rows, rows))
        new_columns = max(_pow2_at_least(columns, _MIN_COLUMNS), self.columns)
        shape = (new_rows, like.shape[1], new_columns, like.shape[3])
        old_rows, old_columns = self.slots, self.columns  # grown by doubling: copying all of it is amortized
        keys, values = [], []
        for index in range(self.layers):
            k, v = like.new_zeros(shape), like.new_zeros(shape)
            if self.keys:
                k[:old_rows, :, :old_columns] = self.keys[index]
                v[:old_rows, :, :old_columns] = self.values[index]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values

    def release(self) -> None:
        self.keys, self.values = [], []

    def fill(self, slot: int, prompt: PromptKV) -> None:
        """Copy a fully read prompt's K/V into `slot` (columns 0..len-1)."""
        for index in range(self.layers):
            keys, values = prompt.keys[index], prompt.values[index]
            assert keys is not None and values is not None
            self.keys[index][slot, :, : prompt.length] = keys[0]
            self.values[index][slot, :, : prompt.length] = values[0]

    def move(self, sources: list[int], targets: list[int], columns: int) -> None:
        """Copy whole rows (their first `columns`) from slots `sources` to slots `targets`."""
        src = torch.tensor(sources, dtype=torch.long, device=self.keys[0].device)
        dst = torch.tensor(targets, dtype=torch.long, device=self.keys[0].device)
        for index in range(self.layers):
            for tensor in (self.keys[index], self.values[index]):
                tensor[dst, :, :columns] = tensor[src, :, :columns]


@dataclass(frozen=True)
class Chunk:
    """Prompt tokens `start..end` of one prompt, at `offset` in the packed sequence."""

    prompt: PromptKV
    start: int
    end: int
    offset: int
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

    slots: Slots
    rows: int  # decode tokens, one per running row (slot i = token i), packed first
    row_columns: torch.Tensor  # [rows] where each decode token's K/V goes (the row's length)
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

    def attend(
        self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None, window: int | None
    ) -> torch.Tensor:
        self.calls += 1
        q, k, v = query[0], key[0], value[0]  # [heads, T, dim], [kv_heads, T, dim]
        out = q.new_empty((q.shape[1], q.shape[0], q.shape[2]))  # [T, heads, dim]
        rows = self.rows
        if rows:
            keys, values = self.slots.keys[layer], self.slots.values[layer]
            index = torch.arange(rows, device=keys.device)
            keys[index, :, self.row_columns] = k[:, :rows].transpose(0, 1)
            values[index, :, self.row_columns] = v[:, :rows].transpose(0, 1)
            attended = scaled_dot_product_attention(
                q[:, :rows].transpose(0, 1).unsqueeze(2),
                keys[:rows, :, : self.kv_len],
                values[:rows, :, : self.kv_len],
                attn_mask=self.row_mask(window),
                scale=scale,
                enable_gqa=True,
            )
            out[:rows] = attended[:, :, 0]
        for chunk in self.chunks:
            count = chunk.end - chunk.start
            part = slice(chunk.offset, chunk.offset + count)
            keys, values = chunk.prompt.layer(layer, k)
            keys[0, :, chunk.start : chunk.end] = k[:, part]
            values[0, :, chunk.start : chunk.end] = v[:, part]
            mask = chunk.mask(window, q.device)
            attended = scaled_dot_product_attention(
                q[None, :, part],
                keys[:, :, : chunk.end],
                values[:, :, : chunk.end],
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
