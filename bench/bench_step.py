"""Images per second of a full training step: source-only against TADA with eager and fused kernels.

    python bench/bench_step.py                       # CUDA: ResNet-50, 224 px, 32 + 32 images, bf16
    OMP_NUM_THREADS=1 python bench/bench_step.py --device cpu --backbone resnet18 --image-size 64 \
        --batch-size 8 --dtype fp32 --warmup 2 --steps 5

A step is what tada_dist.trainer.Trainer.train_step runs, minus DeepSpeed and the data loaders:
forward, tada_dist.losses.tada_objective, backward, an SGD step (tada_dist.optim). The model comes
from tada_dist.model.create_model with random weights (nothing is downloaded), cast to --dtype and
channels-last; the inputs are one fixed synthetic batch already on the device.

Both methods push the same images through the backbone: TADA a source and a target batch of
--batch-size each, source-only one source batch of twice that size (in training it sees the source
half only). So images/s measures equal backbone work, and TADA / source-only is the cost of the
attention modules, discriminators and their losses as one ratio.

Variants: source_only; tada_eager (tada_kernels backend "eager"); tada_fused (backend "triton",
CUDA only). Writes <out-dir>/step.md and step.csv (step_cpu.* on a CPU).
"""

from __future__ import annotations

import argparse
import csv
import gc
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from timing import DTYPES, one_line_error, quantiles, synchronize
from report import machine_description
from tada_dist.losses import LossWeights, tada_objective
from tada_dist.model import create_model
from tada_dist.optim import create_optimizer

VARIANTS = {  # name: (method, tada_kernels backend)
    "source_only": ("source_only", "auto"),
    "tada_eager": ("tada", "eager"),
    "tada_fused": ("tada", "triton"),
}
TARGET_RATIO = 0.85  # on an H200: TADA (fused) at least 85% of source-only images/s
CSV_COLUMNS = ("variant", "method", "kernels_backend", "backbone", "image_size", "batch_per_domain",
               "images_per_step", "dtype", "warmup_steps", "timed_steps", "step_ms_median", "step_ms_p20",
               "step_ms_p80", "images_per_s", "ratio_to_source_only", "peak_memory_gb", "device", "timestamp")


@dataclass
class Result:
    variant: str
    images_per_step: int
    step_ms: list[float] | None = None
    images_per_s: float | None = None
    peak_memory_gb: float | None = None
    error: str | None = None


class StepBench:
    """One variant's model, optimizer and synthetic batch, and its training step."""

    def __init__(self, variant: str, args: argparse.Namespace, device: torch.device):
        self.method, self.backend = VARIANTS[variant]
        torch.manual_seed(0)
        model = create_model(method=self.method, backbone=args.backbone, num_classes=args.num_classes,
                             image_size=args.image_size, kernels_backend=self.backend)
        self.model = model.to(device=device, dtype=DTYPES[args.dtype], memory_format=torch.channels_last)
        self.model.set_grl_coeff(1.0)  # the end of training; the coefficient does not change the cost
        self.optimizer = create_optimizer(self.model, base_lr=0.01)
        self.weights = LossWeights()

        def images(count: int) -> torch.Tensor:
            batch = torch.randn(count, 3, args.image_size, args.image_size, device=device, dtype=DTYPES[args.dtype])
            return batch.contiguous(memory_format=torch.channels_last)

        if self.method == "source_only":
            self.inputs = (images(2 * args.batch_size),)
        else:
            self.inputs = (images(args.batch_size), images(args.batch_size))
        self.labels = torch.randint(args.num_classes, (self.inputs[0].shape[0],), device=device)

    def step(self) -> None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.model(*self.inputs)
        loss, _ = tada_objective(outputs, self.labels, self.weights, method=self.method, backend=self.backend)
        loss.backward()
        self.optimizer.step()


def time_steps(bench: StepBench, args: argparse.Namespace, device: torch.device) -> list[float]:
    """Milliseconds of each timed step, after the warm-up steps."""
    bench.step()  # fails fast where a backend cannot run; also the first warm-up step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # after cuDNN's first-step search
    for _ in range(args.warmup - 1):
        bench.step()
    synchronize(device)
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        bench.step()
        synchronize(device)  # per step, for the quantiles; it costs far less than a step
        times.append((time.perf_counter() - started) * 1e3)
    return times


def run_variant(variant: str, args: argparse.Namespace, device: torch.device) -> Result:
    result = Result(variant, 2 * args.batch_size)
    try:
        result.step_ms = time_steps(StepBench(variant, args, device), args, device)
    except Exception as error:  # e.g. the fused kernels need CUDA: record it, measure the rest
        result.error = one_line_error(error)
        return result
    finally:  # free this variant's model and optimizer state before the next one is built
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result.images_per_s = result.images_per_step * len(result.step_ms) / (sum(result.step_ms) / 1e3)
    if device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def ratio(result: Result, baseline: Result | None) -> float | None:
    if result.error or baseline is None or baseline.error:
        return None
    return result.images_per_s / baseline.images_per_s


def target_line(results: dict[str, Result], args: argparse.Namespace, device: torch.device) -> str:
    goal = f"TADA (fused) at least {TARGET_RATIO:.0%} of source-only images/s (ResNet-50, 224 px, bf16, H200)"
    fused = ratio(results["tada_fused"], results.get("source_only")) if "tada_fused" in results else None
    if fused is None:
        why = "the fused kernels need a CUDA device" if device.type != "cuda" else "a variant did not run"
        return f"Target: {goal}: not measured ({why})."
    if device.type != "cuda" or (args.backbone, args.image_size, args.dtype) != ("resnet50", 224, "bf16"):
        return f"Target: {goal}: {fused:.1%} with the settings above, which are not the target's: no verdict."
    return f"Target: {goal}: measured {fused:.1%}, {'pass' if fused >= TARGET_RATIO else 'FAIL'}."


def write_outputs(stem: Path, args: argparse.Namespace, device: torch.device, results: dict[str, Result]) -> list[str]:
    """Write stem.csv and stem.md; return the table lines."""
    baseline = results.get("source_only")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    table = ["| variant | kernels | images/step | step ms median (p20-p80) | images/s | vs source-only | peak GB |",
             "|---|---|---|---|---|---|---|"]
    with stem.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for name, result in results.items():
            method, backend = VARIANTS[name]
            if result.error:
                table.append(f"| {name} | {backend} | {result.images_per_step} | {result.error} | | | |")
                continue
            median, p20, p80 = quantiles(result.step_ms)
            relative = ratio(result, baseline)
            memory = "n/a" if result.peak_memory_gb is None else f"{result.peak_memory_gb:.1f}"
            table.append(f"| {name} | {backend} | {result.images_per_step} | {median:.1f} ({p20:.1f}-{p80:.1f}) "
                         f"| {result.images_per_s:.1f} | {'-' if relative is None else f'{relative:.1%}'} | {memory} |")
            writer.writerow([name, method, backend, args.backbone, args.image_size, args.batch_size,
                             result.images_per_step, args.dtype, args.warmup, args.steps,
                             f"{median:.4g}", f"{p20:.4g}", f"{p80:.4g}", f"{result.images_per_s:.4g}",
                             "" if relative is None else f"{relative:.4f}",
                             "" if result.peak_memory_gb is None else f"{result.peak_memory_gb:.3f}",
                             device_name, stamp])

    on_gpu = device.type == "cuda"
    lines = [f"# Training step throughput ({torch.cuda.get_device_name(device) if on_gpu else 'CPU'})", ""]
    if not on_gpu:
        lines += ["These are CPU figures: the fused (triton) variant was not measured, it needs a CUDA device.", ""]
    lines += [
        f"Machine: {machine_description()}; torch threads: {torch.get_num_threads()}.", "",
        "Command:", "", f"    {shlex.join(['python', *sys.argv])}", "",
        f"Setup: backbone {args.backbone}, {args.image_size} px, {args.num_classes} classes, {args.dtype}, "
        f"channels-last; TADA forwards {args.batch_size} source + {args.batch_size} target images per step, "
        f"source-only {2 * args.batch_size} source images (equal backbone work). Warm-up steps: {args.warmup}; "
        f"timed steps: {args.steps}; images/s = images per step x timed steps / their wall time. A step is "
        "forward, tada_objective, backward and an SGD step, on one fixed synthetic batch.", "",
        *table, "",
        target_line(results, args, device), "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50", help="resnet18/34/50/101 or small_cnn")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32, help="images per domain (the paper's setting: 32 + 32)")
    parser.add_argument("--num-classes", type=int, default=31)
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (at least 1)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (at least 2)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all; on a CPU all but tada_fused")
    parser.add_argument("--out-dir", default="bench/results")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 2:
        parser.error(f"need --warmup >= 1 and --steps >= 2, got {args.warmup} and {args.steps}")

    device = torch.device(args.device)
    args.variants = args.variants or [v for v in VARIANTS if device.type == "cuda" or v != "tada_fused"]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    results = {}
    for variant in args.variants:
        results[variant] = run_variant(variant, args, device)
        result = results[variant]
        print(f"{variant:12} " + (result.error or f"{result.images_per_s:.1f} images/s"), flush=True)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / ("step" if device.type == "cuda" else "step_cpu")
    table = write_outputs(stem, args, device, results)
    print("\n".join(["", *table, "", target_line(results, args, device)]))
    print(f"\nwrote {stem}.md and {stem}.csv")


if __name__ == "__main__":
    main()
