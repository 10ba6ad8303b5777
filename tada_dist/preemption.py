"""Graceful stop on SIGTERM and Ctrl-C: finish the current step, save a checkpoint, exit.

Clusters announce pre-emption and time limits with SIGTERM (SLURM sends it to every task, torchrun
forwards it to its workers) and follow with SIGKILL after a grace period; a person at the terminal
presses Ctrl-C (SIGINT). The handler only records the request; the training loop acts on it between
steps, after all ranks have agreed, so that the checkpoint is a collective save at one step on every
rank. A second Ctrl-C means "now": it raises KeyboardInterrupt at once, without saving.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Records whether a stop signal arrived; a context manager that installs and restores the handler."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if self.received is None:
            self.received = signal.Signals(signum)
            if signum == signal.SIGINT:
                print("\nCtrl-C: finishing this step and saving a checkpoint (press Ctrl-C again to stop at once)",
                      file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
