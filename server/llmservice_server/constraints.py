"""Grammar-constrained decoding: a row's logits masked to the tokens its grammar allows next.

A request's `Grammar` (JSON for `response_format`, a tool call for `tool_choice`) is compiled once
per distinct grammar (a small LRU) against the model's tokenizer by xgrammar, which had the lowest
per-step cost of the three libraries measured (docs/api.md, `bench/grammar_backends.py`). Each
constrained row holds a matcher; each step fills the bitmasks of every constrained row in one
batched call and applies them in place. Whitespace between JSON tokens is fixed (compact
separators): a free-running model left to choose it can loop on spaces until its tokens run out.

xgrammar's JSON strings take two things that JSON parsers refuse (found by the SDK's `parse`
over 20 seeds on a random model): raw control characters and UTF-8-encoded surrogates
(`ED A0..BF xx`). Tokens that would write either are masked too, unless that leaves the row no
token at all (a grammar's own literal, such as the newline after `<tool_call>`, wins).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable

import torch
import xgrammar
from transformers import PreTrainedTokenizerBase

from .events import Grammar

COMPILED_CACHE_SIZE = 64  # distinct grammars kept compiled (a tool list or schema is reused by a client)


class InvalidGrammar(ValueError):
    """The schema cannot be compiled into a grammar: the request's fault (400)."""


class Constraint:
    """One row's place in its grammar."""

    def __init__(self, grammars: Grammars, matcher: xgrammar.GrammarMatcher) -> None:
        self.grammars = grammars
        self.matcher = matcher
        self.after_ed = False  # the last token ended in byte ED: a continuation A0..BF would spell a surrogate

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)
            self.after_ed = token in self.grammars.ends_with_ed

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its end (a stop token) was taken: the row is done."""
        return bool(self.matcher.is_terminated())


class Grammars:
    """Compiles grammars for one model and masks a batch's logits with its rows' constraints."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Iterable[int]) -> None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self._compiled: OrderedDict[Grammar, xgrammar.CompiledGrammar] = OrderedDict()
        self._batch = xgrammar.BatchGrammarMatcher(max_threads=1)  # the engine thread's own cores only
        self.vocab_size = vocab_size
        words: list[bytes] = list(info.decoded_vocab)
        special = set(info.special_token_ids) | set(info.stop_token_ids)
        # Added to a masked row: -inf on the tokens JSON parsers refuse (see the module's doc).
        self._ban = _bias([i not in special and _unparseable(w) for i, w in enumerate(words)])
        self._surrogate_tail = _bias([i not in special and b"\xa0" <= w[:1] <= b"\xbf" for i, w in enumerate(words)])
        self.ends_with_ed = frozenset(i for i, w in enumerate(words) if i not in special and w.endswith(b"\xed"))
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)  # grown to the most constrained rows seen

    def constraint(self, grammar: Grammar) -> Constraint:
        return Constraint(self, xgrammar.GrammarMatcher(self._compile(grammar)))

    def _compile(self, grammar: Grammar) -> xgrammar.CompiledGrammar:
        compiled = self._compiled.get(grammar)
        if compiled is not None:
            self._compiled.move_to_end(grammar)
            return compiled
        try:
            if grammar.schema is None:  # json_object: any object (not any JSON value), any keys
                body = xgrammar.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
            else:
                body = xgrammar.Grammar.from_json_schema(grammar.schema, any_whitespace=False, strict_mode=True)
            parts = [_literal(grammar.prefix), body, _literal(grammar.suffix)]
            compiled = self._compiler.compile_grammar(xgrammar.Grammar.concat(*[p for p in parts if p is not None]))
        except Exception as exc:  # xgrammar's C++ errors come in several types; all are the schema's fault
            raise InvalidGrammar(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__) from exc
        self._compiled[grammar] = compiled
        if len(self._compiled) > COMPILED_CACHE_SIZE:
            self._compiled.popitem(last=False)
        return compiled

    def mask(self, logits: torch.Tensor, rows: list[tuple[int, Constraint]]) -> None:
        """Set to -inf, in place, every logit of `logits[row]` its constraint does not allow next."""
        if self._bitmask.shape[0] < len(rows):
            self._bitmask = xgrammar.allocate_token_bitmask(len(rows), self.vocab_size)
        bitmask = self._bitmask[: len(rows)]
        self._batch.batch_fill_next_token_bitmask([c.matcher for _, c in rows], bitmask)
        width = min(logits.shape[-1], self.vocab_size, self._ban.shape[0])
        index = torch.tensor([row for row, _ in rows], dtype=torch.long, device=logits.device)
        picked = logits[index, :width]  # a copy: the constrained rows, in the masks' order
        # On an accelerator, plain torch ops: xgrammar's default there is a Triton kernel, compiled on
        # first use, which needs a C compiler in the image; 16 rows of masking are cheap either way.
        on_cpu = logits.device.type == "cpu"
        device_mask = bitmask.to(logits.device)
        if on_cpu:
            xgrammar.apply_token_bitmask_inplace(picked, device_mask, vocab_size=width, backend="cpu")
        else:
            xgrammar.apply_token_bitmask_inplace(picked, device_mask, vocab_size=width, backend="torch_native")
        ban, surrogate_tail = self._biases(logits.device)
        cleaned = picked + ban[:width]
        for i, (_, constraint) in enumerate(rows):
            if constraint.after_ed:
                cleaned[i] += surrogate_tail[:width]
        keep = torch.isfinite(cleaned).any(dim=-1, keepdim=True)
        logits[index, :width] = torch.where(keep, cleaned, picked)
        if logits.shape[-1] > width:  # the model's padded tail ids are no tokens at all
            logits[index, width:] = float("-inf")

    def _biases(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The two bias rows on the logits' device (copied there once, not every step)."""
        if self._ban.device != device:
            self._ban, self._surrogate_tail = self._ban.to(device), self._surrogate_tail.to(device)
        return self._ban, self._surrogate_tail


def _bias(banned: list[bool]) -> torch.Tensor:
    return torch.tensor([float("-inf") if b else 0.0 for b in banned], dtype=torch.float32)


def _unparseable(word: bytes) -> bool:
    """A token whose bytes put a raw control character or a surrogate into JSON text."""
    if any(b < 0x20 for b in word):
        return True
    return any(word[i] == 0xED and 0xA0 <= word[i + 1] <= 0xBF for i in range(len(word) - 1))


def _literal(text: str) -> xgrammar.Grammar | None:
    if not text:
        return None
    return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")
