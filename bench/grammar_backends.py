"""Per-step cost of the grammar libraries on CPU, batch 16: how the server's one was chosen.

Each step does what the engine does for 16 constrained rows: compute each row's allowed-token
bitmask, mask the logits, pick a token (a random allowed one: a random model's choice), and
advance each row's matcher. Rows that finish start over. Only llguidance is a dependency of the
server; to rerun the comparison install the others beside it, for example
`pip install --target /tmp/grammar-libs --no-deps xgrammar apache-tvm-ffi outlines-core` and
`PYTHONPATH=/tmp/grammar-libs python -m bench.grammar_backends`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from devtools.tiny_model import build_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "active"],
    "additionalProperties": False,
}
BATCH = 16


class Rows:
    """One backend's 16 rows: fill masks, advance with tokens, restart finished rows."""

    def __init__(self, fill: Callable[[torch.Tensor], None], advance: Callable[[list[int]], None], words: int) -> None:
        self.fill = fill
        self.advance = advance
        self.mask = torch.full((BATCH, words), -1, dtype=torch.int32)


def unpack(mask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = torch.arange(32, dtype=torch.int32)
    return ((mask.unsqueeze(-1) >> bits) & 1).bool().reshape(mask.shape[0], -1)[:, :vocab]


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def none_rows(tokenizer: Any) -> Rows:
    """No grammar: the masking and sampling the step does anyway, to subtract."""
    return Rows(lambda mask: None, lambda tokens: None, (len(tokenizer) + 31) // 32)


def llguidance_serial_rows(tokenizer: Any) -> Rows:
    """llguidance with each row's mask computed in turn on the engine thread (no thread pool)."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as lltorch

    lltok = llguidance.hf.from_tokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(BATCH)]

    def fill(mask: torch.Tensor) -> None:
        for i, m in enumerate(matchers):
            lltorch.fill_next_token_bitmask(m, mask, i)

    def advance(tokens: list[int]) -> None:
        for i, (m, t) in enumerate(zip(matchers, tokens, strict=True)):
            m.consume_token(t)
            if m.is_stopped() or m.is_error():
                matchers[i] = llguidance.LLMatcher(lltok, grammar)

    return Rows(fill, advance, (lltok.vocab_size + 31) // 32)


def llguidance_rows(tokenizer: Any) -> Rows:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lltorch

    lltok = llguidance.hf.from_tokenizer(tokenizer)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matchers = [llguidance.LLMatcher(lltok, grammar) for _ in range(BATCH)]
    executor = llguidance.LLExecutor()

    def fill(mask: torch.Tensor) -> None:
        lltorch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], mask)

    def advance(tokens: list[int]) -> None:
        for i, (m, t) in enumerate(zip(matchers, tokens, strict=True)):
            m.consume_token(t)
            if m.is_stopped() or m.is_error():
                matchers[i] = llguidance.LLMatcher(lltok, grammar)

    return Rows(fill, advance, (lltok.vocab_size + 31) // 32)


def xgrammar_rows(tokenizer: Any) -> Rows:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer)
    compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(BATCH)]
    batch = xgrammar.BatchGrammarMatcher()

    def fill(mask: torch.Tensor) -> None:
        batch.batch_fill_next_token_bitmask(matchers, mask)

    def advance(tokens: list[int]) -> None:
        for i, (m, t) in enumerate(zip(matchers, tokens, strict=True)):
            m.accept_token(t)
            if m.is_terminated():
                matchers[i] = xgrammar.GrammarMatcher(compiled)

    return Rows(fill, advance, (info.vocab_size + 31) // 32)


def outlines_rows(tokenizer: Any) -> Rows:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    # outlines-core wants each token as the bytes it stands for (byte-level BPE spells them in Unicode).
    to_byte = {c: b for b, c in byte_level_alphabet().items()}
    eos = tokenizer.eos_token_id
    words: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id != eos and token not in tokenizer.all_special_tokens:
            words.setdefault(bytes(to_byte[c] for c in token), []).append(token_id)
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(eos, words))
    guides = [Guide(index) for _ in range(BATCH)]
    vocab = len(tokenizer)

    def fill(mask: torch.Tensor) -> None:
        for i, g in enumerate(guides):
            row = mask[i]
            g.write_mask_into(row.data_ptr(), row.numel(), row.element_size())

    def advance(tokens: list[int]) -> None:
        for i, (g, t) in enumerate(zip(guides, tokens, strict=True)):
            if t == eos or g.is_finished():
                guides[i] = Guide(index)
            else:
                g.advance(t)

    return Rows(fill, advance, (vocab + 31) // 32)


BACKENDS = {
    "none": none_rows,
    "llguidance": llguidance_rows,
    "llguidance-serial": llguidance_serial_rows,
    "xgrammar": xgrammar_rows,
    "outlines-core": outlines_rows,
}


def measure(rows: Rows, vocab: int, steps: int, rng: random.Random) -> list[float]:
    times: list[float] = []
    logits = torch.randn(BATCH, vocab)
    for _ in range(steps):
        started = time.perf_counter()
        rows.fill(rows.mask)
        allowed = unpack(rows.mask, vocab)
        masked = logits.masked_fill(~allowed, float("-inf"))
        # A random allowed token per row: what a random-weight model would pick under the mask.
        choices = torch.multinomial(torch.softmax(masked + torch.rand(BATCH, vocab), -1), 1).squeeze(1).tolist()
        rows.advance([int(c) for c in choices])
        times.append(time.perf_counter() - started)
        logits = torch.randn(BATCH, vocab, generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--tokenizer", default=None, help="a local tokenizer directory (default: the tiny test model's)")
    args = parser.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = build_tokenizer()
            tokenizer.save_pretrained(tmp)
    vocab = len(tokenizer)
    torch.set_num_threads(1)
    for name, make in BACKENDS.items():
        try:
            started = time.perf_counter()
            rows = make(tokenizer)
            setup = time.perf_counter() - started
        except ImportError as exc:
            print(f"{name:18s} not installed ({exc.name})")
            continue
        times = measure(rows, vocab, args.steps, random.Random(0))[20:]  # the first steps warm caches
        median, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
        print(f"{name:18s} setup {setup * 1e3:8.1f} ms   step (16 rows) median {median * 1e6:8.1f} us   p90 {p90 * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
