"""Faults injected into real runs: a killed worker, SIGTERM, NaN losses, several (simulated) nodes.

Every multi-process run here goes through launch/*.sh with DALI, DeepSpeed ZeRO-2 on gloo and MLflow
on sqlite, and is compared step by step with one uninterrupted reference run of the same seed and
world size: recovery must not change a single logged value.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest
import torch
from e2e import REPO, finish_with, metric_history, process_env, run, train_overrides, wait_for

from tada_dist import checkpoint, jobs
from tada_dist.distributed import free_port
from tada_dist.data.synthetic import ensure_synthetic_dataset

STEPS, EVERY = 40, 5
COMPARED_METRICS = ("loss", "cls", "local", "global", "entropy", "skipped_steps", "target_acc")
LOCAL = str(REPO / "launch" / "local.sh")
TORCHRUN = str(REPO / "launch" / "torchrun.sh")
CONFIG = str(REPO / "configs" / "default.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data"), images_per_class=9, seed=2)


def job_overrides(data: Path, run_dir: Path, db: Path) -> list[str]:
    return [*train_overrides(data, run_dir, db, STEPS, every=EVERY), "train.eval_every=10",
            "distributed.zero_stage=2"]


def run_record(db: Path, run_dir: Path) -> dict:
    """The MLflow run a run folder logged to: status, params and the history of each compared metric."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    [experiment] = [e for e in client.search_experiments() if e.name == "tada-dist"]
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.params["output_dir"] == str(run_dir)]
    assert len(runs) == 1, f"{len(runs)} MLflow runs for {run_dir}, expected exactly one"
    [mlflow_run] = runs
    return {
        "status": mlflow_run.info.status,
        "params": mlflow_run.data.params,
        "history": {key: metric_history(db, mlflow_run.info.run_id, key) for key in COMPARED_METRICS},
    }


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> dict:
    """One node, two processes, never interrupted."""
    tmp_path = tmp_path_factory.mktemp("reference")
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    run([LOCAL, CONFIG, *job_overrides(data, run_dir, db)], tmp_path, NPROC_PER_NODE="2")
    record = run_record(db, run_dir)
    assert record["status"] == "FINISHED"
    assert [step for step, _ in record["history"]["loss"]] == list(range(1, STEPS + 1))
    assert [step for step, _ in record["history"]["target_acc"]] == [10, 20, 30, 40]
    assert record["params"]["world_size"] == "2" and record["params"]["global_batch"] == "8"
    return record


def assert_matches_reference(record: dict, reference: dict) -> None:
    for key in COMPARED_METRICS:
        assert record["history"][key] == reference["history"][key], f"{key} differs from the uninterrupted run"


def assert_checkpoints_complete(run_dir: Path, tags: list[int]) -> None:
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    assert checkpoint.read_latest(ckpt_dir) == checkpoint.step_tag(tags[-1])
    assert sorted(checkpoint.complete_tags(ckpt_dir)) == [checkpoint.step_tag(step) for step in tags]
    assert not list(ckpt_dir.glob(checkpoint.PARTIAL_PREFIX + "*"))
    for step in tags:
        assert checkpoint.verify(ckpt_dir / checkpoint.step_tag(step)) is None
        assert sorted(p.name for p in (ckpt_dir / checkpoint.step_tag(step)).glob("rng_rank*.pt")) == [
            "rng_rank0.pt", "rng_rank1.pt"]


def start(cmd: list[str], tmp_path: Path, log: Path, **extra_env: str) -> subprocess.Popen:
    return jobs.start(cmd, log, process_env(tmp_path, **extra_env), cwd=tmp_path)


# -- several nodes ----------------------------------------------------------------------------------


def test_two_nodes_through_the_launch_script_match_one_node(data, reference, tmp_path):
    """Two torchrun agents (static rendezvous on node 0), one process each: the same world size as the
    reference, so the same seed must give the same losses and accuracies to the last bit."""
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    port = str(free_port())
    nodes = [start([TORCHRUN, CONFIG, *job_overrides(data, run_dir, db)], tmp_path, tmp_path / f"node{rank}.log",
                   NNODES="2", NODE_RANK=str(rank), NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
             for rank in range(2)]
    outputs = [finish_with(node, tmp_path / f"node{rank}.log", expect=0) for rank, node in enumerate(nodes)]
    assert "target accuracy" in outputs[0]
    record = run_record(db, run_dir)
    assert record["status"] == "FINISHED" and record["params"]["world_size"] == "2"
    assert_matches_reference(record, reference)
    assert_checkpoints_complete(run_dir, [30, 35, 40])  # checkpoint.keep=3


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture
def network_namespaces():
    """Two network namespaces joined by a veth pair: hosts 10.213.<n>.1 and .2, created and removed here."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` command is not installed")
    suffix = uuid.uuid4().hex[:6]
    names = [f"tada{suffix}a", f"tada{suffix}b"]
    links = [f"td{suffix}a", f"td{suffix}b"]
    subnet = 1 + int(suffix[:2], 16) % 250
    addresses = [f"10.213.{subnet}.1", f"10.213.{subnet}.2"]
    created = []
    try:
        for name in names:
            _ip("netns", "add", name)
            created.append(name)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for name, link, address in zip(names, links, addresses):
            _ip("link", "set", link, "netns", name)
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", name, "link", "set", link, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("netns", "exec", name, "true")  # entering one needs more privileges than creating it
    except subprocess.CalledProcessError as err:
        for name in created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"network namespaces are not available here: {' '.join(err.cmd)}: {err.stderr.strip()}")
    yield list(zip(names, links, addresses))
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)  # removes the veth pair too


def test_two_nodes_with_their_own_addresses(data, reference, tmp_path, network_namespaces):
    """The same job across two network namespaces: each node has its own address and reaches the other
    over a virtual Ethernet link, as two hosts would (c10d rendezvous on node 0's address; both share
    this machine's host name, so node 0 is told that it hosts the endpoint)."""
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    endpoint, job_id = f"{network_namespaces[0][2]}:{free_port()}", f"netns-test-{uuid.uuid4().hex[:8]}"
    nodes = []
    for rank, (namespace, link, address) in enumerate(network_namespaces):
        cmd = ["ip", "netns", "exec", namespace, TORCHRUN, CONFIG, *job_overrides(data, run_dir, db)]
        nodes.append(start(cmd, tmp_path, tmp_path / f"node{rank}.log", NNODES="2", NPROC_PER_NODE="1",
                           RDZV_ENDPOINT=endpoint, RDZV_ID=job_id,
                           GLOO_SOCKET_IFNAME=link, LOCAL_ADDR=address, RDZV_CONF=f"is_host={int(rank == 0)}"))
    for rank, node in enumerate(nodes):
        finish_with(node, tmp_path / f"node{rank}.log", expect=0, timeout=300)
    record = run_record(db, run_dir)
    assert record["status"] == "FINISHED" and record["params"]["world_size"] == "2"
    assert_matches_reference(record, reference)


# -- a killed worker and pre-emption ------------------------------------------------------------------


def worker_with_rank(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The worker process of `rank`: the topmost tada_dist.train process with that RANK. A worker's own
    children have its environment and, until they exec, its command line too (a subprocess it starts)."""
    matches = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "tada_dist.train" in " ".join(child.cmdline()):
                matches[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    workers = [process for process in matches.values() if process.ppid() not in matches]
    if len(workers) != 1:
        raise AssertionError(f"{len(workers)} workers with RANK={rank} under process {launcher.pid}, expected one")
    return workers[0]


def signal_between_steps(launcher: subprocess.Popen, signum: int) -> None:
    """Send `signum` to the launcher while its two workers are held where they are.

    The tiny test run finishes its 40 steps in about a second, less than a loaded machine may take to
    pass a signal down launcher -> torchrun -> workers; held (SIGSTOP) until SIGTERM is pending in
    every worker, they cannot finish the run before it arrives, whatever the load."""
    workers = [worker_with_rank(launcher, rank) for rank in range(2)]
    for worker in workers:
        worker.suspend()
    try:
        launcher.send_signal(signum)
        wait_for(lambda: all(sigterm_pending(worker.pid) for worker in workers), timeout=120,
                 what="SIGTERM to reach every worker")
    finally:
        for worker in workers:
            try:
                worker.resume()
            except psutil.NoSuchProcess:
                pass  # ended while held: the run's output and exit code tell why


def sigterm_pending(pid: int) -> bool:
    """Whether SIGTERM waits for process `pid` (its process-wide or a thread's pending set); a process
    that has ended waits for nothing."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return True
    masks = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (signal.SIGTERM - 1) & 1 for mask in masks)


def test_killed_worker_restarts_the_group_and_resumes_exactly(data, reference, tmp_path):
    run_dir, db, log = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "job.log"
    job = start([LOCAL, CONFIG, *job_overrides(data, run_dir, db)], tmp_path, log, NPROC_PER_NODE="2")
    wait_for(lambda: checkpoint.latest_step(run_dir) >= 10, timeout=300, what="the checkpoint of step 10", process=job)
    worker_with_rank(job, 0).kill()  # SIGKILL rank 0: the one that logs to MLflow
    output = finish_with(job, log, expect=0)

    assert "resuming from step" in output
    resumed_at = int(output.split("resuming from step ")[1].split()[0])
    assert 10 <= resumed_at < STEPS and resumed_at % EVERY == 0
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == STEPS
    record = run_record(db, run_dir)  # exactly one run: the restart continued it
    assert record["status"] == "FINISHED"
    assert_matches_reference(record, reference)  # no step missing, none twice, every value the same
    assert_checkpoints_complete(run_dir, [30, 35, 40])


def test_sigterm_saves_a_checkpoint_and_exits_then_the_same_command_resumes(data, reference, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    command = [LOCAL, CONFIG, *job_overrides(data, run_dir, db)]
    job = start(command, tmp_path, tmp_path / "first.log", NPROC_PER_NODE="2")
    wait_for(lambda: checkpoint.latest_step(run_dir) >= 10, timeout=300, what="the checkpoint of step 10", process=job)
    signal_between_steps(job, signal.SIGTERM)  # to torchrun, as a scheduler would; it passes it on
    output = finish_with(job, tmp_path / "first.log", expect=1)  # torchrun itself reports the signal

    assert "stopped by SIGTERM at step " in output
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 10 <= stopped_at < STEPS
    assert checkpoint.latest_step(run_dir) == stopped_at
    assert checkpoint.verify(checkpoint.checkpoint_dir(run_dir) / checkpoint.step_tag(stopped_at)) is None
    assert not (run_dir / "metrics.json").exists()
    assert run_record(db, run_dir)["status"] == "KILLED"

    second = run(command, tmp_path, NPROC_PER_NODE="2")
    assert f"resuming from step {stopped_at} " in second.stdout + second.stderr
    record = run_record(db, run_dir)
    assert record["status"] == "FINISHED"
    assert_matches_reference(record, reference)


SRUN_STAND_IN = """#!/usr/bin/env bash
# srun for a test: the command after srun's options, once per node of the job; SIGTERM is passed on.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
    while true; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done
    (( code != 0 )) && status=$code
done
exit $status
"""

SCONTROL_STAND_IN = """#!/usr/bin/env bash
# scontrol for a test: every node is this machine; requeue requests are written to a log.
case "$1" in
    show) for ((node = 0; node < SLURM_JOB_NUM_NODES; node++)); do echo 127.0.0.1; done ;;
    requeue) echo "requeue $2" >> "$SCONTROL_LOG" ;;
esac
"""


def test_slurm_script_requeues_before_the_time_limit_and_the_requeued_job_resumes(data, reference, tmp_path):
    """launch/slurm.sbatch with srun and scontrol stood in for: two nodes on this machine. USR1 (SLURM's
    warning before the time limit) must requeue the job and stop it with a checkpoint; running the
    script again, as the requeued job does, must finish the run as if it had never stopped."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN_STAND_IN), ("scontrol", SCONTROL_STAND_IN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir, db, requeues = tmp_path / "run", tmp_path / "mlflow.db", tmp_path / "requeues.log"
    slurm = dict(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242",
                 SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="1",
                 SLURM_SUBMIT_DIR=str(REPO), SCONTROL_LOG=str(requeues), RDZV_ENDPOINT=f"127.0.0.1:{free_port()}")
    command = ["bash", str(REPO / "launch" / "slurm.sbatch"), CONFIG, *job_overrides(data, run_dir, db)]

    job = start(command, tmp_path, tmp_path / "first.log", **slurm)
    wait_for(lambda: checkpoint.latest_step(run_dir) >= 10, timeout=300, what="the checkpoint of step 10", process=job)
    signal_between_steps(job, signal.SIGUSR1)
    output = finish_with(job, tmp_path / "first.log", expect=1)  # the torchrun agents report the SIGTERM
    assert requeues.read_text() == "requeue 4242\n"
    stopped_at = int(output.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert checkpoint.latest_step(run_dir) == stopped_at < STEPS

    slurm["RDZV_ENDPOINT"] = f"127.0.0.1:{free_port()}"
    second = run(command, tmp_path, SLURM_RESTART_COUNT="1", **slurm)
    assert f"resuming from step {stopped_at} " in second.stdout + second.stderr
    record = run_record(db, run_dir)
    assert record["status"] == "FINISHED"
    assert_matches_reference(record, reference)


# -- non-finite losses ----------------------------------------------------------------------------------

NAN_INJECTOR = '''
"""tada-train whose input images are NaN on the steps listed in NAN_STEPS ("3" or "5-" for 5 onwards),
from micro-step NAN_MICROSTEP (default 1) of those steps on; with INF_WEIGHTS_AT, one weight becomes inf
at the end of that step instead."""
import os, sys
import torch
from tada_dist import train
from tada_dist.trainer import StepHooks

spec = os.environ.get("NAN_STEPS", "0")
inf_weights_at = int(os.environ.get("INF_WEIGHTS_AT", "0"))
first_micro_step = int(os.environ.get("NAN_MICROSTEP", "1"))
nan_ranks = {int(r) for r in os.environ.get("NAN_RANKS", os.environ.get("RANK", "0")).split(",")}

class InjectFaults(StepHooks):
    def before_step(self, trainer):
        step = trainer.step + 1
        self.poison = step >= int(spec[:-1]) if spec.endswith("-") else step in {int(s) for s in spec.split(",")}
        self.poison = self.poison and trainer.dist.rank in nan_ranks

    def on_inputs(self, trainer, images, micro_step):
        return images * float("nan") if self.poison and micro_step >= first_micro_step else images

    def after_step(self, trainer):
        if trainer.step == inf_weights_at:
            with torch.no_grad():
                next(trainer.model.parameters()).view(-1)[0] = float("inf")

sys.exit(train.main(sys.argv[1:], hooks=InjectFaults()))
'''


def tensors_of(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for key in sorted(tree, key=str) for t in tensors_of(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [t for item in tree for t in tensors_of(item)]
    return []


def saved_state(run_dir: Path, step: int) -> list[torch.Tensor]:
    """Weights, BatchNorm statistics and optimizer state (ZeRO partitions, momentum) of a checkpoint."""
    tag_dir = checkpoint.checkpoint_dir(run_dir) / checkpoint.step_tag(step)
    states = torch.load(tag_dir / checkpoint.MODEL_STATES_FILE, map_location="cpu", weights_only=False)
    zero_files = list(tag_dir.glob("*optim_states.pt"))  # ZeRO keeps the optimizer in per-rank files
    optimizer = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in zero_files]
    return tensors_of(states["module"]) + tensors_of(optimizer or states["optimizer"])


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_nan_steps_are_skipped_without_changing_any_state(data, tmp_path, zero_stage):
    """bf16 (ZeRO-1: DeepSpeed's BF16 optimizer; ZeRO-2: its ZeRO optimizer) and two accumulation
    micro-steps of which only the second is NaN: the gradients of the first are already accumulated
    and must be dropped, the hardest case for a clean skip."""
    injector = tmp_path / "inject_nan.py"
    injector.write_text(NAN_INJECTOR)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = [*train_overrides(data, run_dir, db, 5, every=1), "checkpoint.keep=0",
                 f"distributed.zero_stage={zero_stage}", "distributed.precision=bf16", "distributed.grad_accum=2"]
    result = run([sys.executable, str(injector), *overrides], tmp_path, NAN_STEPS="3", NAN_MICROSTEP="2")
    assert "step 3: loss is NaN/inf on some rank; step skipped (1 in a row, 1 in this run)" in result.stdout + result.stderr

    before, after, later = saved_state(run_dir, 2), saved_state(run_dir, 3), saved_state(run_dir, 4)
    assert len(before) == len(after) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the skipped step changed the saved state"
    assert not all(torch.equal(a, b) for a, b in zip(after, later)), "step 4 should train again"
    assert all(torch.isfinite(t).all() for t in later if t.is_floating_point())
    record = run_record(db, run_dir)
    assert record["status"] == "FINISHED"
    assert record["history"]["skipped_steps"] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert [step for step, _ in record["history"]["loss"]] == [1, 2, 4, 5]  # nothing to average at step 3


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(data, tmp_path):
    """Two processes; only rank 1's loss is NaN at step 3. Rank 0 has already backpropagated its finite
    loss when the all-ranks verdict arrives: both ranks must still leave weights and momentum as they were."""
    injector = tmp_path / "inject_nan.py"
    injector.write_text(NAN_INJECTOR)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = [*train_overrides(data, run_dir, db, 5, every=1), "checkpoint.keep=0"]
    result = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(injector),
                  *overrides], tmp_path, NAN_STEPS="3", NAN_RANKS="1")
    assert "step 3: loss is NaN/inf on some rank; step skipped (1 in a row, 1 in this run)" in result.stdout + result.stderr

    before, after, later = saved_state(run_dir, 2), saved_state(run_dir, 3), saved_state(run_dir, 4)
    assert len(before) == len(after) > 0
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "the skipped step changed the saved state"
    assert not all(torch.equal(a, b) for a, b in zip(after, later)), "step 4 should train again"
    record = run_record(db, run_dir)
    assert record["status"] == "FINISHED" and record["params"]["world_size"] == "2"
    assert record["history"]["skipped_steps"] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]


def test_nan_streak_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path):
    injector = tmp_path / "inject_nan.py"
    injector.write_text(NAN_INJECTOR)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = [*train_overrides(data, run_dir, db, 12, every=1), "train.max_nonfinite_steps=3"]
    result = run([sys.executable, str(injector), *overrides], tmp_path, expect=1, NAN_STEPS="5-")
    errors = [line for line in result.stderr.splitlines() if line.startswith("tada-train: error:")]
    assert len(errors) == 1
    assert "NaN/inf for 3 steps in a row (steps 5-7" in errors[0]
    # Steps 5 and 6 were skipped, so their checkpoints hold step 4's state; step 7 raised before saving.
    assert f"the last good checkpoint is {checkpoint.checkpoint_dir(run_dir) / 'step00000006'}" in errors[0]
    assert checkpoint.latest_step(run_dir) == 6
    assert checkpoint.verify(checkpoint.checkpoint_dir(run_dir) / "step00000006") is None
    good, saved_during_streak = saved_state(run_dir, 4), saved_state(run_dir, 6)
    assert all(torch.equal(a, b) for a, b in zip(good, saved_during_streak))
    assert all(torch.isfinite(t).all() for t in saved_during_streak if t.is_floating_point())
    assert run_record(db, run_dir)["status"] == "FAILED"


def test_weights_that_went_bad_are_never_saved(data, tmp_path):
    """A weight that turns inf at step 3 (as an overflowing update would) blocks that step's checkpoint;
    the non-finite losses that follow stop the run, naming step 2 as the last good checkpoint."""
    injector = tmp_path / "inject_nan.py"
    injector.write_text(NAN_INJECTOR)
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    overrides = [*train_overrides(data, run_dir, db, 12, every=1), "train.max_nonfinite_steps=2"]
    result = run([sys.executable, str(injector), *overrides], tmp_path, expect=1, INF_WEIGHTS_AT="3")
    assert "step 3: not saving a checkpoint: the weights hold NaN/inf" in result.stdout + result.stderr
    assert f"the last good checkpoint is {checkpoint.checkpoint_dir(run_dir) / 'step00000002'}" in result.stderr
    assert checkpoint.latest_step(run_dir) == 2
    assert all(torch.isfinite(t).all() for t in saved_state(run_dir, 2) if t.is_floating_point())


def test_corrupt_latest_checkpoint_falls_back_when_resuming(data, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    run([sys.executable, "-m", "tada_dist.train", *train_overrides(data, run_dir, db, 6), "checkpoint.keep=2"],
        tmp_path)
    ckpt_dir = checkpoint.checkpoint_dir(run_dir)
    assert checkpoint.complete_tags(ckpt_dir) == ["step00000006", "step00000004"]
    states = ckpt_dir / "step00000006" / checkpoint.MODEL_STATES_FILE
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])  # a half-written copy, say

    evaluation = run([sys.executable, "-m", "tada_dist.evaluate", "--checkpoint", str(run_dir), "--json"], tmp_path)
    assert "step00000006 is unusable" in evaluation.stderr
    assert json.loads(evaluation.stdout.strip().splitlines()[-1])["step"] == 4

    resumed = run([sys.executable, "-m", "tada_dist.train", *train_overrides(data, run_dir, db, 8),
                   "checkpoint.keep=2"], tmp_path)
    assert "step00000006 is unusable" in resumed.stderr and "resuming from step 4 " in resumed.stdout
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 8
    assert checkpoint.complete_tags(ckpt_dir) == ["step00000008", "step00000006"]  # 6 was saved again
    assert checkpoint.verify(ckpt_dir / "step00000006") is None
