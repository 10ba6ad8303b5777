"""End to end: real torchrun workers, DALI pipelines, a DeepSpeed engine on gloo and MLflow on sqlite."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from e2e import metric_history, process_env, run, torchrun, train_overrides, wait_for

from tada_dist import checkpoint
from tada_dist.data.synthetic import ensure_synthetic_dataset


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("data"), images_per_class=9, seed=1)


def test_torchrun_two_processes_trains_tracks_and_resumes(tiny_data, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"

    first = run(torchrun(train_overrides(tiny_data, run_dir, db, steps=4)), tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 4
    assert 0.0 <= metrics["target_acc"] <= 100.0
    run_id = metrics["mlflow_run_id"]
    assert "target accuracy" in first.stdout and "mlflow ui --backend-store-uri" in first.stdout
    mlflow_program = first.stdout.split("open the UI with:\n")[1].split()[0]
    assert (tmp_path / mlflow_program).is_file()  # runnable as printed, from the folder the run started in
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000004"
    assert (run_dir / "config.yaml").is_file() and (run_dir / "deepspeed_config.json").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["world_size"] == "2"
    assert mlflow_run.data.params["method"] == "tada" and mlflow_run.data.params["train.steps"] == "4"
    for key in ("loss", "cls", "local", "global", "entropy", "lambda_p", "lr", "images_per_sec", "data_wait_sec"):
        assert [step for step, _ in metric_history(db, run_id, key)] == [1, 2, 3, 4], key
    assert [step for step, _ in metric_history(db, run_id, "target_acc")] == [2, 4]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "deepspeed_config.json"} <= artifacts

    # The same command with more steps resumes from the saved step and continues the same MLflow run.
    second = run(torchrun(train_overrides(tiny_data, run_dir, db, steps=6)), tmp_path)
    assert "resuming from step 4" in second.stdout + second.stderr
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 6 and metrics["mlflow_run_id"] == run_id
    assert [step for step, _ in metric_history(db, run_id, "loss")] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000006"

    evaluation = run([sys.executable, "-m", "tada_dist.evaluate", "--checkpoint", str(run_dir), "--json"], tmp_path)
    result = json.loads(evaluation.stdout.strip().splitlines()[-1])
    assert result["step"] == 6
    assert result["images"] == 6 * 9  # every target image counted once
    assert result["accuracy"] == pytest.approx(metrics["target_acc"], abs=1e-6)


def test_bad_data_fails_before_training_without_touching_outputs(tiny_data, tmp_path):
    mismatched = tmp_path / "mismatched"
    (mismatched / "source" / "cat").mkdir(parents=True)
    (mismatched / "target" / "dog").mkdir(parents=True)
    for domain, cls in (("source", "cat"), ("target", "dog")):
        from PIL import Image

        Image.new("RGB", (32, 32)).save(mismatched / domain / cls / "a.png")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "tada_dist.train", *train_overrides(mismatched, run_dir, tmp_path / "m.db", 2)],
        cwd=tmp_path, env=process_env(tmp_path), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("tada-train: error:")]
    assert len(error_lines) == 1 and "only in source: ['cat']" in error_lines[0]
    assert not run_dir.exists()
    assert not (tmp_path / "m.db").exists()


def test_single_process_with_torch_loader_and_tracking_off(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = train_overrides(tiny_data, run_dir, tmp_path / "unused.db", steps=2)
    overrides += ["data.loader=torch", "tracking.enabled=false", "method=dann", "data.num_threads=0"]
    run([sys.executable, "-m", "tada_dist.train", *overrides], tmp_path)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 2 and metrics["mlflow_run_id"] is None
    assert sum(1 for _ in (run_dir / "checkpoints").glob("step*")) == 1
    assert not (tmp_path / "unused.db").exists()


def test_zero1_bf16_with_accumulation_trains_and_resumes(tiny_data, tmp_path):
    """ZeRO stage, precision and accumulation reach DeepSpeed from our config alone; the global batch
    is per-rank batch x ranks x accumulation, and schedules count optimizer steps."""
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    settings = ["distributed.precision=bf16", "distributed.grad_accum=2"]  # zero_stage auto: 1 with bf16
    first = run([sys.executable, "-m", "tada_dist.train", *train_overrides(tiny_data, run_dir, db, 2), *settings],
                tmp_path)
    assert "global batch 8 per domain = 4 per rank x 1 ranks x 2 accumulation" in first.stdout
    generated = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert generated["zero_optimization"]["stage"] == 1 and generated["bf16"]["enabled"] is True
    assert generated["gradient_accumulation_steps"] == 2 and generated["train_batch_size"] == 8

    second = run([sys.executable, "-m", "tada_dist.train", *train_overrides(tiny_data, run_dir, db, 3), *settings],
                 tmp_path)
    assert "resuming from step 2 " in second.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 3
    from mlflow.tracking import MlflowClient

    params = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(metrics["mlflow_run_id"]).data.params
    assert params["global_batch"] == "8" and params["world_size"] == "1"
    # The fast path: DeepSpeed's flat BF16 optimizer, not its unfused fp16-style one (ZeRO-0 with bf16).
    assert params["distributed.zero_stage"] == "1" and params["deepspeed_optimizer"] == "BF16_Optimizer"
    assert generated["data_types"] == {"grad_accum_dtype": "fp32"}
    # The LR schedule advanced once per optimizer step, not per micro-step: lr_3 = lr_0 (1 + 10 p)^-0.75.
    [(step, lr)] = [(s, v) for s, v in metric_history(db, metrics["mlflow_run_id"], "lr") if s == 3]
    assert lr == pytest.approx(0.01 * (1 + 10 * 3 / 3) ** -0.75, rel=1e-6)


def test_thuml_transforms_and_ten_crop_evaluation(tiny_data, tmp_path):
    """Square resize + RandomResizedCrop in training, ten-crop evaluation during training and in tada-eval."""
    run_dir = tmp_path / "run"
    overrides = train_overrides(tiny_data, run_dir, tmp_path / "unused.db", steps=2) + [
        "tracking.enabled=false", "data.resize_mode=square", "data.train_crop=random_resized", "data.flip=true",
        "data.eval_ten_crop=true",
    ]
    run([sys.executable, "-m", "tada_dist.train", *overrides], tmp_path)
    trained = json.loads((run_dir / "metrics.json").read_text())

    def evaluate(*flags: str) -> dict:
        result = run([sys.executable, "-m", "tada_dist.evaluate", "--checkpoint", str(run_dir), "--json", *flags],
                     tmp_path)
        return json.loads(result.stdout.strip().splitlines()[-1])

    ten_crop, centre = evaluate(), evaluate("--no-ten-crop")
    assert ten_crop["images"] == centre["images"] == 6 * 9  # ten views of an image count as one image
    assert ten_crop["accuracy"] == pytest.approx(trained["target_acc"], abs=1e-6)
    assert evaluate("--ten-crop")["accuracy"] == ten_crop["accuracy"]


def test_unreachable_pretrained_weights_stop_before_training_with_one_line(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = train_overrides(tiny_data, run_dir, tmp_path / "m.db", steps=2) + [
        "model.backbone=resnet18", "model.pretrained=IMAGENET1K_V1", "data.resize=32", "data.crop=32",
    ]
    # A proxy that refuses every connection makes the download fail at once, network or not.
    env = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "TORCH_HOME": str(tmp_path / "th")}
    result = run([sys.executable, "-m", "tada_dist.train", *overrides], tmp_path, expect=2, **env)
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("tada-train: error:")]
    assert len(error_lines) == 1, result.stderr[-2000:]
    assert "could not download torchvision weights 'IMAGENET1K_V1' for resnet18" in error_lines[0]
    assert "model.pretrained=/path/to/resnet18-f37072fd.pth" in error_lines[0]
    assert not run_dir.exists() and not (tmp_path / "m.db").exists()


# -- first contact: the mistakes a new user makes get one line, and work is never lost ------------------


def error_lines(result: subprocess.CompletedProcess, prog: str = "tada-train") -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(f"{prog}: error:")]


def test_readme_order_one_process_then_two_and_a_mismatched_resume_stops_once(tiny_data, tmp_path):
    """The default output folders of a one- and a two-process run differ, so the README's commands run
    in order; forcing the two-process run into the one-process folder stops at once with one line,
    without torchrun restarting the workers."""
    common = [f"data.root={tiny_data}", "train.steps=2", "train.eval_every=0", "data.batch_size=4",
              "data.eval_batch_size=16", "model.global_hidden=32", "model.region_hidden=16", "model.bottleneck_dim=32",
              "data.num_threads=1", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    run([sys.executable, "-m", "tada_dist.train", *common], tmp_path)
    single = tmp_path / "runs" / "source_to_target" / "tada-seed0"
    assert json.loads((single / "metrics.json").read_text())["world_size"] == 1

    local = str(Path(__file__).resolve().parents[1] / "launch" / "local.sh")
    run([local, "configs-unused", *common], tmp_path, expect=2)  # a missing config file: the launcher's own check
    config = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    run([local, config, *common], tmp_path, NPROC_PER_NODE="2")
    assert json.loads((tmp_path / "runs" / "source_to_target" / "tada-seed0-2proc" / "metrics.json").read_text())[
        "world_size"] == 2

    mismatched = run([local, config, *common, f"output_dir={single}"], tmp_path, expect=2, NPROC_PER_NODE="2")
    [line] = error_lines(mismatched)
    assert f"{single} holds a checkpoint (step 2) of a different run: world_size 1 there, 2 now" in line
    assert "output_dir=..." in line and "checkpoint.resume=false" in line
    assert "Restarting" not in mismatched.stderr and "FAILED" not in mismatched.stderr  # torchrun did not try again

    more = run([sys.executable, "-m", "tada_dist.train", *common, "train.steps=1"], tmp_path, expect=2)
    [line] = error_lines(more)
    assert "holds a checkpoint at step 2, beyond train.steps=1" in line


def test_ctrl_c_saves_the_step_and_the_same_command_resumes_the_same_mlflow_run(tiny_data, tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    command = [sys.executable, "-m", "tada_dist.train",
               *train_overrides(tiny_data, run_dir, db, steps=400, every=1000), "train.eval_every=0"]
    log = tmp_path / "train.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=tmp_path, env=process_env(tmp_path), stdout=handle,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "step 3/400" in log.read_text(), timeout=300, what="step 3", process=process)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130
    finally:
        process.kill()
    output = log.read_text()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    stopped_at = int(output.split("stopped by SIGINT at step ")[1].split(";")[0])
    assert 3 <= stopped_at < 400 and "run the same command to resume" in output
    assert checkpoint.latest_step(run_dir) == stopped_at
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    [first] = client.search_runs([client.get_experiment_by_name("tada-dist").experiment_id])
    assert first.info.status == "KILLED" and first.info.run_name == "run"

    resumed = run([*command[:-2], "train.steps=" + str(stopped_at + 2), "train.eval_every=0"], tmp_path)
    assert f"resuming from step {stopped_at} " in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["mlflow_run_id"] == first.info.run_id and metrics["step"] == stopped_at + 2
    assert client.get_run(first.info.run_id).info.status == "FINISHED"
    # Training time and throughput are totals over both sessions, not the last one alone.
    assert metrics["train_seconds"] > 0 and metrics["images_per_sec"] > 0
    history = metric_history(db, first.info.run_id, "loss")
    assert [step for step, _ in history] == list(range(1, stopped_at + 3))


@pytest.mark.parametrize("problem", ["server", "folder"])
def test_unreachable_tracking_server_and_unwritable_folder_stop_at_once_with_one_line(tiny_data, tmp_path, problem):
    from tada_dist.distributed import free_port

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    run_dir = blocker / "run" if problem == "folder" else tmp_path / "run"
    overrides = train_overrides(tiny_data, run_dir, tmp_path / "m.db", steps=2)
    if problem == "server":
        overrides.append(f"tracking.uri=http://127.0.0.1:{free_port()}")
    result = run([sys.executable, "-m", "tada_dist.train", *overrides], tmp_path, expect=2, timeout=60)
    [line] = error_lines(result)
    if problem == "server":
        assert "did not answer within 5 s" in line and "tracking.enabled=false" in line
    else:
        assert f"output_dir {run_dir} is not writable" in line
    assert "Traceback" not in result.stderr and "torch" not in result.stderr.lower()


def test_progress_is_plain_lines_and_eval_json_is_alone_on_stdout(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    result = run([sys.executable, "-m", "tada_dist.train",
                  *train_overrides(tiny_data, run_dir, tmp_path / "m.db", steps=3), "tracking.enabled=false"], tmp_path)
    assert "\r" not in result.stdout + result.stderr
    assert "step 2/3  loss " in result.stdout and "eta " in result.stdout
    assert "DeepSpeed" not in result.stdout and "[INFO]" not in result.stdout + result.stderr
    evaluation = run([sys.executable, "-m", "tada_dist.evaluate", "--checkpoint", str(run_dir), "--json"], tmp_path)
    assert len(evaluation.stdout.splitlines()) == 1 and json.loads(evaluation.stdout)["step"] == 3


def test_cached_domains_train_exactly_like_the_torch_loader(tiny_data, tmp_path):
    """data.cache decodes once and cuts batches from memory; the batches, so the run, are the same."""
    db = tmp_path / "mlflow.db"
    histories = {}
    for name, settings in (("torch", ["data.loader=torch", "data.num_threads=0"]), ("cache", ["data.cache=true"])):
        run_dir = tmp_path / name
        overrides = [*train_overrides(tiny_data, run_dir, db, steps=4), *settings, "model.discriminator_dropout=0"]
        run([sys.executable, "-m", "tada_dist.train", *overrides], tmp_path)
        run_id = json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]
        histories[name] = {key: metric_history(db, run_id, key) for key in ("loss", "target_acc")}
    assert histories["cache"] == histories["torch"]
