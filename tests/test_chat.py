"""`giants chat` driven through a pseudo-terminal (pexpect): answers stream, the conversation is kept,
/reset and /exit work, Ctrl-C stops an answer, Ctrl-C / Ctrl-D at the prompt exit with status 0."""

from __future__ import annotations

import os
import sys

import pexpect
import pytest

PROMPT = ">>> "


def spawn(*args: str) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "giants.cli", "chat", *args], encoding="utf-8", timeout=120,
                          dimensions=(40, 200), env={**os.environ, "TERM": "dumb"})
    child.expect("/reset clears the conversation")
    child.expect_exact(PROMPT)
    return child


def answer(child: pexpect.spawn, line: str) -> str:
    child.sendline(line)
    child.expect_exact(line)  # the terminal echoes the line
    child.expect_exact(PROMPT)
    return child.before.strip()


def test_chat_tiny_interrupt_reset_and_ctrl_d():
    child = spawn("tiny-llama", "--max-tokens", "8", "--temperature", "0")
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
    assert child.exitstatus == 0

    child = spawn("tiny-llama", "--max-tokens", "1900", "--temperature", "0")
    try:
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
    answers = []
    for extra in ([], ["--compile"]):
        child = spawn("tiny-llama", "--max-tokens", "12", "--temperature", "0", *extra)
        try:
            answers.append(answer(child, "hello there"))
            child.sendline("/exit")
            child.expect(pexpect.EOF)
        finally:
            child.close()
    assert answers[0] == answers[1] and answers[0].endswith("[max tokens]")
