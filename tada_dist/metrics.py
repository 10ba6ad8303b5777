"""What a run reports while it trains: loss averages, throughput, progress, and their totals over resumes.

MetricsLogger owns the logging interval: the trainer hands it every step's loss terms and it decides
when to average them, write them to MLflow and show them. On a terminal progress is a tqdm bar; when
the output goes to a file or a pipe it is one plain line per log interval, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from tada_dist.tracking import Tracker


@dataclass
class RunningMeans:
    """Averages of the loss terms since the last log. Sums stay tensors until then, so that reading
    them adds no wait for the GPU (the step's one sync is the all-ranks finiteness check)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.detach().clone()
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {key: float(total) / max(self.count, 1) for key, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


@dataclass
class RunTotals:
    """Training time and images over the whole run, carried in checkpoints across resumes."""

    train_seconds: float = 0.0  # in the training loop, start-up and evaluation excluded
    images: int = 0  # images through the network, both domains, all ranks

    def state_dict(self) -> dict:
        return {"train_seconds": self.train_seconds, "images": self.images}

    def load_state_dict(self, state: dict) -> None:
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.images = int(state.get("images", 0))

    @property
    def images_per_sec(self) -> float:
        return self.images / self.train_seconds if self.train_seconds > 0 else 0.0


class Progress:
    """A tqdm bar on a terminal; otherwise a line per `update(..., line=True)`, and nothing in between."""

    def __init__(self, *, total: int, initial: int, desc: str, enabled: bool):
        self.enabled = enabled
        self.total = total
        self.interactive = enabled and sys.stderr.isatty()
        self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit="step") \
            if self.interactive else None
        self._started, self._start_step = time.perf_counter(), initial

    def update(self, step: int, values: dict[str, float] | None = None) -> None:
        """Advance to `step`; `values` (at a log interval) are shown beside it."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            if values:
                self._bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
        elif self.enabled and values:
            done = step - self._start_step
            elapsed = time.perf_counter() - self._started
            eta = elapsed / done * (self.total - step) if done else 0.0
            shown = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
            print(f"step {step}/{self.total}  {shown}  eta {_duration(eta)}", flush=True)

    def write(self, line: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class MetricsLogger:
    """Every `log_every` steps (and at the last one): loss means, lr, throughput and data wait to MLflow
    and the progress display. Throughput counts the time inside the training loop only."""

    SHOWN = ("loss", "cls", "images_per_sec")

    def __init__(self, tracker: Tracker, progress: Progress, *, log_every: int, total_steps: int,
                 images_per_step: int, totals: RunTotals):
        self.tracker = tracker
        self.progress = progress
        self.log_every = log_every
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.totals = totals
        self._means = RunningMeans()
        self._window_steps = 0
        self._window_seconds = 0.0
        self._window_wait = 0.0

    def after_step(self, step: int, terms: dict[str, torch.Tensor] | None, *, started: float, data_wait: float,
                   extra: dict[str, float]) -> None:
        """Record one optimizer step (terms None: it was skipped) that began at perf_counter() `started`
        and waited `data_wait` seconds for batches; `extra` values are logged as they are at the
        interval. The time of this call (logging, progress) counts too, in the next window: throughput
        is the loop's wall time, as a user's clock sees it."""
        if terms is not None:
            self._means.add(terms)
        self._count(time.perf_counter() - started, data_wait)
        if step % self.log_every and step != self.total_steps:
            self.progress.update(step)
            return
        logging_started = time.perf_counter()
        metrics = self._means.pop()
        metrics.update(
            images_per_sec=self.images_per_step * self._window_steps / max(self._window_seconds, 1e-9),
            data_wait_sec=self._window_wait / self._window_steps,
            **extra,
        )
        self.tracker.log_metrics(metrics, step=step)
        self.progress.update(step, {k: metrics[k] for k in self.SHOWN if k in metrics})
        self._window_steps, self._window_seconds, self._window_wait = 0, 0.0, 0.0
        self._count(time.perf_counter() - logging_started, 0.0, steps=0)

    def _count(self, seconds: float, data_wait: float, *, steps: int = 1) -> None:
        self._window_steps += steps
        self._window_seconds += seconds
        self._window_wait += data_wait
        self.totals.train_seconds += seconds
        self.totals.images += self.images_per_step * steps
