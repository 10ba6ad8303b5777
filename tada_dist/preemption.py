"""Graceful stop on SIGTERM: finish the current step, save a checkpoint, exit.

Clusters announce pre-emption and time limits with SIGTERM (SLURM sends it to every task, torchrun
forwards it to its workers) and follow with SIGKILL after a grace period. The handler only records
the request; the training loop acts on it between steps, after all ranks have agreed, so that the
checkpoint is a collective save at one step on every rank.
"""

from __future__ import annotations

import signal
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM,)


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
        self.received = signal.Signals(signum)

    def __enter__(self) -> StopRequest:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
