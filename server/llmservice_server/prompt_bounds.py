"""Refuse what cannot fit before paying to read it: size bounds on a request, from the context.

A prompt longer than the context is refused anyway, but finding that out by tokenising it whole
costs memory in proportion to its length (50 MB of text took a server from 0.8 to 7 GB). No token
covers more characters than the longest entry of the vocabulary (a byte-level entry spells one
character per byte, so at least as many characters as the text it stands for), so a text of more
than `context x longest entry` characters cannot fit whatever it says: that is a 400 at once. The
same bound caps what else is rendered into a prompt or compared with the output: the messages'
count and text, each stop sequence (output of at most `context` tokens cannot contain a longer
one), the tools' JSON. `logit_bias` cannot name more distinct tokens than the vocabulary has.

A text under the bound can still hold many more tokens than the context (single-character tokens
are common); `tokenize_bounded` first reads a prefix long enough for the whole context at a
generous density and refuses on that alone, so such a text costs a few contexts' worth, not its
whole length. The bound is exact for byte-level BPE and SentencePiece vocabularies; a tokenizer
whose normaliser deletes text (collapsing whitespace runs) could fit a longer text, which we refuse.

Pure: numbers and strings in, a refusal or None out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# Characters per token a prefix is read at before the whole text is: English runs at about 4.
PREFIX_CHARS_PER_TOKEN = 4
# A prefix cut through a word can take a few more tokens than the same characters inside the text.
PREFIX_MARGIN_TOKENS = 64


@dataclass(frozen=True)
class Refusal:
    """A 400: what was too large, in words, and the OpenAI error code."""

    param: str
    message: str
    code: str


@dataclass(frozen=True)
class PromptBounds:
    context: int  # tokens
    chars_per_token: int  # characters of the longest vocabulary entry
    vocab_size: int

    @property
    def max_chars(self) -> int:
        """The most characters of text that could still be `context` tokens."""
        return self.context * self.chars_per_token

    def _too_long(self, param: str, what: str, chars: int) -> Refusal:
        return Refusal(
            param,
            f"This model's maximum context length is {self.context} tokens. However, {what} has {chars} characters, more than "
            f"{self.context} tokens of at most {self.chars_per_token} characters each can hold.",
            "context_length_exceeded",
        )

    def prompt_texts(self, lengths: Iterable[int], param: str = "prompt") -> Refusal | None:
        for chars in lengths:
            if chars > self.max_chars:
                return self._too_long(param, "the prompt", chars)
        return None

    def token_ids(self, counts: Iterable[int], param: str = "prompt") -> Refusal | None:
        for count in counts:
            if count > self.context:
                return Refusal(
                    param,
                    f"This model's maximum context length is {self.context} tokens. However, the prompt has {count} tokens.",
                    "context_length_exceeded",
                )
        return None

    def messages(self, count: int, chars: int) -> Refusal | None:
        if count > self.context:  # every message takes at least one token
            return Refusal(
                "messages",
                f"This model's maximum context length is {self.context} tokens. However, there are {count} messages.",
                "context_length_exceeded",
            )
        if chars > self.max_chars:
            return self._too_long("messages", "the messages' text", chars)
        return None

    def stop(self, lengths: Iterable[int]) -> Refusal | None:
        if any(chars > self.max_chars for chars in lengths):
            message = f"stop sequences must be at most {self.max_chars} characters: longer ones can never match"
            return Refusal("stop", message, "invalid_value")
        return None

    def tools(self, json_chars: int) -> Refusal | None:
        if json_chars > self.max_chars:
            return self._too_long("tools", "the tools' JSON", json_chars)
        return None

    def logit_bias(self, count: int) -> Refusal | None:
        if count > self.vocab_size:
            return Refusal("logit_bias", f"logit_bias names {count} tokens; the vocabulary has {self.vocab_size}", "invalid_value")
        return None


def longest_entry(vocabulary: Iterable[str]) -> int:
    """Characters in the longest vocabulary entry (at least 1, so a bound is never zero)."""
    return max((len(entry) for entry in vocabulary), default=1) or 1


def too_many_tokens(context: int, param: str) -> Refusal:
    return Refusal(
        param,
        f"This model's maximum context length is {context} tokens. However, the {param} has more than {context} tokens.",
        "context_length_exceeded",
    )


def first_refusal(*checks: Refusal | None) -> Refusal | None:
    return next((check for check in checks if check is not None), None)


def tokenize_bounded(tokenize: Callable[[str], Sequence[int]], text: str, context: int) -> list[int] | None:
    """The text's token ids, or None when its prefix alone already holds more than `context`.

    A text longer than a generous reading of the context is judged by its prefix first, so one
    made of short tokens is refused after tokenising a few contexts' worth of it. (A text that
    passes may still be longer than the context: the caller reports its exact count.)
    """
    window = (context + 1) * PREFIX_CHARS_PER_TOKEN
    if len(text) > window and len(tokenize(text[:window])) > context + PREFIX_MARGIN_TOKENS:
        return None
    return list(tokenize(text))
