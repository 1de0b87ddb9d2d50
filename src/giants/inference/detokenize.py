"""Incremental detokenization and stop strings.

Text is decoded over a short sliding window of ids (vLLM's prefix/read offsets) so each token costs
O(1) decode work and word-boundary spaces come out as in a full decode. Text that could still be the
start of a stop string is held back, so a stop string split across tokens is never emitted.
"""

from __future__ import annotations

from typing import Any


def decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool = True) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    except TypeError:
        return tokenizer.decode(ids)


class IncrementalText:
    """The output text of one sequence, grown token by token."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str], skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids = list(prompt_ids[-6:])  # a little prompt context for leading spaces
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0  # characters of self.text handed out so far
        self.searched = 0  # stop strings cannot start before this index

    def add(self, token_id: int) -> str | None:
        """Append a token; returns the stop string if the text now contains one (text cut before it)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return None
        prefix = decode(self.tokenizer, self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.tokenizer, self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop:
            best = None
            for s in self.stop:
                i = self.text.find(s, self.searched)
                if i >= 0 and (best is None or i < best[0]):
                    best = (i, s)
            self.searched = max(self.searched, len(self.text) - self.hold)
            if best is not None:
                self.text = self.text[:best[0]]
                return best[1]
        return None

    def take_new(self, finished: bool) -> str:
        """Text not yet handed out, keeping back what could still begin a stop string."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        new = self.text[self.emitted:end]
        self.emitted = end
        return new
