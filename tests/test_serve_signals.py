"""Issue 25: Ctrl-C and SIGTERM stop a real `giants serve` cleanly. A terminal's Ctrl-C signals the whole
process group, chat-template workers included: the server drains, logs one "stopped" line and exits 0, with
no traceback from the workers or from uvicorn's lifespan (a second Ctrl-C used to leave a CancelledError), and
no process of the group left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from giants.serve.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama"  # random weights, a real tokenizer with a chat template: template workers start


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


class Server:
    """`giants serve` in a session of its own, so signalling its group is what a terminal's Ctrl-C does."""

    def __init__(self) -> None:
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "giants", "serve", MODEL, "--port", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.proc.kill()
        pytest.fail(f"not ready: {self.proc.communicate()}")

    def chat(self, max_tokens: int, stream: bool = False, timeout: float = 120,
             started: threading.Event | None = None) -> bytes:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                "stream": stream, "ignore_eos": True}
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            first = r.readline()
            if started is not None:
                started.set()
            return first + r.read()

    def finish(self, timeout: float = 120) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode, err

    def assert_group_gone(self) -> None:
        deadline = time.monotonic() + 10
        while _group(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group(self.proc.pid) == [], "processes of the server's group outlived it"


def _assert_clean(code: int, err: str, sig: str) -> None:
    assert code == 0, err
    assert "Traceback" not in err and "CancelledError" not in err and "KeyboardInterrupt" not in err, err
    assert [ln for ln in err.splitlines() if ln.endswith(f"stopped on {sig}")], err


def test_ctrl_c_to_the_group_stops_cleanly() -> None:
    srv = Server()
    try:
        srv.chat(3)  # the template workers render this one
        assert len(_group(srv.proc.pid)) >= 2, "no template worker in the group: the test would prove nothing"
        os.killpg(srv.proc.pid, signal.SIGINT)
        code, err = srv.finish()
        _assert_clean(code, err, "SIGINT")
        srv.assert_group_gone()
    finally:
        srv.finish(timeout=5) if srv.proc.poll() is None else None


def test_second_ctrl_c_ends_a_stream_without_a_traceback() -> None:
    srv = Server()
    got: dict[str, bytes | Exception] = {}
    started = threading.Event()

    def stream() -> None:
        try:
            got["body"] = srv.chat(2000, stream=True, started=started)  # seconds of decoding left to end
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            got["body"] = e
        started.set()

    t = threading.Thread(target=stream)
    try:
        t.start()
        assert started.wait(60)
        os.killpg(srv.proc.pid, signal.SIGINT)
        time.sleep(0.3)
        assert srv.proc.poll() is None and "body" not in got, "the stream ended before the second Ctrl-C"
        os.killpg(srv.proc.pid, signal.SIGINT)  # the impatient second Ctrl-C: end it now
        code, err = srv.finish()
        t.join(60)
        _assert_clean(code, err, "SIGINT")
        assert "second SIGINT" in err, err
        body = got["body"]
        assert isinstance(body, bytes) and body.rstrip().endswith(b"data: [DONE]"), body  # ended, not cut
        srv.assert_group_gone()
    finally:
        srv.finish(timeout=5) if srv.proc.poll() is None else None


def test_sigterm_stops_cleanly() -> None:
    srv = Server()
    try:
        srv.chat(3)
        srv.proc.send_signal(signal.SIGTERM)  # a supervisor signals the server alone
        code, err = srv.finish()
        _assert_clean(code, err, "SIGTERM")
        srv.assert_group_gone()
    finally:
        srv.finish(timeout=5) if srv.proc.poll() is None else None
