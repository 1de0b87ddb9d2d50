"""Incremental detokenization and stop strings.

Text is decoded over a short sliding window of ids (vLLM's prefix/read offsets) so each token costs
O(1) decode work and word-boundary spaces come out as in a full decode. Text that could still be the
start of a stop string is held back, so a stop string split across tokens is never emitted. Stop strings are
found by an Aho-Corasick automaton fed only the new characters, so a token costs the same whether a request
has one stop string or thousands.
"""

from __future__ import annotations

from typing import Any


def decode(tokenizer: Any, ids: list[int], skip_special_tokens: bool = True) -> str:
    try:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    except TypeError:
        return tokenizer.decode(ids)


class StopMatcher:
    """Aho-Corasick over a set of stop strings. Built once per request (O(total characters)); a sequence keeps
    only its automaton state, and feeding it k characters costs O(k) amortised whatever the number or length
    of the stop strings. Reports, among the matches ending in the characters fed, the one that starts first
    (ties: the one that ends first)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = list(stops)
        self.max_len = max((len(s) for s in self.stops), default=0)
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        word: list[str | None] = [None]  # the longest stop string that is a suffix of this state's text
        for s in self.stops:
            node = 0
            for ch in s:
                nxt = goto[node].get(ch)
                if nxt is None:
                    nxt = goto[node][ch] = len(goto)
                    goto.append({})
                    depth.append(depth[node] + 1)
                    word.append(None)
                node = nxt
            word[node] = s  # the node's whole text: longer than any stop string that is a proper suffix of it
        fail = [0] * len(goto)
        queue = list(goto[0].values())
        for node in queue:  # breadth first: a node's failure link is settled before its children's
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f][ch] if ch in goto[f] and goto[f][ch] != child else 0
                if word[child] is None:
                    word[child] = word[fail[child]]
                queue.append(child)
        self.goto, self.fail, self.word = goto, fail, word

    def feed(self, state: int, text: str, offset: int) -> tuple[int, tuple[int, str] | None]:
        """Advance `state` over `text` (which starts at index `offset` of the whole text): the new state and
        (start index, stop string) of the earliest-starting match that ends in `text`, or None."""
        goto, fail, word = self.goto, self.fail, self.word
        best = None
        for i, ch in enumerate(text):
            while state and ch not in goto[state]:
                state = fail[state]
            state = goto[state].get(ch, 0)
            w = word[state]
            if w is not None:
                start = offset + i + 1 - len(w)
                if best is None or start < best[0]:
                    best = (start, w)
        return state, best


class IncrementalText:
    """The output text of one sequence, grown token by token. `stop`: the stop strings, or their StopMatcher
    (SamplingParams.stop_matcher, built once for all the sequences of a request)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str] | StopMatcher,
                 skip_special_tokens: bool) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.matcher = stop if isinstance(stop, StopMatcher) else StopMatcher(stop) if stop else None
        self.stop = self.matcher.stops if self.matcher is not None else []
        self.state = 0  # the matcher's state after self.text
        self.hold = max(self.matcher.max_len if self.matcher is not None else 1, 1) - 1
        self.ids = list(prompt_ids[-6:])  # a little prompt context for leading spaces
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""
        self.emitted = 0  # characters of self.text handed out so far

    def add(self, token_id: int, match: bool = True) -> str | None:
        """Append a token; returns the stop string if the text now contains one (text cut before it).
        match=False: a stop string found now is let through (min_tokens: vLLM ignores them until then)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return None
        prefix = decode(self.tokenizer, self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = decode(self.tokenizer, self.ids[self.prefix_offset:], self.skip)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            offset = len(self.text)
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.matcher is not None:
                self.state, best = self.matcher.feed(self.state, new, offset)
                if best is not None and match:
                    self.text = self.text[:best[0]]
                    return best[1]
        return None

    def take_new(self, finished: bool) -> str:
        """Text not yet handed out, keeping back what could still begin a stop string."""
        end = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        new = self.text[self.emitted:end]
        self.emitted = end
        return new
