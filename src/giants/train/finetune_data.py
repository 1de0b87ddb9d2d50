"""Finetuning data: chat JSONL for SFT, (prompt, chosen, rejected) JSONL for DPO.

SFT line:  {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
DPO line:  {"prompt": "..." or [messages], "chosen": "...", "rejected": "..."}

Conversations are rendered with the tokenizer's chat template. The loss mask comes from rendering
growing prefixes of the conversation: the text that an assistant turn adds after the generation
prompt (its content and end-of-turn marker) is trained on, everything else (system, user, the
template's headers) is labelled IGNORE_INDEX. Each segment is tokenised separately, so the mask is
exact at token level.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from giants.train.losses import IGNORE_INDEX


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken; labels[t] is the target for ids[t]'s prediction


def _read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    if b"\x00" in data[:1 << 20]:
        raise ValueError(f"{path}: looks like a binary file, expected JSON lines")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (invalid byte at offset {e.start})") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{i}: each line must be a JSON object")
        rows.append((i, obj))
    if not rows:
        raise ValueError(f"{path}: no examples (file is empty)")
    return rows


def _check_messages(msgs: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f'{where}: "messages" must be a non-empty list')
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f'{where}: every message needs string "role" and "content"')
    return msgs


def _segments(tok: Any, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """(text, is_trained) pieces whose concatenation is the rendered conversation."""
    has_template = getattr(tok, "chat_template", None) is not None
    if not has_template:
        # No template: plain "role: content" lines, EOS after each assistant turn.
        eos = tok.decode([tok.eos_token_id]) if getattr(tok, "eos_token_id", None) is not None else ""
        segs = []
        for m in messages:
            if m["role"] == "assistant":
                segs.append(("assistant: ", False))
                segs.append((m["content"] + eos + "\n", True))
            else:
                segs.append((f"{m['role']}: {m['content']}\n", False))
        return segs
    segs: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        full = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError(f"{where}: the chat template does not render this conversation as growing prefixes; "
                             "cannot tell assistant tokens apart")
        segs.append((prompt[len(done):], False))
        segs.append((full[len(prompt):], True))
        done = full
    rendered = tok.apply_chat_template(messages, add_generation_prompt=False)
    if not rendered.startswith(done):
        raise ValueError(f"{where}: the chat template renders the whole conversation differently from its prefixes")
    if rendered[len(done):]:
        segs.append((rendered[len(done):], False))
    return segs


def _encode_segments(tok: Any, segs: list[tuple[str, bool]]) -> Example:
    ids: list[int] = []
    trained: list[bool] = []
    for text, train in segs:
        if not text:
            continue
        piece = tok.encode(text, add_special_tokens=False)
        ids.extend(piece)
        trained.extend([train] * len(piece))
    # labels[t] = ids[t+1] when token t+1 is an assistant token
    labels = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return Example(ids, labels)


def sft_example(tok: Any, messages: list[dict[str, str]], where: str = "conversation") -> Example:
    messages = _check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant message, nothing to train on")
    return _encode_segments(tok, _segments(tok, messages, where))


def load_sft(path: str | os.PathLike, tok: Any) -> list[Example]:
    out = []
    for i, obj in _read_jsonl(path):
        out.append(sft_example(tok, obj.get("messages"), f"{path}:{i}"))
    return out


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def dpo_pair(tok: Any, prompt: Any, chosen: str, rejected: str, where: str = "pair") -> Pair:
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    prompt = _check_messages(prompt, where)
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen or not rejected:
        raise ValueError(f'{where}: "chosen" and "rejected" must be non-empty strings')
    return Pair(sft_example(tok, [*prompt, {"role": "assistant", "content": chosen}], where),
                sft_example(tok, [*prompt, {"role": "assistant", "content": rejected}], where))


def load_dpo(path: str | os.PathLike, tok: Any) -> list[Pair]:
    out = []
    for i, obj in _read_jsonl(path):
        where = f"{path}:{i}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise ValueError(f'{where}: missing field "{key}"')
        out.append(dpo_pair(tok, obj["prompt"], obj["chosen"], obj["rejected"], where))
    return out


def collate(examples: list[Example], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids, labels and a token mask, T = longest example capped at seq_len. Padding
    comes after the real tokens, so causal attention never lets a real token see it."""
    T = min(seq_len, max(len(e.ids) for e in examples))
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for r, e in enumerate(examples):
        n = min(T, len(e.ids))
        ids[r, :n] = torch.tensor(e.ids[:n])
        lab = list(e.labels[:n])
        lab[-1] = IGNORE_INDEX  # a truncated example has no target for its last kept token
        labels[r, :n] = torch.tensor(lab)
        mask[r, :n] = True
    return ids, labels, mask


class ExampleReader:
    """Batches of items in a seeded permutation per epoch; position = (epoch, index), like BatchReader."""

    def __init__(self, items: list[Any], batch_size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if not items:
            raise ValueError("no examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
        self.items, self.batch_size, self.seed, self.shuffle = items, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.items)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def next_items(self) -> list[Any]:
        out = []
        while len(out) < self.batch_size:
            order = self._order(self.epoch)
            take = min(self.batch_size - len(out), len(order) - self.index)
            out.extend(self.items[int(i)] for i in order[self.index:self.index + take])
            self.index += take
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "n_items": len(self.items), "shuffle": self.shuffle}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for key, live in (("seed", self.seed), ("batch_size", self.batch_size), ("n_items", len(self.items)),
                          ("shuffle", self.shuffle)):
            if d.get(key) != live:
                raise ValueError(f"data position: saved {key}={d.get(key)!r} but this run has {live!r}")
        self.epoch, self.index = int(d["epoch"]), int(d["index"])
