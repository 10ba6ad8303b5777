"""Inject faults into real two-process runs and compare each outcome with an uninterrupted run.

    python bench/faults.py --steps 300 --every 50

Every run is `launch/local.sh configs/default.yaml` (DALI, DeepSpeed on gloo, MLflow on sqlite) with
the same seed. For each fault the report says how it was injected, what the run did, how many steps
of work were lost (steps trained before the fault minus the step training resumed from), and whether
the finished run's losses, accuracies and final weights equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from report import write_report

from tada_dist.jobs import Job


@dataclass
class Outcome:
    fault: str
    injected: str
    behaviour: str
    steps_lost: int | str
    matches: str


def worker(process, rank: int) -> psutil.Process:
    for child in psutil.Process(process.pid).children(recursive=True):
        if child.environ().get("RANK") == str(rank) and "tada_dist.train" in " ".join(child.cmdline()):
            return child
    raise RuntimeError(f"no worker with RANK={rank}")


def last_logged_step(job: Job) -> int:
    history = job.history("loss")
    return history[-1][0] if history else 0


def final_weights(job: Job, step: int) -> dict[str, torch.Tensor]:
    return torch.load(job.states_file(step), map_location="cpu", weights_only=False)["module"]


def compare(job: Job, reference: Job, steps: int) -> str:
    same_history = all(job.history(key) == reference.history(key) for key in ("loss", "cls", "target_acc"))
    mine, theirs = final_weights(job, steps), final_weights(reference, steps)
    same_weights = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    if same_history and same_weights:
        return f"yes: all {steps} losses, every accuracy and the final weights are identical"
    final = job.history("target_acc")[-1][1]
    return (f"no: histories {'equal' if same_history else 'differ'}, weights {'equal' if same_weights else 'differ'};"
            f" final accuracy {final:.2f}%")


def resumed_from(log: Path) -> list[int]:
    return [int(step) for step in re.findall(r"resuming from step (\d+) ", log.read_text(errors="replace"))]


def interrupt(job: Job, log: Path, after_checkpoint: int, delay: float, act: Callable) -> tuple[int, int]:
    """Start the job, act on it `delay` seconds after checkpoint `after_checkpoint`, wait for the end;
    returns (exit code, last step logged when it was hit)."""
    process = job.start(log)
    job.wait_for_checkpoint(after_checkpoint, process)
    time.sleep(delay)
    act(process)
    reached = last_logged_step(job)
    return process.wait(), reached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50, help="checkpoint.every")
    parser.add_argument("--output", default="runs/bench_faults")
    parser.add_argument("--report", default="bench/results/faults.md")
    args = parser.parse_args()

    output = Path(args.output).resolve()
    if output.exists():
        sys.exit(f"faults.py: {output} exists; remove it first (every scenario must start from nothing)")
    db = output / "mlflow.db"
    overrides = [f"train.steps={args.steps}", "train.log_every=1", f"train.eval_every={args.every * 2}",
                 f"checkpoint.every={args.every}"]

    def job(name: str, *extra: str) -> Job:
        return Job(output / name, db, args.config, [*overrides, *extra])

    def log(name: str) -> Path:
        return output / "logs" / f"{name}.log"

    at = 2 * args.every  # faults strike a little after this checkpoint
    outcomes: list[Outcome] = []
    reference = job("reference")
    started = time.perf_counter()
    if reference.run(log("reference")) != 0:
        sys.exit("faults.py: the reference run failed; see " + str(log("reference")))
    one_run = time.perf_counter() - started

    repeat = job("repeat")
    repeat.run(log("repeat"))
    outcomes.append(Outcome("none (a second run)", "the same command again", f"finished: {repeat.status()}",
                            0, compare(repeat, reference, args.steps)))

    for rank in (1, 0):
        name = f"kill_rank{rank}"
        killed = job(name)
        code, reached = interrupt(killed, log(name), at, 1.5, lambda p, r=rank: worker(p, r).kill())
        resumed = resumed_from(log(name))
        outcomes.append(Outcome(
            f"worker killed (rank {rank})", f"SIGKILL to the rank-{rank} process, at step {reached}",
            f"torchrun restarted the group, which resumed from step {resumed[0]} and finished "
            f"(exit {code}; MLflow run {killed.status()}, one run)" if resumed else f"exit {code}, no resume",
            reached - resumed[0] if resumed else "?", compare(killed, reference, args.steps)))

    preempted = job("sigterm")
    code, reached = interrupt(preempted, log("sigterm"), at, 1.5, lambda p: p.send_signal(signal.SIGTERM))
    stopped = preempted.latest_checkpoint_step()
    status_after_stop = preempted.status()
    second = preempted.run(log("sigterm"))
    outcomes.append(Outcome(
        "pre-emption", f"SIGTERM to torchrun, at step {reached}",
        f"workers finished step {stopped}, saved it and exited (torchrun exit {code}, MLflow {status_after_stop}); "
        f"the same command resumed from step {resumed_from(log('sigterm'))[0]} and finished (exit {second})",
        max(reached - stopped, 0), compare(preempted, reference, args.steps)))

    corrupt = job("corrupt")
    interrupt(corrupt, log("corrupt"), at, 1.5, lambda p: p.send_signal(signal.SIGTERM))
    damaged = corrupt.latest_checkpoint_step()
    states = corrupt.states_file(damaged)
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    code = corrupt.run(log("corrupt"))
    fallback = resumed_from(log("corrupt"))[0]
    warned = "is unusable" in log("corrupt").read_text(errors="replace")
    outcomes.append(Outcome(
        "corrupt latest checkpoint", f"stopped at step {damaged} by SIGTERM, then its model file cut to half",
        f"{'warned, ' if warned else ''}skipped step {damaged}, resumed from step {fallback} and finished (exit {code})",
        damaged - fallback, compare(corrupt, reference, args.steps)))

    diverging = job("diverge", "optim.lr=1e6", "train.max_nonfinite_steps=5")
    code = diverging.run(log("diverge"), MAX_RESTARTS="0")
    text = log("diverge").read_text(errors="replace")
    error = re.search(r"tada-train: error: (.*)", text)
    outcomes.append(Outcome(
        "divergence (NaN/inf loss)", "optim.lr=1e6, train.max_nonfinite_steps=5, MAX_RESTARTS=0",
        f"skipped each non-finite step, then stopped (exit {code}, MLflow "
        f"{diverging.status()}): {error.group(1) if error else 'no error line'}",
        "n/a", "n/a (the run stops by design)"))

    lines = [
        "# Fault injection", "",
        f"Two processes on one node (`launch/local.sh`, torchrun `--max_restarts=3`), `{args.config}` with "
        f"{args.steps} steps, a checkpoint every {args.every} steps, losses logged every step; every run has "
        f"seed 0. An uninterrupted run of the same command took {one_run:.0f} s. These are CPU runs.", "",
        "| fault | how it was injected | what the run did | steps lost | final state equals the uninterrupted run |",
        "|---|---|---|---|---|",
        *[f"| {o.fault} | {o.injected} | {o.behaviour} | {o.steps_lost} | {o.matches} |" for o in outcomes], "",
        "Steps lost: steps trained before the fault that had to be trained again (at most `checkpoint.every`).",
        "A transient NaN (one poisoned step) is skipped without changing the weights, optimizer state or",
        "BatchNorm statistics; `tests/test_faults.py` checks that bit for bit under ZeRO-2, bf16 and",
        "gradient accumulation.", "",
    ]
    write_report(args.report, lines)

if __name__ == "__main__":
    main()
