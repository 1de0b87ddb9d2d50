"""`giants chat` driven through a pseudo-terminal (pexpect): answers stream, the conversation is kept,
/reset and /exit work, Ctrl-C stops an answer, Ctrl-C / Ctrl-D at the prompt exit with status 0."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

PROMPT = ">>> "


def start(*args: str) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "giants.cli", "chat", *args], encoding="utf-8", timeout=120,
                         dimensions=(40, 200), env={**os.environ, "TERM": "dumb"})


def ready(child: pexpect.spawn) -> pexpect.spawn:
    child.expect("/reset clears the conversation")
    child.expect_exact(PROMPT)
    return child


def spawn(*args: str) -> pexpect.spawn:
    return ready(start(*args))


def answer(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(line)  # the terminal echoes the line
    child.expect_exact(PROMPT)
    return child.before.strip()


def test_chat_tiny_interrupt_reset_and_ctrl_d():
    child = spawn("tiny-llama", "--max-tokens", "8", "--temperature", "0")
    second = start("tiny-llama", "--max-tokens", "1900", "--temperature", "0")  # starting while the first is used
    try:
        first = answer(child, "hello there")
        assert first.endswith("[max tokens]") and len(first) > len("[max tokens]")
        # the same question with the conversation so far gives a different prompt; after /reset the same again
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(PROMPT)
        assert answer(child, "hello there") == first
        child.sendline("/nonsense")
        child.expect_exact("unknown command /nonsense")
        child.expect_exact(PROMPT)
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
        if child.exitstatus != 0:
            second.close()
    assert child.exitstatus == 0

    child = second
    try:
        ready(child)
        child.sendline("tell me everything")
        child.expect_exact("tell me everything")
        child.expect(r"\S+ \S+ \S+")  # tokens are streaming
        child.sendintr()  # Ctrl-C mid-answer stops the answer, not the program
        child.expect_exact("[interrupted]")
        child.expect_exact(PROMPT)
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact(PROMPT)
        child.sendeof()  # Ctrl-D at the prompt
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


@pytest.mark.parametrize("model", ["smollm2-135m"])
def test_chat_smollm2_keeps_conversation_and_ctrl_c_exits(model):
    from giants.checkpoint import hub

    hub.download(model)
    child = spawn(model, "--temperature", "0", "--max-tokens", "32")
    try:
        assert "Paris" in answer(child, "What is the capital of France?")
        assert "Berlin" in answer(child, "And of Germany?")  # only answerable with the first turn kept
        child.sendintr()  # Ctrl-C at the prompt
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


def test_chat_compiled_answers_like_eager():
    # the two chats side by side (each starts Python and torch; the compiled one then compiles): asked together,
    # their answers read one after the other
    args = ("tiny-llama", "--max-tokens", "12", "--temperature", "0")
    children = [start(*args, *extra) for extra in ([], ["--compile"])]
    answers = []
    try:
        for child in children:
            ready(child).sendline("hello there")
        for child in children:
            child.expect_exact("hello there")  # the terminal echoes the line
            child.expect_exact(PROMPT)
            answers.append(child.before.strip())
            child.sendline("/exit")
        for child in children:
            child.expect(pexpect.EOF)
    finally:
        for child in children:
            child.close()
    assert answers[0] == answers[1] and answers[0].endswith("[max tokens]")
