"""Token ids -> text, one token at a time, with stop strings held back and cut off.

Decoding a token on its own is wrong for byte-level BPE (a character can span tokens) and for
SentencePiece (a leading space depends on the previous token), so text is decoded over a small
window of previous ids and only the new suffix is released (vLLM's incremental scheme). Text that
could be the start of a stop string is held back until it is clear it is not; a matched stop
string and anything after it is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 6  # prompt ids kept as decoding context for the first generated token


class Decoder(Protocol):
    def decode(self, token_ids: Any, skip_special_tokens: bool = ..., **kwargs: Any) -> str | list[str]: ...


class IncrementalDetokenizer:
    def __init__(self, decoder: Decoder, prompt_ids: Sequence[int]) -> None:
        self._decoder = decoder
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def _window(self, start: int, end: int | None = None) -> str:
        return str(self._decoder.decode(self._ids[start:end], skip_special_tokens=True))

    def add(self, token: int) -> str:
        """Append a token; return the text it completes ('' while a character is partial)."""
        self._ids.append(token)
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

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self._stops), default=0)
        self.text = ""  # everything decoded so far
        self.sent = 0  # how much of `text` has been released
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add decoded text; return the part that can be released now."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self._longest + 1)
        self.text += piece
        cut = self._find_stop(start)
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        return self._release(len(self.text) - self._held_back())

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
