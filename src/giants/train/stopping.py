"""Stopping a run cleanly on Ctrl-C (SIGINT) or SIGTERM (a scheduler's pre-emption, `kill`, torchrun passing a
signal on): the step in progress finishes, a checkpoint is written and the run returns (`summary["stopped"]`), so
`--resume` continues it exactly.

While giants.train.trainer.Trainer.run trains, StopSignal replaces the SIGINT and SIGTERM handlers (main thread
only; the previous handlers come back when the loop ends). A signal only records itself; the loop looks at the
record at each step boundary. Under scale-out the ranks agree there (an all-reduce of the flag), so every rank
stops after the same step and the sharded save is one collective, whichever rank the signal reached. In one
process a second Ctrl-C stops at once, without a checkpoint (KeyboardInterrupt); under torchrun it does not, since
the terminal's Ctrl-C reaches the workers and torchrun passes it on as well (torchrun kills workers that have not
exited after its own grace period).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignal:
    def __init__(self, *, force_on_repeat: bool, announce: bool) -> None:
        self.signum: int | None = None
        self.force_on_repeat = force_on_repeat
        self.announce = announce
        self._previous: dict[int, Any] = {}
        self._at = 0.0

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread: no clean stop here
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except (ValueError, OSError):
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum is not None:
            # a second Ctrl-C (not the same key press arriving twice) stops at once, in one process
            if self.force_on_repeat and signum == signal.SIGINT and now - self._at > 1.0:
                raise KeyboardInterrupt
            return
        self.signum, self._at = signum, now
        if self.announce:
            again = "; Ctrl-C again to stop at once without one" if self.force_on_repeat else ""
            # (os.write: print() from a handler could re-enter a buffered write that the signal interrupted)
            msg = f"\ngiants train: {name(signum)}: finishing this step, then writing a checkpoint{again}\n"
            try:
                os.write(2, msg.encode())
            except OSError:
                pass


def name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
