"""`giants chat MODEL`: talk to a model in the terminal.

Tokens stream as the engine produces them; the conversation is kept (oldest turns are dropped when it
outgrows the context); `/reset` starts over, `/exit` quits. Ctrl-C while the model answers stops that
answer (the part already printed stays in the conversation); Ctrl-C or Ctrl-D at the prompt exits.

Ctrl-C during an answer only raises a flag that the loop checks between engine steps, so an interrupt
never lands in the middle of a step and the engine's state stays consistent for the next turn.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from typing import Any, TextIO

HELP = "/reset clears the conversation, /exit quits; Ctrl-C stops an answer, Ctrl-C or Ctrl-D here exits."


@dataclass
class ChatOptions:
    model: str
    system: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    max_model_len: int | None = None
    dtype: str | None = None
    device: str | None = None
    compile: bool = False  # CPU: the compiled batch-1 decode (LLM(cpu_compile=True))
    threads: int | None = None  # CPU threads (None: giants.inference.cpu_threads decides)


class Conversation:
    """Messages plus the prompt that fits the context."""

    def __init__(self, tokenizer: Any, system: str | None, max_model_len: int, reserve: int):
        self.tok, self.system, self.limit, self.reserve = tokenizer, system, max_model_len, reserve
        self.turns: list[dict[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def prompt(self) -> list[int]:
        """Token ids of the conversation so far plus the assistant header, dropping the oldest exchanges
        until at least `reserve` tokens (or half the context) stay free for the answer."""
        room = min(self.reserve, self.limit // 2)
        while True:
            text = self.tok.apply_chat_template(self.messages(), add_generation_prompt=True)
            ids = self.tok.encode(text, add_special_tokens=False)
            if len(ids) + room <= self.limit or len(self.turns) <= 1:
                break
            self.turns = self.turns[2:] if len(self.turns) > 2 else self.turns[1:]
        if len(ids) >= self.limit:
            raise ValueError(f"the message is {len(ids)} tokens; the context holds {self.limit}")
        return ids


class _Interrupt:
    """SIGINT handler that only sets a flag, installed while an answer streams."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> _Interrupt:
        self.hit = False
        self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, sig: int, frame: Any) -> None:
        self.hit = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGINT, self._old)


def stream_reply(engine: Any, prompt: list[int], params: Any, out: TextIO, request_id: str,
                 interrupt: _Interrupt) -> tuple[str, str]:
    """Run one request to the end (or to Ctrl-C), printing text as it comes. Returns (text, finish_reason)."""
    engine.add_request(request_id, prompt, params)
    text, finish = "", None
    while finish is None:
        if interrupt.hit:
            engine.abort_request(request_id)  # frees its KV blocks now
            return text, "interrupted"
        for r in engine.step():
            if r.request_id != request_id:
                continue
            c = r.outputs[0]
            if c.new_text:
                out.write(c.new_text)
                out.flush()
                text += c.new_text
            if r.finished:
                finish = c.finish_reason or "stop"
        if finish is None and not engine.has_unfinished_requests():
            finish = "stop"
    return text, finish


def chat(opts: ChatOptions, out: TextIO = sys.stdout) -> int:
    from giants.inference import LLM, SamplingParams

    try:  # line editing and history for input(), where the platform has it
        import readline  # noqa: F401
    except ImportError:
        pass
    from giants.inference.cli import _check_preset_tokenizer, _is_preset

    if _is_preset(opts.model):  # random weights and maybe no tokenizer: say so before building anything
        _check_preset_tokenizer(opts.model)
    print(f"loading {opts.model} ...", file=out, flush=True)
    from giants.cpu import bulk_threads

    with bulk_threads():  # loading, fusing and packing: no spinning barriers while other jobs hold the cores
        llm = LLM(opts.model, dtype=opts.dtype, device=opts.device, max_model_len=opts.max_model_len,
                  seed=opts.seed if opts.seed is not None else 0, max_num_seqs=1, cpu_compile=opts.compile,
                  cpu_threads=opts.threads)
    tok = llm.tokenizer
    if tok is None or getattr(tok, "chat_template", None) is None:
        raise ValueError(f"{opts.model}: chat needs a tokenizer with a chat template (found "
                         f"{'none' if tok is None else 'a tokenizer without one'})")
    engine = llm.engine
    params = SamplingParams(temperature=opts.temperature, top_p=opts.top_p, max_tokens=opts.max_tokens,
                            seed=opts.seed)
    conv = Conversation(tok, opts.system, engine.max_model_len, opts.max_tokens)
    if getattr(llm, "random_weights", False):
        from giants.inference.preflight import random_weights_note

        print(f"note: {random_weights_note(opts.model)}", file=out, flush=True)
    print(f"giants chat with {opts.model}{' (RANDOM weights)' if getattr(llm, 'random_weights', False) else ''}. "
          f"{HELP}", file=out, flush=True)
    interrupt = _Interrupt()
    turn = 0
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out, flush=True)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit", "/bye"):
            return 0
        if cmd == "/reset":
            conv.reset()
            print("(conversation cleared)", file=out, flush=True)
            continue
        if cmd.startswith("/") and " " not in cmd:
            print(f"unknown command {cmd}. {HELP}", file=out, flush=True)
            continue
        conv.turns.append({"role": "user", "content": line})
        try:
            prompt = conv.prompt()
        except ValueError as e:
            conv.turns.pop()
            print(f"(too long: {e})", file=out, flush=True)
            continue
        turn += 1
        with interrupt:
            text, finish = stream_reply(engine, prompt, params, out, f"chat-{turn}", interrupt)
        if finish == "interrupted":
            print(" [interrupted]", file=out, flush=True)
        elif finish == "length":
            print(" [max tokens]", file=out, flush=True)
        else:
            print(file=out, flush=True)
        conv.turns.append({"role": "assistant", "content": text})
