"""Start `giants serve` as a child process on a free loopback port and wait until it answers.

Used by the tests and the serving benchmark; handy in notebooks too:

    with ServerProcess("tiny-llama") as srv:
        client = openai.OpenAI(base_url=srv.base_url, api_key="none")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`host=None` passes no `--host`, so the server binds its default (127.0.0.1); clients still use loopback."""

    def __init__(self, model: str, *args: str, host: str | None = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, env: dict[str, str] | None = None, startup_timeout: float = 180.0):
        self.model, self.args, self.bind = model, list(args), host
        self.host = host or "127.0.0.1"
        self.port = port or free_port(self.host)
        self.api_key = api_key
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="giants-serve-", suffix=".log", delete=False)
        self.log_path = Path(self._log.name)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def command(self) -> list[str]:
        host = ["--host", self.bind] if self.bind is not None else []
        return [sys.executable, "-m", "giants.cli", "serve", self.model, *host, "--port", str(self.port), *self.args]

    def start(self, wait: bool = True) -> ServerProcess:
        env = {**os.environ, **(self.env or {})}
        env.pop("GIANTS_API_KEY", None)
        if self.api_key:  # through the environment: keys on a command line show up in `ps`
            env["GIANTS_API_KEY"] = self.api_key
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        if wait:
            self.wait_ready()
        return self

    def health(self, timeout: float = 5.0) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"giants serve exited with {self.proc.returncode} before it was ready:\n"
                                   f"{self.log()}")
            try:
                if self.health()[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"giants serve not ready after {self.startup_timeout:.0f} s:\n{self.log()}")

    def metrics(self) -> dict[str, float]:
        """Unlabelled and labelled samples of /metrics as {'name{labels}': value}."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def terminate(self) -> None:
        """SIGTERM: the server drains and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-20000:]

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
