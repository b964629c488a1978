"""Stopping a run cleanly: SIGINT/SIGTERM set a flag that the training loop checks once per step; it then
saves a checkpoint and exits 0. A second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["StopFlag"]


class StopFlag:
    """SIGINT/SIGTERM set a flag that the loop checks once per step (it then checkpoints and exits 0)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step", file=sys.stderr)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signal is not None
