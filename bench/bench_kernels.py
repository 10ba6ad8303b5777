"""Speed, peak memory and achieved bandwidth of the tada_kernels ops against their eager PyTorch forms.

    python bench/bench_kernels.py                                   # a CUDA device: the full sweep
    OMP_NUM_THREADS=1 python bench/bench_kernels.py --device cpu    # small shapes, eager providers

Kernels and their providers (the first named per kernel is the baseline of the "vs" column):

    grouped_mlp        bmm      stacked [K, C, H] weights, three torch.baddbmm in the input dtype
                       loop     K separate nn.Sequential, one per region: the literal model
                       compile  torch.compile of bmm
                       triton   tada_kernels.grouped_mlp(backend="triton")
    entropy_attention  eager    tada_kernels reference (backend="eager"), f channels-last
                       triton
    attention_pool     eager    tada_kernels.attention_pool(backend="eager"): one bmm over the map
                       unfused  entropy_attention (triton on a GPU, eager on a CPU), then the mean over
                                the map: the model's path before attention_pool existed
                       triton   the fused kernels: h is never written
    attentive_entropy  eager, triton

Modes: forward (autograd recording, as in training), backward (of a recorded graph) and full (both).
Dropout is off unless --dropout, and then the same in every provider; the feature map is channels-last
(the trainer's layout on GPUs) unless --layout nchw. Each measurement reports time (median, p20, p80 over repeated
calls; CUDA events after an L2 flush on a GPU, perf_counter on a CPU), peak memory above the inputs
(CUDA only; a CPU has no allocator statistics to read, so none is reported) and the bandwidth the
call achieves if it moved the minimum bytes a fused kernel must move: its inputs, weights and
outputs; for backward also the incoming and outgoing gradients, activations being recomputed rather
than stored. That bandwidth is compared with a large tensor copy timed on the same device.

Writes <out-dir>/kernels.csv (kernels_cpu.csv on a CPU) in long format, one row per metric, and a
markdown report beside it that checks the H200 targets when the triton provider was measured.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

import tada_kernels
from report import machine_description
from timing import DTYPES, copy_bandwidth, one_line_error, peak_memory_mb, quantiles, rate_quantiles, time_calls

MODES = ("forward", "backward", "full")
PROVIDERS = {
    "grouped_mlp": ("bmm", "loop", "compile", "triton"),
    "entropy_attention": ("eager", "triton"),
    "attention_pool": ("eager", "unfused", "triton"),
    "attentive_entropy": ("eager", "triton"),
}
MAP_SIDE = 7  # ResNet-50's 7x7 map at 224 pixels: K = 49 regions
CHANNELS = 2048  # ResNet-50's feature channels
NUM_CLASSES = 65  # Office-Home, the largest label set in configs/
SWEEP = {"batch_sizes": (64, 256), "hidden": (256, 1024)}
QUICK_SWEEP = {"batch_sizes": (16, 64), "hidden": (256, 1024)}
CSV_COLUMNS = ("kernel", "provider", "mode", "metric", "unit", "x_name", "x_value",
               "median", "p20", "p80", "dtype", "device", "timestamp")


# -- the problems: one op call, its inputs and the bytes it must move -------------------------


@dataclass
class Problem:
    """One op on fixed inputs. `forward` returns the tensor that backward starts from."""

    forward: Callable[[], Tensor]
    leaves: list[Tensor]  # tensors that receive gradients, cleared before every timed call
    grad: Tensor  # the incoming gradient of forward's output
    bytes_moved: dict[str, int]  # per mode, the minimum a fused implementation reads and writes

    def clear_grads(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None


# What grouped_mlp sees (set from --layout and --dropout): the feature map's memory format, and the
# dropout after each hidden layer (0: the inference-like case; 0.5: the paper's training setting).
GROUPED_MLP_INPUT = {"layout": "channels_last", "dropout": 0.0}


def bmm_grouped_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, w3: Tensor, b3: Tensor) -> Tensor:
    """The strongest eager form: three batched matmuls over regions in the input dtype.

    tada_kernels' eager backend computes the same in fp32 whatever the input dtype, so in bf16 this
    is the faster of the two."""
    p = GROUPED_MLP_INPUT["dropout"]
    regions = x.transpose(0, 1)  # [K, B, C]
    hidden = torch.nn.functional.dropout(torch.baddbmm(b1.unsqueeze(1), regions, w1).relu(), p)
    hidden = torch.nn.functional.dropout(torch.baddbmm(b2.unsqueeze(1), hidden, w2).relu(), p)
    logits = torch.baddbmm(b3.view(-1, 1, 1), hidden, w3.unsqueeze(2))
    return logits.squeeze(2).t().float()


def region_mlps(K: int, C: int, H: int, *, dtype: torch.dtype, device: torch.device) -> nn.ModuleList:
    """The model as first written: one nn.Sequential per region."""
    factory = {"device": device, "dtype": dtype}
    p = GROUPED_MLP_INPUT["dropout"]
    return nn.ModuleList(
        nn.Sequential(nn.Linear(C, H, **factory), nn.ReLU(), nn.Dropout(p), nn.Linear(H, H, **factory), nn.ReLU(),
                      nn.Dropout(p), nn.Linear(H, 1, **factory))
        for _ in range(K)
    )


def feature_map(B: int, C: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A [B, C, 7, 7] map that requires grad, like the backbone's output in training; channels-last (the
    trainer's layout on GPUs) unless --layout nchw."""
    f = torch.randn(B, C, MAP_SIDE, MAP_SIDE, device=device, dtype=dtype)
    if GROUPED_MLP_INPUT["layout"] == "channels_last":
        f = f.to(memory_format=torch.channels_last)
    return f.requires_grad_()


def grouped_mlp_problem(provider: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Problem:
    B, K, C, H = shape["B"], shape["K"], shape["C"], shape["H"]
    f = feature_map(B, C, dtype, device)

    def regions() -> Tensor:
        return f.flatten(2).transpose(1, 2)  # [B, K, C], a view; contiguous for a channels-last map

    if provider == "loop":
        mlps = region_mlps(K, C, H, dtype=dtype, device=device)
        leaves = [f, *mlps.parameters()]

        def forward() -> Tensor:
            x = regions()
            return torch.cat([mlp(x[:, k]) for k, mlp in enumerate(mlps)], dim=1).float()
    else:
        def weight(*size: int, fan_in: int) -> Tensor:
            return (torch.randn(*size, device=device, dtype=dtype) / math.sqrt(fan_in)).requires_grad_()

        weights = [weight(K, C, H, fan_in=C), weight(K, H, fan_in=C), weight(K, H, H, fan_in=H),
                   weight(K, H, fan_in=H), weight(K, H, fan_in=H), weight(K, fan_in=H)]
        leaves = [f, *weights]
        if provider == "bmm":
            op = bmm_grouped_mlp
        elif provider == "compile":
            torch._dynamo.reset()  # one compiled graph per shape; never hit the recompile limit
            op = torch.compile(bmm_grouped_mlp, dynamic=False)
        else:
            def op(*tensors: Tensor) -> Tensor:
                p = GROUPED_MLP_INPUT["dropout"]
                return tada_kernels.grouped_mlp(*tensors, dropout=p, training=p > 0, backend=provider)

        def forward() -> Tensor:
            return op(regions(), *weights)

    size = dtype.itemsize
    x_bytes = B * K * C * size
    weight_bytes = K * (C * H + H + H * H + H + H + 1) * size
    logit_bytes = B * K * 4
    forward_bytes = x_bytes + weight_bytes + logit_bytes
    backward_bytes = logit_bytes + 2 * (x_bytes + weight_bytes)  # read x and weights, write their grads
    grad = torch.randn(B, K, device=device)
    return Problem(forward, leaves, grad, _by_mode(forward_bytes, backward_bytes))


def entropy_attention_problem(provider: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Problem:
    B, C = shape["B"], shape["C"]
    f = feature_map(B, C, dtype, device)
    logits = torch.randn(B, MAP_SIDE * MAP_SIDE, device=device) * 3

    def forward() -> Tensor:
        return tada_kernels.entropy_attention(f, logits, backend=provider)[0]

    map_bytes, logit_bytes = f.numel() * dtype.itemsize, logits.numel() * 4
    forward_bytes = 2 * map_bytes + 2 * logit_bytes  # read f and logits, write h and w
    backward_bytes = 2 * map_bytes + logit_bytes  # read dh and the logits, write df (w is detached)
    grad = torch.randn_like(f)
    return Problem(forward, [f], grad, _by_mode(forward_bytes, backward_bytes))


def attention_pool_problem(provider: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Problem:
    B, C = shape["B"], shape["C"]
    f = feature_map(B, C, dtype, device)
    logits = torch.randn(B, MAP_SIDE * MAP_SIDE, device=device) * 3

    def forward() -> Tensor:
        if provider == "unfused":
            return tada_kernels.entropy_attention(f, logits)[0].mean(dim=(2, 3))
        return tada_kernels.attention_pool(f, logits, backend=provider)[0]

    map_bytes, logit_bytes, pooled_bytes = f.numel() * dtype.itemsize, logits.numel() * 4, B * C * dtype.itemsize
    forward_bytes = map_bytes + 2 * logit_bytes + pooled_bytes  # read f and logits, write pooled and w
    backward_bytes = pooled_bytes + logit_bytes + map_bytes  # read d_pooled and the logits, write df
    grad = torch.randn(B, C, device=device, dtype=dtype)
    return Problem(forward, [f], grad, _by_mode(forward_bytes, backward_bytes))


def attentive_entropy_problem(provider: str, shape: dict, dtype: torch.dtype, device: torch.device) -> Problem:
    n, classes = shape["n"], shape["classes"]
    class_logits = (torch.randn(n, classes, device=device, dtype=dtype) * 3).requires_grad_()
    domain_logits = (torch.randn(n, device=device, dtype=dtype) * 3).requires_grad_()

    def forward() -> Tensor:
        return tada_kernels.attentive_entropy(class_logits, domain_logits, backend=provider)

    input_bytes = (class_logits.numel() + domain_logits.numel()) * dtype.itemsize
    forward_bytes = input_bytes + 4
    backward_bytes = input_bytes + 4 + class_logits.numel() * dtype.itemsize
    grad = torch.ones((), device=device)
    return Problem(forward, [class_logits, domain_logits], grad, _by_mode(forward_bytes, backward_bytes))


def _by_mode(forward_bytes: int, backward_bytes: int) -> dict[str, int]:
    return {"forward": forward_bytes, "backward": backward_bytes, "full": forward_bytes + backward_bytes}


PROBLEMS = {
    "grouped_mlp": grouped_mlp_problem,
    "entropy_attention": entropy_attention_problem,
    "attention_pool": attention_pool_problem,
    "attentive_entropy": attentive_entropy_problem,
}


def shapes(kernel: str, batch_sizes: list[int], hidden: list[int]) -> list[dict]:
    if kernel == "grouped_mlp":
        return [{"B": B, "K": MAP_SIDE**2, "C": CHANNELS, "H": H} for B in batch_sizes for H in hidden]
    if kernel in ("entropy_attention", "attention_pool"):
        return [{"B": B, "C": CHANNELS, "H": MAP_SIDE, "W": MAP_SIDE} for B in batch_sizes]
    return [{"n": B, "classes": NUM_CLASSES} for B in batch_sizes]


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    kernel: str
    provider: str
    mode: str
    dtype: str
    shape: dict
    bytes_moved: int = 0
    times_ms: list[float] = field(default_factory=list)
    memory_mb: float | None = None
    error: str | None = None

    @property
    def x_name(self) -> str:
        return "x".join(self.shape)

    @property
    def x_value(self) -> str:
        return "x".join(str(v) for v in self.shape.values())

    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def median_gbps(self) -> float:
        return self.gbps_quantiles()[0]

    def gbps_quantiles(self) -> list[float]:
        return [rate / 1e9 for rate in rate_quantiles(self.bytes_moved, self.times_ms)]


def measure(problem: Problem, mode: str, device: torch.device, rep_ms: float) -> tuple[list[float], float | None]:
    if mode == "forward":
        call = problem.forward
    elif mode == "full":
        def call() -> None:
            problem.forward().backward(problem.grad)
    else:
        output = problem.forward()

        def call() -> None:
            output.backward(problem.grad, retain_graph=True)
    times = time_calls(call, device, rep_ms=rep_ms, setup=problem.clear_grads)
    return times, peak_memory_mb(call, device, problem.clear_grads)


def unavailable_reason(kernel: str, provider: str, device: torch.device) -> str | None:
    """Why the triton provider cannot be measured here (one forward on a tiny input fails), or None."""
    if provider != "triton":
        return None
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "needs a CUDA device (or TRITON_INTERPRET=1, whose timings are no performance figures)"
    try:
        PROBLEMS[kernel](provider, shapes(kernel, [2], [16])[0], torch.float32, device).forward()
    except Exception as error:  # e.g. the fused kernels are not in this build
        return one_line_error(error)
    return None


def run_sweep(args: argparse.Namespace, device: torch.device, writer: CsvWriter) -> tuple[list[Measurement], dict]:
    pairs = [(kernel, provider) for kernel in args.kernels for provider in PROVIDERS[kernel]
             if provider in args.providers]
    # The targets need each kernel's baseline and triton: measure those first, so that a --time-limit
    # that cuts the sweep short drops the other providers.
    pairs.sort(key=lambda pair: pair[1] not in (PROVIDERS[pair[0]][0], "triton"))
    deadline = time.perf_counter() + (args.time_limit or math.inf)
    measurements, skipped = [], {}
    for kernel, provider in pairs:
        reason = unavailable_reason(kernel, provider, device)
        if reason:
            skipped[(kernel, provider)] = reason
            print(f"skip {kernel}/{provider}: {reason}", flush=True)
            continue
        for dtype_name, shape in itertools.product(args.dtypes, shapes(kernel, args.batch_sizes, args.hidden)):
            if time.perf_counter() > deadline:
                skipped[(kernel, provider)] = f"not finished within --time-limit {args.time_limit:g} s"
                break
            measurements += measure_provider(kernel, provider, dtype_name, shape, args, device, writer)
    return measurements, skipped


def measure_provider(kernel: str, provider: str, dtype_name: str, shape: dict, args: argparse.Namespace,
                     device: torch.device, writer: CsvWriter) -> list[Measurement]:
    """Every mode of one provider on one shape; a failure is recorded, not raised, so the sweep goes on."""
    results = []
    try:
        problem = PROBLEMS[kernel](provider, shape, DTYPES[dtype_name], device)
    except Exception as error:  # e.g. out of memory while building the inputs
        problem, build_error = None, one_line_error(error)
    for mode in args.modes:
        result = Measurement(kernel, provider, mode, dtype_name, shape)
        if problem is None:
            result.error = build_error
        else:
            result.bytes_moved = problem.bytes_moved[mode]
            try:
                result.times_ms, result.memory_mb = measure(problem, mode, device, args.rep_ms)
            except Exception as error:
                traceback.print_exc()
                result.error = one_line_error(error)
        status = result.error or f"{result.median_ms():.3f} ms"
        print(f"{kernel:17} {provider:8} {mode:8} {dtype_name:4} {result.x_value:18} {status}", flush=True)
        writer.write(result)
        results.append(result)
    del problem
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results


# -- output ------------------------------------------------------------------------------------


class CsvWriter:
    """Appends rows as measurements finish, so a run cut short still leaves what it measured."""

    def __init__(self, path: Path, device_name: str):
        self.device_name = device_name
        self.file = path.open("w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(CSV_COLUMNS)

    def row(self, kernel, provider, mode, metric, unit, x_name, x_value, values, dtype) -> None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.csv.writerow([kernel, provider, mode, metric, unit, x_name, x_value,
                           *(f"{v:.6g}" for v in values), dtype, self.device_name, stamp])
        self.file.flush()

    def write(self, m: Measurement) -> None:
        """Time, peak memory and bandwidth of one measurement."""
        if m.error:
            return
        key = (m.kernel, m.provider, m.mode)
        self.row(*key, "time", "ms", m.x_name, m.x_value, quantiles(m.times_ms), m.dtype)
        if m.memory_mb is not None:
            self.row(*key, "memory", "MB", m.x_name, m.x_value, (m.memory_mb,) * 3, m.dtype)
        self.row(*key, "bandwidth", "GB/s", m.x_name, m.x_value, m.gbps_quantiles(), m.dtype)

    def write_copy_fractions(self, measurements: list[Measurement], copy_gbps: float) -> None:
        """Each measurement's bandwidth as a percentage of the copy bandwidth, known once the sweep is over."""
        for m in measurements:
            if not m.error:
                self.row(m.kernel, m.provider, m.mode, "copy_fraction", "%", m.x_name, m.x_value,
                         [100 * gbps / copy_gbps for gbps in m.gbps_quantiles()], m.dtype)

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class Target:
    """A goal for the triton provider on an H200, checked on the bf16 "full" rows it names."""

    kernel: str
    shape: dict  # the rows whose shape contains these entries
    metric: str  # "speedup" over the kernel's baseline provider, or "copy_fraction" in %
    at_least: float

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.shape.items()) or "every shape"
        goal = f">= {self.at_least:g}x {PROVIDERS[self.kernel][0]}" if self.metric == "speedup" else \
            f">= {self.at_least:g}% of copy bandwidth"
        return f"{self.kernel} forward+backward, {where}: {goal}"


TARGETS = (
    Target("grouped_mlp", {"B": 64, "H": 1024}, "speedup", 1.3),
    Target("grouped_mlp", {"B": 64, "H": 256}, "speedup", 2.5),
    Target("grouped_mlp", {"B": 64, "H": 1024}, "copy_fraction", 75),
    Target("grouped_mlp", {"B": 64, "H": 256}, "copy_fraction", 75),
    Target("entropy_attention", {}, "speedup", 3),
    Target("entropy_attention", {}, "copy_fraction", 70),
)


def target_lines(measurements: list[Measurement], copy_gbps: float, device: torch.device) -> list[str]:
    """One line per target and matching row; a verdict only for GPU figures (the interpreter's are no speed)."""
    lines = ["| target (bf16, triton) | shape | measured | result |", "|---|---|---|---|"]
    timed = {(m.kernel, m.provider, m.mode, m.dtype, m.x_value): m for m in measurements if not m.error}
    for target in TARGETS:
        rows = [m for m in timed.values()
                if (m.kernel, m.provider, m.mode, m.dtype) == (target.kernel, "triton", "full", "bf16")
                and target.shape.items() <= m.shape.items()]
        if not rows:
            lines.append(f"| {target.describe()} | | not measured | - |")
        for m in rows:
            if target.metric == "speedup":
                baseline = timed.get((m.kernel, PROVIDERS[m.kernel][0], m.mode, m.dtype, m.x_value))
                if baseline is None:
                    lines.append(f"| {target.describe()} | {m.x_value} | baseline not measured | - |")
                    continue
                value, shown = baseline.median_ms() / m.median_ms(), "{:.2f}x"
            else:
                value, shown = 100 * m.median_gbps() / copy_gbps, "{:.0f}%"
            verdict = "no verdict (not a GPU)" if device.type != "cuda" else \
                "pass" if value >= target.at_least else "FAIL"
            lines.append(f"| {target.describe()} | {m.x_value} | {shown.format(value)} | {verdict} |")
    return lines


def table_lines(kernel: str, measurements: list[Measurement], copy_gbps: float) -> list[str]:
    baseline_name = PROVIDERS[kernel][0]
    lines = [f"| dtype | {measurements[0].x_name} | mode | provider | median ms | p20-p80 ms | vs {baseline_name} "
             f"| GB/s | % of copy | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    baselines = {(m.dtype, m.x_value, m.mode): m for m in measurements if m.provider == baseline_name and not m.error}
    order = {name: i for i, name in enumerate(PROVIDERS[kernel])}
    for m in sorted(measurements, key=lambda m: (m.dtype, list(m.shape.values()), MODES.index(m.mode),
                                                 order[m.provider])):
        head = f"| {m.dtype} | {m.x_value} | {m.mode} | {m.provider} "
        if m.error:
            lines.append(head + f"| {m.error} | | | | | |")
            continue
        median, p20, p80 = quantiles(m.times_ms)
        baseline = baselines.get((m.dtype, m.x_value, m.mode))
        speedup = f"{baseline.median_ms() / median:.2f}x" if baseline else "-"
        gbps = m.median_gbps()
        memory = "n/a" if m.memory_mb is None else f"{m.memory_mb:.0f}"
        lines.append(head + f"| {median:.3f} | {p20:.3f}-{p80:.3f} | {speedup} | {gbps:.1f} "
                            f"| {100 * gbps / copy_gbps:.0f}% | {memory} |")
    return lines


def write_report(path: Path, args: argparse.Namespace, device: torch.device, measurements: list[Measurement],
                 skipped: dict, copy_medians: list[float], elapsed_s: float) -> None:
    on_gpu = device.type == "cuda"
    copy_gbps = max(copy_medians)
    title = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    lines = [f"# Kernel benchmarks ({title})", ""]
    if not on_gpu:
        lines += ["These are CPU figures: they compare the eager forms with each other only. The triton provider",
                  "was not measured (it needs a CUDA device), and peak memory is n/a (no allocator statistics on",
                  "a CPU). The targets below are for an H200.", ""]
    lines += [f"Machine: {machine_description()}; torch threads: {torch.get_num_threads()}.", "",
              "Command:", "", f"    {shlex.join(['python', *sys.argv])}", "",
              f"Sweep: dtypes {', '.join(args.dtypes)}; batch sizes {args.batch_sizes}; grouped_mlp hidden "
              f"{args.hidden}, K = {MAP_SIDE ** 2}, C = {CHANNELS}, dropout {args.dropout:g}; entropy_attention "
              f"and attention_pool f [B, {CHANNELS}, {MAP_SIDE}, {MAP_SIDE}]; feature maps {args.layout}; attentive_entropy "
              f"{NUM_CLASSES} classes, n = B. "
              f"Modes: {', '.join(args.modes)}. About {args.rep_ms:g} ms of timed calls per row "
              f"(at least 5). Total wall time {elapsed_s / 60:.1f} min.", "",
              f"Copy bandwidth (bytes read + written per second copying a 1 GiB tensor) measured on this device: "
              f"{copy_medians[0]:.1f} GB/s before the sweep, {copy_medians[1]:.1f} GB/s after; the higher, "
              f"{copy_gbps:.1f} GB/s, is the 100% of the \"% of copy\" column. GB/s counts the minimum bytes a fused "
              "kernel moves (module docstring of bench/bench_kernels.py).", ""]
    if not on_gpu:
        lines += ["On a CPU the calls are timed back to back without a cache flush, so inputs that fit the CPU's "
                  "caches are read from them: above 100% of copy means exactly that.", ""]
    for (kernel, provider), reason in skipped.items():
        lines.append(f"- {kernel} / {provider} not (fully) measured: {reason}")
    if skipped:
        lines.append("")
    lines += ["## Targets", "", *target_lines(measurements, copy_gbps, device), ""]
    for kernel in args.kernels:
        rows = [m for m in measurements if m.kernel == kernel]
        if rows:
            lines += [f"## {kernel}", "", *table_lines(kernel, rows, copy_gbps), ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int,
                        help=f"B (default {SWEEP['batch_sizes']}; {QUICK_SWEEP['batch_sizes']} with --quick or a CPU)")
    parser.add_argument("--hidden", nargs="+", type=int,
                        help=f"grouped_mlp H (default {SWEEP['hidden']}; {QUICK_SWEEP['hidden']} with --quick or a CPU)")
    parser.add_argument("--kernels", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--providers", nargs="+", choices=sorted({p for ps in PROVIDERS.values() for p in ps}),
                        help="default: all; on a CPU all but triton")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--quick", action="store_true", help="the CPU sweep (smaller B) on any device")
    parser.add_argument("--rep-ms", type=float, help="timed milliseconds per row (default 100 on a GPU, 300 on a CPU)")
    parser.add_argument("--time-limit", type=float,
                        help="seconds; once past, start no further shape (the report says what was left out)")
    parser.add_argument("--layout", choices=("channels_last", "nchw"), default="channels_last",
                        help="memory format of the feature map (grouped_mlp, entropy_attention, attention_pool)")
    parser.add_argument("--dropout", type=float, default=0.0, help="grouped_mlp dropout in every provider")
    parser.add_argument("--name", help="file stem of the CSV and report (default kernels, or kernels_cpu on a CPU)")
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args()
    GROUPED_MLP_INPUT.update(layout=args.layout, dropout=args.dropout)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    sweep = SWEEP if on_gpu and not args.quick else QUICK_SWEEP
    args.batch_sizes = args.batch_sizes or list(sweep["batch_sizes"])
    args.hidden = args.hidden or list(sweep["hidden"])
    args.providers = args.providers or [p for ps in PROVIDERS.values() for p in ps if on_gpu or p != "triton"]
    args.rep_ms = args.rep_ms or (100.0 if on_gpu else 300.0)
    if not on_gpu:
        print("CPU run: eager providers and the CPU sweep unless --providers, --batch-sizes, --hidden say otherwise",
              flush=True)

    started = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or ("kernels" if on_gpu else "kernels_cpu")
    writer = CsvWriter(out_dir / f"{stem}.csv", torch.cuda.get_device_name(device) if on_gpu else "cpu")

    def measure_copy(when: str) -> float:
        copy_bytes, gbps = copy_bandwidth(device, args.rep_ms)
        writer.row("copy", "torch", when, "bandwidth", "GB/s", "bytes", copy_bytes, gbps, "fp32")
        print(f"copy bandwidth ({when} of the sweep): {gbps[0]:.1f} GB/s", flush=True)
        return gbps[0]

    # Copy bandwidth before and after the sweep: on a shared machine one of the two can be low, and
    # the roofline is what the device can do, so the higher median counts.
    copy_medians = [measure_copy("start")]
    measurements, skipped = run_sweep(args, device, writer)
    copy_medians.append(measure_copy("end"))
    roofline = max(copy_medians)
    writer.write_copy_fractions(measurements, roofline)
    writer.close()
    write_report(out_dir / f"{stem}.md", args, device, measurements, skipped, copy_medians,
                 time.perf_counter() - started)
    print("\n".join(["", "## Targets", *target_lines(measurements, roofline, device)]))
    print(f"\nwrote {out_dir / (stem + '.csv')} and {out_dir / (stem + '.md')}")


if __name__ == "__main__":
    main()
