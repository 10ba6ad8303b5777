"""Training jobs for the benchmarks that drive whole runs: launch/local.sh in the background, what its
checkpoints and MLflow run say, and the machine a report was measured on."""

from __future__ import annotations

import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tada_dist import checkpoint

REPO = Path(__file__).resolve().parents[1]


def machine_description() -> str:
    import torch

    accelerator = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {accelerator}; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def write_report(path: str | Path, lines: list[str]) -> None:
    """Write a markdown report ending with the machine and the command that produced it; echo it."""
    lines = [*lines, f"Machine: {machine_description()}.", "", "Command:", "",
             "    python " + shlex.join(sys.argv), ""]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines))
    print("\n".join(lines))


@dataclass
class Job:
    """One `launch/local.sh CONFIG overrides...` run writing into `run_dir` and MLflow at `db`."""

    run_dir: Path
    db: Path
    config: str
    overrides: list[str]
    processes: int = 2

    def command(self) -> list[str]:
        return [str(REPO / "launch" / "local.sh"), self.config, f"output_dir={self.run_dir}",
                f"tracking.uri=sqlite:///{self.db}", *self.overrides]

    def environment(self, extra: dict[str, str]) -> dict[str, str]:
        # One thread per process: the processes share the machine's cores.
        return {**os.environ, "NPROC_PER_NODE": str(self.processes), "OMP_NUM_THREADS": "1",
                "PYTHON": sys.executable, **extra}

    def start(self, log: Path, **extra_env: str) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as handle:
            return subprocess.Popen(self.command(), env=self.environment(extra_env), stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def run(self, log: Path, **extra_env: str) -> int:
        return self.start(log, **extra_env).wait()

    def latest_checkpoint_step(self) -> int:
        return checkpoint.latest_step(self.run_dir)

    def states_file(self, step: int) -> Path:
        return checkpoint.checkpoint_dir(self.run_dir) / checkpoint.step_tag(step) / checkpoint.MODEL_STATES_FILE

    def wait_for_checkpoint(self, step: int, process: subprocess.Popen, timeout: float = 1800) -> None:
        deadline = time.monotonic() + timeout
        while self.latest_checkpoint_step() < step:
            if process.poll() is not None:
                raise RuntimeError(f"{self.run_dir}: exit {process.returncode} before the checkpoint of step {step}")
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                raise RuntimeError(f"{self.run_dir}: no checkpoint of step {step} after {timeout:.0f} s")
            time.sleep(0.1)

    def _mlflow_run(self):
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{self.db}")
        experiment = client.get_experiment_by_name("tada-dist")
        runs = [r for r in client.search_runs([experiment.experiment_id])
                if r.data.params.get("output_dir") == str(self.run_dir)]
        if len(runs) != 1:
            raise RuntimeError(f"{len(runs)} MLflow runs write to {self.run_dir}, expected one")
        return client, runs[0]

    def history(self, key: str) -> list[tuple[int, float]]:
        """Every (step, value) of metric `key` in the run's MLflow record, in step order."""
        client, run = self._mlflow_run()
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    def status(self) -> str:
        return self._mlflow_run()[1].info.status
