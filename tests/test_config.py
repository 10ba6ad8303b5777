from pathlib import Path

import pytest
import yaml

from tada_dist.config import (
    Config,
    ConfigError,
    build_config,
    flatten,
    load_saved_config,
    save_config,
    to_dict,
    valid_keys,
)
from tada_dist.deepspeed_config import deepspeed_config

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_shipped_default_yaml():
    shipped = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    assert shipped == to_dict(Config())


RUN_CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "sweeps")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path, tmp_path):
    config = build_config(path, [f"data.root={tmp_path}"])
    assert config.data.root == str(tmp_path)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_parses_with_every_run_config(path, tmp_path):
    from tada_dist.sweep import Sweep

    sweep = Sweep.load(path)
    for task, variant, seed in sweep.runs():
        overrides = [o for o in sweep.overrides_of(task, variant, seed) if not o.startswith("data.root=")]
        build_config(REPO / sweep.config, [*overrides, f"data.root={tmp_path}"])


def test_yaml_then_overrides_win(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("method: dann\noptim:\n  lr: 0.05\ntrain:\n  steps: 10\n")
    config = build_config(file, ["optim.lr=0.003", "data.flip=true", "model.pretrained=null", "seed=7"])
    assert config.method == "dann"
    assert config.optim.lr == pytest.approx(0.003)
    assert config.train.steps == 10
    assert config.data.flip is True
    assert config.model.pretrained is None
    assert config.seed == 7


def test_required_keys_exist():
    keys = set(valid_keys())
    for key in ("method", "seed", "data.root", "data.source", "data.target", "train.steps", "output_dir",
                "tracking.uri", "tracking.enabled", "kernels.backend"):
        assert key in keys


def test_unknown_key_names_itself_and_closest_keys():
    with pytest.raises(ConfigError) as err:
        build_config(None, ["optim.lrr=0.1"])
    message = str(err.value)
    assert "'optim.lrr'" in message and "optim.lr" in message
    assert "\n" not in message


def test_unknown_key_in_yaml(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("data:\n  sauce: mnist\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'data.sauce'.*data.source"):
        build_config(file)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("method=tadaa", "allowed: source_only, dann, tada_local, tada_global, tada"),
        ("optim.lr=-1", "'optim.lr' has value -1; expected > 0"),
        ("train.steps=abc", "'train.steps' must be an integer, got 'abc'"),
        ("data.flip=maybe", "'data.flip' must be true or false"),
        ("distributed.zero_stage=3", "allowed: 0, 1, 2"),
        ("distributed.zero_stage=some", "must be an integer or auto"),
        ("model.discriminator_dropout=1.0", "expected < 1.0"),
        ("model.dropout=0.5", "'model.dropout' was replaced by model.discriminator_dropout and model.bottleneck_dropout"),
        ("optim.new_layer_mult=fast", "'optim.new_layer_mult' must be a number or auto, got 'fast'"),
        ("optim.new_layer_mult=0", "'optim.new_layer_mult' has value 0; expected > 0"),
        ("data.mean=[0.5,0.5]", "'data.mean' must be one number or a list of three (R, G, B), got [0.5, 0.5]"),
        ("data.std=[0.5,0,0.5]", "'data.std' has value [0.5, 0, 0.5]; expected every value > 0"),
        ("model.attention=inverse", "allowed: paper, uncertainty"),
        ("model.backbone=lenet", "model.backbone=lenet expects data.crop=28 (a 4x4 map), got 24"),
        ("data.train_crop=random_resized", "set data.resize_mode=square (got shorter)"),
        ("kernels.backend=cuda", "allowed: auto, eager, triton"),
        ("data=3", "is a section"),
        ("optim.lr", "not of the form key=value"),
    ],
)
def test_bad_values_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(None, [override, *(["data.crop=24"] if override.startswith("model.backbone") else [])])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(bad)


def test_missing_data_root_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="data.root' points to a missing folder"):
        build_config(None, [f"data.root={tmp_path / 'absent'}"])


def test_crop_larger_than_resize_is_rejected():
    with pytest.raises(ConfigError, match="data.crop"):
        build_config(None, ["data.resize=24"])


def test_new_layer_mult_auto_is_ten_only_above_a_pretrained_backbone():
    assert Config().optim.new_layer_mult == "auto"
    assert build_config(None, []).optim.new_layer_mult == 1.0
    pretrained = build_config(None, ["model.backbone=resnet18", "data.resize=64", "data.crop=64",
                                     "model.pretrained=IMAGENET1K_V1"])
    assert pretrained.optim.new_layer_mult == 10.0
    assert build_config(None, ["optim.new_layer_mult=3"]).optim.new_layer_mult == 3.0


def test_normalisation_takes_one_number_or_three():
    config = build_config(None, ["data.mean=0.5", "data.std=[0.25, 0.5, 1]"])
    assert config.data.mean == [0.5, 0.5, 0.5] and config.data.std == [0.25, 0.5, 1.0]


def test_saved_config_round_trips(tmp_path):
    config = build_config(None, ["method=tada_local", "optim.lr=0.02", "tracking.uri=sqlite:///x.db"])
    save_config(config, tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml") == config


def test_default_output_dir_names_the_pair_method_seed_and_process_count(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    overrides = ["data.source=mnist", "data.target=mnist_m", "method=dann", "seed=3"]
    assert build_config(None, overrides).output_dir == str(tmp_path / "runs/mnist_to_mnist_m/dann-seed3")
    assert build_config(None, overrides, world_size=2).output_dir == str(tmp_path / "runs/mnist_to_mnist_m/dann-seed3-2proc")
    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun exports
    assert build_config(None, overrides).output_dir.endswith("dann-seed3-4proc")
    assert build_config(None, [*overrides, "output_dir=mine"]).output_dir == str(tmp_path / "mine")


def test_resolved_config_shows_real_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TADA_DIST_CACHE", str(tmp_path / "cache"))
    assert build_config(None, []).data.root == str(tmp_path / "cache")  # the generated dataset's folder
    (tmp_path / "digits").mkdir()
    assert build_config(None, ["data.root=digits"]).data.root == str(tmp_path / "digits")


def test_flatten_for_mlflow_params():
    flat = flatten(to_dict(Config()))
    assert flat["optim.lr"] == 0.01
    assert flat["method"] == "tada"
    assert set(flat) == set(valid_keys())


def test_deepspeed_config_is_derived_from_ours():
    config = build_config(None, ["data.batch_size=16", "distributed.grad_accum=3", "distributed.zero_stage=2",
                                 "distributed.precision=bf16", "optim.grad_clip=5"])
    ds = deepspeed_config(config, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 16 * 3 * 4
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["bf16"]["enabled"] is True
    assert ds["gradient_clipping"] == 5.0


def test_readme_documents_every_key():
    readme = (REPO / "README.md").read_text()
    missing = [key for key in valid_keys() if f"`{key}`" not in readme]
    assert not missing


def test_cli_prints_the_resolved_config_and_rejects_bad_keys(capsys):
    from tada_dist.train import main

    assert main(["--print-config", "method=dann", "optim.lr=0.02"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["method"] == "dann" and printed["optim"]["lr"] == 0.02

    assert main(["optim.lrr=0.02"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("tada-train: error: unknown config key 'optim.lrr'")
