"""Run configuration: one dataclass per component, YAML files, dotted command-line overrides.

A run's configuration is resolved in three layers, later ones winning:
the dataclass defaults below (the embedded default config), a YAML file, then `key=value`
overrides such as `optim.lr=0.003 method=dann`. Every key and value is validated before any
training starts; a mistake gets a one-line `ConfigError` that names it and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tada_dist.data.options import DEVICES as LOADER_DEVICES
from tada_dist.data.options import IMAGENET_MEAN, IMAGENET_STD, LOADER_BACKENDS, RESIZE_MODES, TRAIN_CROPS
from tada_dist.model.options import BACKBONES, METHODS, POOLINGS
from tada_dist.paths import default_data_root, default_output_dir, is_generated_data_root
from tada_kernels.options import ATTENTION_FORMS, BACKENDS as KERNEL_BACKENDS, ENTROPY_UNITS

# Keys that were renamed or split: naming the new keys beats "unknown key" for a config that used to work.
RENAMED_KEYS = {
    "model.dropout": "model.discriminator_dropout and model.bottleneck_dropout",
}


class ConfigError(ValueError):
    """A configuration key or value is not valid."""


def _choice(default: Any, choices: tuple, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "doc": doc})


def _positive(default: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"min_exclusive": 0, "doc": doc})


def _non_negative(default: Any, doc: str = "") -> Any:
    return field(default=default, metadata={"min": 0, "doc": doc})


def _fraction(default: float, doc: str = "") -> Any:
    return field(default=default, metadata={"min": 0.0, "max_exclusive": 1.0, "doc": doc})


def _auto(value_type: type, doc: str, **checks: Any) -> Any:
    """A value of `value_type` passing `checks`, or "auto" for one derived from the rest of the config (see resolve)."""
    return field(default="auto", metadata={"auto": value_type, **checks, "doc": doc})


def _rgb(default: tuple[float, float, float], doc: str, *, positive: bool = False) -> Any:
    return field(default_factory=lambda: list(default), metadata={"rgb": True, "positive": positive, "doc": doc})


@dataclass
class DataConfig:
    root: str = field(
        default="", metadata={"doc": "folder holding the domains; empty: the generated default dataset "
                                     "($TADA_DIST_CACHE, else ~/.cache/tada-dist/synthetic)"}
    )
    source: str = field(default="source", metadata={"doc": "source domain: a folder or image-list file under root"})
    target: str = field(default="target", metadata={"doc": "target domain: a folder or image-list file under root"})
    loader: str = _choice("dali", LOADER_BACKENDS, "DALI pipelines, or the torchvision fallback")
    device: str = _choice("auto", ("auto", *LOADER_DEVICES), "where DALI decodes; auto: gpu when CUDA is present")
    batch_size: int = _positive(32, "images per domain per process per micro-step")
    eval_batch_size: int = _positive(256, "images per process per evaluation batch")
    resize: int = _positive(32, "side after resizing (see resize_mode)")
    resize_mode: str = _choice(
        "shorter", RESIZE_MODES, "shorter: the shorter side becomes resize; square: both sides do (thuml practice)"
    )
    crop: int = _positive(28, "square crop fed to the network")
    train_crop: str = _choice(
        "random", TRAIN_CROPS,
        "random: a crop x crop window of the resized image; random_resized: a random area (8-100%) and aspect "
        "ratio (3/4-4/3) resized to crop, as torchvision's RandomResizedCrop",
    )
    flip: bool = field(default=False, metadata={"doc": "random horizontal flip in training"})
    mean: list = _rgb(IMAGENET_MEAN, "per-channel mean subtracted from pixels in [0, 1] (one number or three)")
    std: list = _rgb(IMAGENET_STD, "per-channel divisor after the mean (one number or three)", positive=True)
    eval_ten_crop: bool = field(
        default=False, metadata={"doc": "evaluate on the average prediction of ten crops (corners, centre, mirrored)"}
    )
    num_threads: int = _non_negative(2, "DALI decoding threads, or torch DataLoader workers (0: main process)")
    source_holdout: float = _fraction(
        0.0, "share of the source images kept out of training, for the DEV selection score (the same images "
             "in every run)")
    cache: bool = field(default=False, metadata={
        "doc": "decode every image once and keep the domains in memory (small datasets such as digits); "
               "crops and flips are still drawn per batch"})
    skip_corrupt: bool = field(default=False, metadata={"doc": "drop unreadable images with a warning"})


@dataclass
class ModelConfig:
    backbone: str = _choice("small_cnn", BACKBONES, "feature extractor; lenet is the textbook digits network")
    pretrained: str | None = field(default=None, metadata={"doc": "torchvision weights name or a local .pth file"})
    pooling: str = _choice("avg", POOLINGS, "how the attended map becomes a vector: average, or flatten every region")
    bottleneck_dim: int = _positive(256, "width of the bottleneck G_b (when bottleneck_layers > 0)")
    bottleneck_layers: int = _non_negative(
        1, "Linear (+ BatchNorm) + ReLU layers in the bottleneck; 0: none, the pooled features feed the heads"
    )
    bottleneck_batchnorm: bool = field(default=True, metadata={"doc": "BatchNorm after each bottleneck Linear"})
    bottleneck_dropout: float = _fraction(0.0, "dropout after each bottleneck layer")
    classifier_hidden: int = _positive(100, "width of the classifier's hidden layers (when classifier_layers > 0)")
    classifier_layers: int = _non_negative(0, "hidden Linear + ReLU layers of the classifier G_y; 0: one Linear")
    region_hidden: int | None = field(
        default=None, metadata={"doc": "hidden width of the region discriminators; null: 1024 (ResNets), 100 (lenet), "
                                       "64 (small_cnn)"}
    )
    global_hidden: int = _positive(1024, "hidden width of the global discriminator")
    global_layers: int = _choice(2, (1, 2), "hidden layers of the global discriminator")
    discriminator_dropout: float = _fraction(0.5, "dropout after each hidden layer of every domain discriminator")
    attention: str = _choice(
        "paper", ATTENTION_FORMS,
        "local attention w: paper = 1 - H(d) (eq. 3); uncertainty = H(d) / ln 2, most weight where d is unsure",
    )
    entropy_unit: str = _choice("nats", ENTROPY_UNITS, "unit of the domain entropies H(d) of eq. 3 and 6")
    detach_attention: bool = field(default=True, metadata={"doc": "stop gradients through the attention weights"})


@dataclass
class LossConfig:
    adaptation_weight: float = _non_negative(1.0, "lambda of eq. 9")
    entropy_weight: float = _non_negative(0.1, "gamma of eq. 9")


@dataclass
class OptimConfig:
    lr: float = _positive(0.01, "backbone learning rate at step 0")
    new_layer_mult: float | str = _auto(
        float, "learning-rate multiplier of the layers above a pretrained backbone; auto: 10 with model.pretrained, else 1",
        min_exclusive=0,
    )
    momentum: float = _fraction(0.95, "SGD momentum (the paper: 0.95)")
    weight_decay: float = _non_negative(5e-4, "SGD weight decay (L2), on every parameter")
    nesterov: bool = field(default=True, metadata={"doc": "Nesterov momentum"})
    grad_clip: float = _non_negative(0.0, "gradient norm clipping; 0 disables it")


@dataclass
class ScheduleConfig:
    lr_gamma: float = _non_negative(10.0, "lr_p = lr * (1 + lr_gamma * p) ** -lr_power")
    lr_power: float = _non_negative(0.75, "see lr_gamma")
    grl_alpha: float = _non_negative(10.0, "GRL coefficient 2 / (1 + exp(-grl_alpha * p)) - 1")


@dataclass
class TrainConfig:
    steps: int = _positive(1500, "optimizer steps")
    log_every: int = _positive(25, "steps between metric logs")
    eval_every: int = _non_negative(500, "steps between target evaluations; 0: only at the end")
    max_nonfinite_steps: int = _positive(
        10, "a step whose loss is NaN/inf on any rank is skipped; this many in a row stop the run"
    )
    retain_host_memory: bool = field(default=True, metadata={
        "doc": "keep freed host memory in the process (glibc malloc), so that CPU steps do not fault their "
               "buffers in again every step"})


@dataclass
class DistributedConfig:
    backend: str = _choice("auto", ("auto", "gloo", "nccl"), "auto: nccl with CUDA, gloo otherwise")
    zero_stage: int | str = _auto(
        int, "DeepSpeed ZeRO stage, 0, 1 or 2; auto: 1 with bf16 (DeepSpeed's fused BF16 optimizer, fp32 gradient "
             "accumulation), else 0", choices=(0, 1, 2))
    precision: str = _choice("fp32", ("fp32", "bf16"), "training precision (bf16: DeepSpeed's bf16 mode)")
    grad_accum: int = _positive(1, "micro-steps per optimizer step")


@dataclass
class KernelsConfig:
    backend: str = _choice("auto", KERNEL_BACKENDS, "tada_kernels backend")


@dataclass
class AnalysisConfig:
    attention_images: int = _non_negative(
        8, "source and target images whose attention maps are drawn at each evaluation (local attention only)")
    features: bool = field(default=True, metadata={
        "doc": "t-SNE of the bottleneck features and the proxy A-distance at the end"})
    selection: bool = field(default=True, metadata={
        "doc": "log label-free model-selection scores (entropy, IM, SND; DEV with data.source_holdout) at each "
               "evaluation"})
    max_points: int = _positive(1000, "images per domain in the t-SNE, the A-distance and DEV's domain classifier")


@dataclass
class TrackingConfig:
    enabled: bool = field(default=True, metadata={"doc": "log the run to MLflow (rank 0 only)"})
    uri: str | None = field(default=None, metadata={"doc": "MLflow URI; default sqlite:///<output_dir parent>/mlflow.db"})
    experiment: str = field(default="tada-dist", metadata={"doc": "MLflow experiment name"})
    run_name: str | None = field(default=None, metadata={"doc": "MLflow run name; null: <method>-seed<seed>"})
    system_metrics: bool = field(default=False, metadata={"doc": "log CPU/GPU/memory use through MLflow"})
    task: str | None = field(default=None, metadata={
        "doc": "the task tag that groups runs in tada-report; null: <source>_to_<target>"})
    variant: str | None = field(default=None, metadata={
        "doc": "the row tada-report puts the run in; null: the method"})
    log_model: bool = field(default=True, metadata={
        "doc": "log the final model as an MLflow model (tada-eval --model runs:/<id>/model)"})
    register_model: str | None = field(default=None, metadata={
        "doc": "also register it in the MLflow model registry under this name (tada-eval --model models:/<name>/<v>)"})


@dataclass
class CheckpointConfig:
    every: int = _non_negative(500, "steps between checkpoints; 0: only at the end")
    resume: bool = field(default=True, metadata={"doc": "continue from the latest checkpoint in output_dir"})
    keep: int = _non_negative(3, "complete checkpoints kept (older ones are deleted); 0: keep all")


@dataclass
class Config:
    method: str = _choice("tada", tuple(METHODS), "which terms of eq. 9 are trained")
    seed: int = _non_negative(0, "seeds weights, data order, crops and dropout")
    output_dir: str = field(
        default="", metadata={"doc": "empty: runs/<source>_to_<target>/<method>-seed<seed>, plus -<N>proc for N processes"}
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


# ---------------------------------------------------------------------------------------------
# Parsing and validation


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. `optim.lr`."""
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_section(tp):
            keys.extend(valid_keys(tp, f"{prefix}{name}."))
        else:
            keys.append(prefix + name)
    return keys


def key_reference(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, meaning) for every key: the README's config table and `--list-keys`."""
    rows = []
    defaults = cls()
    for item in dataclasses.fields(cls):
        tp = _field_types(cls)[item.name]
        if _is_section(tp):
            rows += key_reference(tp, f"{prefix}{item.name}.")
            continue
        doc = item.metadata.get("doc", "")
        if "choices" in item.metadata:
            doc = f"{doc}; one of {', '.join(map(str, item.metadata['choices']))}" if doc else \
                f"one of {', '.join(map(str, item.metadata['choices']))}"
        rows.append((prefix + item.name, getattr(defaults, item.name), doc))
    return rows


def _unknown_key_error(key: str) -> ConfigError:
    if key in RENAMED_KEYS:
        return ConfigError(f"config key '{key}' was replaced by {RENAMED_KEYS[key]}")
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    hint = f" (closest valid keys: {', '.join(close)})" if close else " (see the config reference in README.md)"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce_rgb(key: str, value: Any, meta: dict) -> list[float]:
    """One number for all three channels, or a list of three (`data.mean=0.5`, `data.std=[0.2,0.2,0.2]`)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * 3
    try:
        if len(values) != 3 or any(isinstance(v, bool) for v in values):
            raise ValueError
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}' must be one number or a list of three (R, G, B), got {value!r}") from None
    if meta.get("positive") and min(numbers) <= 0:
        raise ConfigError(f"config key '{key}' has value {value!r}; expected every value > 0")
    return numbers


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Convert a YAML value to the field's type and check its allowed range."""
    if meta.get("rgb"):
        return _coerce_rgb(key, value, meta)
    if meta.get("auto"):
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        tp = meta["auto"]
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must be a {getattr(tp, '__name__', tp)}, got null")
    if tp is bool:
        if isinstance(value, bool):
            converted = value
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            converted = value.lower() in ("true", "yes", "1")
        else:
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            expected = "an integer or auto" if meta.get("auto") else "an integer"
            raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}")
        try:
            converted = int(value)
        except ValueError:
            expected = "an integer or auto" if meta.get("auto") else "an integer"
            raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}") from None
    elif tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            converted = float(value)
        except (TypeError, ValueError):
            expected = "a number or auto" if meta.get("auto") else "a number"
            raise ConfigError(f"config key '{key}' must be {expected}, got {value!r}") from None
    else:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
        converted = str(value)

    if "choices" in meta and converted not in meta["choices"]:
        allowed = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}")
    if "min" in meta and converted < meta["min"]:
        raise ConfigError(f"config key '{key}' has value {value!r}; expected >= {meta['min']}")
    if "min_exclusive" in meta and converted <= meta["min_exclusive"]:
        raise ConfigError(f"config key '{key}' has value {value!r}; expected > {meta['min_exclusive']}")
    if "max_exclusive" in meta and converted >= meta["max_exclusive"]:
        raise ConfigError(f"config key '{key}' has value {value!r}; expected < {meta['max_exclusive']}")
    return converted


def _set(config: Any, dotted: str, value: Any) -> None:
    """Set one dotted key on a config tree, validating key and value."""
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            raise _unknown_key_error(dotted)
        tp = _field_types(type(node))[part]
        is_last = i == len(parts) - 1
        if _is_section(tp):
            if is_last:
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{dotted}' is a section; set its keys, e.g. {dotted}.<key>=...")
                for sub_key, sub_value in value.items():
                    _set(config, f"{dotted}.{sub_key}", sub_value)
                return
            node = getattr(node, part)
        elif is_last:
            setattr(node, part, _coerce(dotted, value, tp, fields[part].metadata))
        else:
            raise _unknown_key_error(dotted)


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=0.003` -> ("optim.lr", 0.003); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. optim.lr=0.003)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {first_line}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(content).__name__}")
    return content


def build_config(config_file: str | Path | None = None, overrides: list[str] = (), *,
                 world_size: int | None = None) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; everything validated and resolved
    (see resolve) for a run of `world_size` processes (default: $WORLD_SIZE, else 1)."""
    config = Config()
    if config_file is not None:
        for key, value in load_yaml(config_file).items():
            _set(config, str(key), value)
    for text in overrides:
        key, value = parse_override(text)
        _set(config, key, value)
    _check_consistency(config)
    return resolve(config, world_size)


def resolve(config: Config, world_size: int | None = None) -> Config:
    """Replace "auto" and empty values by what they mean for this config, so that the result is what a
    run really uses; it is what `--print-config` shows, config.yaml keeps and MLflow logs.

    - optim.new_layer_mult: the paper trains "whatever module trained from scratch" at 10x the rate
      of the pretrained layers below. Without pretrained weights every module is trained from
      scratch, so one rate serves all (10x on the heads of a random backbone made the digits
      discriminators diverge).
    - data.root: an absolute path; empty is the generated dataset's folder.
    - output_dir: an absolute path; empty is runs/<source>_to_<target>/<method>-seed<seed>[-<N>proc].
    """
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    config = dataclasses.replace(config, data=dataclasses.replace(config.data), optim=dataclasses.replace(config.optim))
    if config.optim.new_layer_mult == "auto":
        config.optim.new_layer_mult = 10.0 if config.model.pretrained else 1.0
    if config.distributed.zero_stage == "auto":
        # bf16 with ZeRO-0 gets DeepSpeed's unfused fp16-style optimizer, which checks every parameter
        # for overflow on the host; ZeRO-1 with fp32 gradient accumulation gets the flat BF16 optimizer.
        config.distributed = dataclasses.replace(
            config.distributed, zero_stage=1 if config.distributed.precision == "bf16" else 0
        )
    config.data.root = os.path.abspath(config.data.root) if config.data.root else str(default_data_root())
    output_dir = config.output_dir or default_output_dir(
        config.data.source, config.data.target, config.method, config.seed, world_size
    )
    config.output_dir = os.path.abspath(output_dir)
    return config


def _check_consistency(config: Config) -> None:
    if config.data.crop > config.data.resize:
        raise ConfigError(
            f"config key 'data.crop' ({config.data.crop}) must not exceed 'data.resize' ({config.data.resize})"
        )
    if config.data.train_crop == "random_resized" and config.data.resize_mode != "square":
        raise ConfigError(
            "config key 'data.train_crop' random_resized draws its window on a square image; "
            f"set data.resize_mode=square (got {config.data.resize_mode})"
        )
    if config.data.root and not Path(config.data.root).is_dir() and not is_generated_data_root(config.data.root):
        raise ConfigError(f"config key 'data.root' points to a missing folder: {config.data.root}")
    if config.model.backbone in ("small_cnn", "lenet") and config.data.crop != 28:
        size = "a 7x7 map" if config.model.backbone == "small_cnn" else "a 4x4 map"
        raise ConfigError(
            f"model.backbone={config.model.backbone} expects data.crop=28 ({size}), got {config.data.crop}"
        )


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
    config = Config()
    for key, value in values.items():
        _set(config, key, value)
    _check_consistency(config)
    return resolve(config, world_size=1)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.01}} -> {"optim.lr": 0.01}; for MLflow params."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


class _ConfigDumper(yaml.SafeDumper):
    """Sections as blocks, short lists such as data.mean inline."""


_ConfigDumper.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def dump_config(config: Config) -> str:
    """The config as YAML, the form of config.yaml, configs/default.yaml and --print-config."""
    return yaml.dump(to_dict(config), Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(dump_config(config))


def load_saved_config(path: str | Path) -> Config:
    return from_dict(load_yaml(path))
