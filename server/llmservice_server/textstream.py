"""Token ids -> text, one token at a time, with stop strings held back and cut off.

Decoding a token on its own is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a leading space depends on the previous token), so text is decoded over a small
window of previous ids and only the new suffix is released (vLLM's incremental scheme). Text that
could be the start of a stop string is held back until it is clear it is not; a matched stop
string and anything after it is never returned.

With a fast (Rust) tokenizer the window decode of each token runs inside `tokenizers`'
`DecodeStream`, which implements the same prefix/read-offset scheme in one native call: about
8x cheaper than two Python-level `decode` calls, and it runs once per token per running sequence
on the engine thread. The window bookkeeping stays here, so `flush` and slow tokenizers use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 6  # prompt ids kept as decoding context for the first generated token


class Decoder(Protocol):
    def decode(self, token_ids: Any, skip_special_tokens: bool = ..., **kwargs: Any) -> str | list[str]: ...


def _native(decoder: Decoder) -> Tokenizer | None:
    """The Rust tokenizer behind a fast tokenizer whose `decode` adds nothing to the Rust one."""
    native = getattr(decoder, "_tokenizer", None)
    if not isinstance(native, Tokenizer) or getattr(decoder, "clean_up_tokenization_spaces", False):
        return None  # the Python-side clean-up would make the two decodes differ
    return native


class IncrementalDetokenizer:
    def __init__(self, decoder: Decoder, prompt_ids: Sequence[int], *, native: bool = True, skip_special_tokens: bool = True) -> None:
        self._decoder = decoder
        self._skip = skip_special_tokens
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)
        tokenizer = _native(decoder) if native else None
        if tokenizer is not None and REPLACEMENT in tokenizer.decode(self._ids, skip_special_tokens=skip_special_tokens):
            # DecodeStream puts a context's broken character (U+FFFD) into its first chunk, where the
            # window scheme leaves it out (found by tests/server/test_textstream.py).
            tokenizer = None
        stream = DecodeStream(ids=list(self._ids), skip_special_tokens=skip_special_tokens) if tokenizer is not None else None
        self._stream = (stream, tokenizer) if stream is not None and tokenizer is not None else None

    def _window(self, start: int, end: int | None = None) -> str:
        return str(self._decoder.decode(self._ids[start:end], skip_special_tokens=self._skip))

    def add(self, token: int) -> str:
        """Append a token; return the text it completes ('' while a character is partial)."""
        self._ids.append(token)
        if self._stream is not None:
            stream, tokenizer = self._stream
            try:
                text = stream.step(tokenizer, token)
            except Exception:  # tokenizers refuses a window whose decode does not extend the previous one
                self._stream = None  # the window below holds the same state: carry on there
            else:
                if text is None:
                    return ""
                self._prefix, self._read = self._read, len(self._ids)
                return text
        before = self._window(self._prefix, self._read)
        after = self._window(self._prefix)
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still pending at the end (possibly an incomplete character)."""
        before = self._window(self._prefix, self._read)
        after = self._window(self._prefix)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


class StopMatcher:
    """Accumulates text; releases what is safe to send; detects stop strings."""

    def __init__(self, stops: Sequence[str], *, include_stop: bool = False) -> None:
        self._stops = [s for s in stops if s]
        self._include = include_stop  # vLLM's include_stop_str_in_output: the matched stop string is sent too
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""  # everything decoded so far
        self.sent = 0  # how much of `text` has been released
        self.stopped = False

    def push(self, piece: str, *, match: bool = True) -> str:
        """Add decoded text; return the part that can be released now.

        `match=False` (before vLLM's min_tokens): the text is released as it is, and no stop string
        found later begins inside it."""
        if self.stopped:
            return ""
        start = max(self.sent, len(self.text) - self._longest + 1)
        self.text += piece
        if not match:
            return self._release(len(self.text))
        cut = self._find_stop(start)
        if cut is not None:
            self.stopped = True
            return self._release(cut + self._matched_length(cut) if self._include else cut)
        return self._release(len(self.text) - self._held_back())

    def _matched_length(self, at: int) -> int:
        return max(len(s) for s in self._stops if self.text.startswith(s, at))

    def finish(self) -> str:
        """Release everything held back (the sequence ended for another reason)."""
        return "" if self.stopped else self._release(len(self.text))

    def _find_stop(self, start: int) -> int | None:
        hits = [i for i in (self.text.find(s, start) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        # Longest suffix of the text that is a proper prefix of some stop string.
        for size in range(min(self._longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        piece = self.text[self.sent : end]
        self.sent = end
        return piece
