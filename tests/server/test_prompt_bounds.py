"""The size bounds that refuse a request before it is tokenised (`prompt_bounds`, pure)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from llmservice_server.prompt_bounds import PromptBounds, longest_entry, tokenize_bounded

BOUNDS = PromptBounds(context=100, chars_per_token=8, vocab_size=1000)


def test_a_text_is_refused_only_past_context_times_the_longest_entry() -> None:
    assert BOUNDS.max_chars == 800
    assert BOUNDS.prompt_texts([800]) is None
    refusal = BOUNDS.prompt_texts([10, 801])
    assert refusal is not None
    assert (refusal.param, refusal.code) == ("prompt", "context_length_exceeded")
    assert "801 characters" in refusal.message and "100 tokens" in refusal.message


def test_every_other_field_has_its_bound() -> None:
    assert BOUNDS.token_ids([100]) is None and BOUNDS.token_ids([101]) is not None
    assert BOUNDS.messages(100, 800) is None
    assert BOUNDS.messages(101, 10) is not None  # each message takes a token at least
    assert BOUNDS.messages(2, 801) is not None
    assert BOUNDS.stop([800]) is None and BOUNDS.stop([801]) is not None
    assert BOUNDS.tools(800) is None and BOUNDS.tools(801) is not None
    assert BOUNDS.logit_bias(1000) is None and BOUNDS.logit_bias(1001) is not None


def test_the_longest_entry_is_counted_in_characters() -> None:
    assert longest_entry(["a", "ĠHello", "<|im_start|>"]) == 12
    assert longest_entry([]) == 1


class Counting:
    """A tokenizer of one token per character that remembers how much text it was given."""

    def __init__(self) -> None:
        self.read: list[int] = []

    def __call__(self, text: str) -> list[int]:
        self.read.append(len(text))
        return [ord(c) for c in text]


def test_a_text_of_short_tokens_is_refused_from_its_prefix() -> None:
    tokenize = Counting()
    assert tokenize_bounded(tokenize, "x" * 100_000, context=100) is None
    assert tokenize.read == [(100 + 1) * 4]  # never the whole text


def test_a_short_text_is_tokenised_once_and_whole() -> None:
    tokenize = Counting()
    assert tokenize_bounded(tokenize, "hello", context=100) == [ord(c) for c in "hello"]
    assert tokenize.read == [5]


def test_a_long_text_of_long_tokens_is_read_whole_after_its_prefix() -> None:
    def eight_chars_a_token(text: str) -> list[int]:
        return list(range(len(text) // 8))

    ids = tokenize_bounded(eight_chars_a_token, "y" * 800, context=100)
    assert ids is not None and len(ids) == 100


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=400))
def test_no_text_has_more_characters_than_its_tokens_can_hold(tokenizer: Any, text: str) -> None:
    # The claim the character bound rests on, against a real byte-level BPE vocabulary: a text
    # refused for its length could never have fitted.
    chars_per_token = longest_entry(tokenizer.get_vocab())
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) * chars_per_token >= len(text)
