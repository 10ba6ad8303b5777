"""Where a tada-train step spends its time: torch.profiler over real steps of the real trainer.

    python bench/profile_step.py --config configs/digits/mnist_to_mnistm.yaml data.root=data/digits

Builds the Trainer in this process (one rank) from the config and overrides, trains --warmup steps,
then profiles --steps more. The trainer marks the parts of each step (data, forward (model and loss),
agree (the all-rank NaN/stop check), backward, optimizer); the report gives each part's share of the
step time and the most expensive operators, as a markdown table.
"""

from __future__ import annotations

import argparse
import time

import torch
from report import write_report
from torch.profiler import ProfilerActivity, profile

from tada_dist.config import build_config
from tada_dist.trainer import Trainer

PARTS = ("data", "forward", "agree", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/digits/mnist_to_mnistm.yaml")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--report", default="bench/results/profile_step_cpu.md")
    parser.add_argument("--title", default="Profile of a tada-train step on the CPU")
    parser.add_argument("--trace", help="also write the profiler trace here (Chrome trace JSON, for Perfetto)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    config = build_config(args.config, [*args.overrides, "tracking.enabled=false", "checkpoint.resume=false",
                                        f"train.steps={args.warmup + args.steps}", "output_dir=runs/bench_profile"])
    trainer = Trainer(config)
    for _ in range(args.warmup):
        trainer.train_step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            trainer.train_step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - started) * 1e3 / args.steps
    if args.trace:
        profiler.export_chrome_trace(args.trace)
    events = {event.key: event for event in profiler.key_averages()}

    lines = [f"# {args.title}", "",
             f"`{args.config}` with {' '.join(args.overrides) or 'no overrides'}; one process, "
             f"{torch.get_num_threads()} torch threads; {args.steps} profiled steps after {args.warmup}. "
             f"A step took {wall_ms:.2f} ms under the profiler "
             f"({trainer.images_per_step() * 1e3 / wall_ms:.0f} images/s).", "",
             "| part of the step | ms per step | share |", "|---|---|---|"]
    for part in PARTS:
        if part in events:
            ms = events[part].cpu_time_total / 1e3 / args.steps
            lines.append(f"| {part} | {ms:.2f} | {ms / wall_ms:.0%} |")
    covered = sum(events[p].cpu_time_total for p in PARTS if p in events) / 1e3 / args.steps
    lines += [f"| rest (step bookkeeping, schedules, BatchNorm copies) | {wall_ms - covered:.2f} | "
              f"{(wall_ms - covered) / wall_ms:.0%} |", "",
              "Most expensive operators (self CPU time, all parts):", "", "```",
              profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=50),
              "```", ""]
    write_report(args.report, lines)


if __name__ == "__main__":
    main()
