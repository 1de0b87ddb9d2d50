"""OpenAI's logprobs shapes from the engine's per-token {token id: logprob} dicts: the completions API's parallel
lists (tokens, token_logprobs, top_logprobs, text_offset) and the chat API's content entries (token, bytes, top)."""

from __future__ import annotations

from typing import Any

from giants.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


def _token_text(tok: Any, token_id: int) -> str:
    return tok.decode([token_id])


def _top(d: dict[int, float] | None, n: int) -> list[tuple[int, float]]:
    if not d:
        return []
    return sorted(d.items(), key=lambda kv: -kv[1])[:n]


def completion_logprobs(tok: Any, token_ids: list[int], lps: list[Any] | None, n: int,
                        offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    pos = offset
    for t, d in zip(token_ids, lps or []):
        text = _token_text(tok, t)
        out.tokens.append(text)
        out.token_logprobs.append(None if d is None else float(d.get(t, float("-inf"))))
        out.top_logprobs.append(None if d is None else {_token_text(tok, i): float(v) for i, v in _top(d, n)})
        out.text_offset.append(pos)
        pos += len(text)
    return out


def chat_logprobs(tok: Any, token_ids: list[int], lps: list[Any] | None, n: int) -> ChatLogprobs:
    content = []
    for t, d in zip(token_ids, lps or []):
        text = _token_text(tok, t)
        tops = [TopLogprob(token=_token_text(tok, i), logprob=float(v), bytes=list(_token_text(tok, i).encode()))
                for i, v in _top(d, n)]
        content.append(TokenLogprob(token=text, logprob=float((d or {}).get(t, float("-inf"))),
                                    bytes=list(text.encode()), top_logprobs=tops))
    return ChatLogprobs(content=content)
