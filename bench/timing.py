"""Timing of GPU and CPU calls for the benchmarks: repeated calls, quantiles, peak memory, copy bandwidth.

On a GPU each call is timed with CUDA events after flushing the L2 cache, so every call starts from
memory; on a CPU with perf_counter. The first call is never timed (it compiles Triton kernels and
torch.compile graphs).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
L2_FLUSH_BYTES = 256 * 2**20  # larger than any GPU's L2, so each timed call starts from memory


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of at least two samples."""
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), deciles[1], deciles[7]


def rate_quantiles(amount: float, samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of amount per second over timed calls: a rate's 20th percentile is amount
    over the 80th percentile of time, and the other way round."""
    median, p20, p80 = quantiles(samples_ms)
    return amount * 1e3 / median, amount * 1e3 / p80, amount * 1e3 / p20


def time_calls(
    fn: Callable[[], object], device: torch.device, *, rep_ms: float, min_reps: int = 5, max_reps: int = 1000,
    setup: Callable[[], None] = lambda: None,
) -> list[float]:
    """Milliseconds of each of several calls of fn; setup runs untimed before every call.

    The first call is not timed (it compiles, for torch.compile and Triton); three more estimate a
    call's cost, which sets the number of timed calls to fill about rep_ms.
    """
    setup()
    fn()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(3):
        setup()
        fn()
    synchronize(device)
    estimate_ms = (time.perf_counter() - started) * 1e3 / 3
    reps = int(min(max(rep_ms / max(estimate_ms, 1e-3), min_reps), max_reps))

    if device.type != "cuda":
        samples = []
        for _ in range(reps):
            setup()
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
        return samples

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        setup()
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) for start, end in events]


def peak_memory_mb(fn: Callable[[], object], device: torch.device, setup: Callable[[], None]) -> float | None:
    """Peak memory one call allocates above what is live before it (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    setup()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def copy_bandwidth(device: torch.device, rep_ms: float) -> tuple[int, list[float]]:
    """(bytes moved, [median, p20, p80] GB/s) copying a large tensor: the device's practical memory roofline."""
    source = torch.randn(2**30 // 4, device=device)  # 1 GiB, beyond any cache
    target = torch.empty_like(source)
    samples = time_calls(lambda: target.copy_(source), device, rep_ms=rep_ms, min_reps=10)
    moved = 2 * source.nbytes  # every byte is read once and written once
    return moved, [rate / 1e9 for rate in rate_quantiles(moved, samples)]


def one_line_error(error: Exception) -> str:
    """The exception's type and the first line of its message, for a table cell."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first[:200]}"
