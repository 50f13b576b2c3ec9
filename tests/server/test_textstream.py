"""Incremental detokenization: the native (tokenizers' DecodeStream) path and the Python window path agree.

Ids are drawn at random from the whole vocabulary, so multi-byte characters get split across
tokens, invalid byte sequences occur and special tokens appear mid-stream.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from llmservice_server.textstream import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def stream(tokenizer: PreTrainedTokenizerBase, prompt: list[int], generated: list[int], *, native: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt, native=native)
    return [detok.add(token) for token in generated] + [detok.flush()]


def test_the_native_path_is_taken_for_a_fast_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    assert IncrementalDetokenizer(tokenizer, [1])._stream is not None


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_native_and_window_paths_release_the_same_chunks(tokenizer: PreTrainedTokenizerBase, data: st.DataObject) -> None:
    ids = st.integers(0, len(tokenizer) - 1)
    prompt = data.draw(st.lists(ids, max_size=8))
    generated = data.draw(st.lists(ids, min_size=1, max_size=40))
    assert stream(tokenizer, prompt, generated, native=True) == stream(tokenizer, prompt, generated, native=False)


@pytest.mark.parametrize("text", ["plain ascii words", "héllo wörld, 日本語 and emoji 🎉🎉 mixed in", "  leading and   inner spaces\n"])
def test_streamed_text_is_the_whole_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for native in (True, False):
        chunks = stream(tokenizer, ids[:3], ids[3:], native=native)
        assert "".join(chunks) == tokenizer.decode(ids[3:], skip_special_tokens=True)
