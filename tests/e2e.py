"""Helpers for the end-to-end tests: real tada-train / torchrun processes on generated data.

Starting jobs, waiting for them and reading their MLflow record is tada_dist.jobs, shared with the
benchmarks; this module adds what only tests need (a tiny model, an isolated dataset cache, asserted
exit codes).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tada_dist.jobs import REPO, finish, job_environment, metric_history, start, wait_for

__all__ = ["REPO", "metric_history", "process_env", "run", "start", "finish_with", "torchrun", "train_overrides",
           "wait_for"]


def process_env(tmp_path: Path, **extra: str) -> dict:
    """A job's environment with the generated dataset cached inside the test's folder."""
    return job_environment(TADA_DIST_CACHE=str(tmp_path / "cache"), **extra)


def run(cmd: list[str], tmp_path: Path, *, expect: int = 0, timeout: int = 600, **extra_env: str
        ) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=tmp_path, env=process_env(tmp_path, **extra_env), capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == expect, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}, expected {expect}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    )
    return result


def finish_with(process: subprocess.Popen, log: Path, *, expect: int, timeout: int = 600) -> str:
    """Wait for a started job and assert its exit code; its log."""
    code, output = finish(process, log, timeout=timeout)
    assert code == expect, f"exit {code}, expected {expect}:\n{output[-8000:]}"
    return output


def train_overrides(data_root: Path, run_dir: Path, db: Path, steps: int, *, every: int = 2,
                    analysis: bool = False) -> list[str]:
    """A tiny model that trains a step in a fraction of a second; log every step. The analysis (attention
    maps, t-SNE, MLflow model) only where a test asks for it: it is tested on its own."""
    quiet = [] if analysis else ["analysis.attention_images=0", "analysis.features=false",
                                 "tracking.log_model=false"]
    return [
        f"data.root={data_root}", f"output_dir={run_dir}", f"tracking.uri=sqlite:///{db}",
        f"train.steps={steps}", "train.log_every=1", f"train.eval_every={every}", f"checkpoint.every={every}",
        "data.batch_size=4", "data.eval_batch_size=16", "model.global_hidden=32", "model.region_hidden=16",
        "model.bottleneck_dim=32", "data.num_threads=1", *quiet,
    ]


def torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "tada_dist.train", *args]
