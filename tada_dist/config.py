"""Run configuration: one dataclass per component, YAML files, dotted command-line overrides.

A run's configuration is resolved in three layers, later ones winning:
the dataclass defaults below (the embedded default config), a YAML file, then `key=value`
overrides such as `optim.lr=0.003 method=dann`. Every key and value is validated before any
training starts; a mistake gets a one-line `ConfigError` that names it and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import tada_kernels
from tada_dist.data.loader import BACKENDS as LOADER_BACKENDS, DEVICES as LOADER_DEVICES
from tada_dist.model.tada import METHODS


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


@dataclass
class DataConfig:
    root: str = field(default="", metadata={"doc": "folder holding the domains; empty: the generated default dataset"})
    source: str = field(default="source", metadata={"doc": "source domain: a folder or image-list file under root"})
    target: str = field(default="target", metadata={"doc": "target domain: a folder or image-list file under root"})
    loader: str = _choice("dali", LOADER_BACKENDS, "DALI pipelines, or the torchvision fallback")
    device: str = _choice("auto", ("auto", *LOADER_DEVICES), "where DALI decodes; auto: gpu when CUDA is present")
    batch_size: int = _positive(32, "images per domain per process per micro-step")
    eval_batch_size: int = _positive(256, "images per process per evaluation batch")
    resize: int = _positive(32, "shorter side after resizing")
    crop: int = _positive(28, "square crop fed to the network")
    flip: bool = field(default=False, metadata={"doc": "random horizontal flip in training"})
    num_threads: int = _non_negative(2, "DALI decoding threads, or torch DataLoader workers (0: main process)")
    skip_corrupt: bool = field(default=False, metadata={"doc": "drop unreadable images with a warning"})


@dataclass
class ModelConfig:
    backbone: str = _choice("small_cnn", ("small_cnn", "resnet18", "resnet34", "resnet50", "resnet101"))
    pretrained: str | None = field(default=None, metadata={"doc": "torchvision weights name or a local .pth file"})
    bottleneck_dim: int = _positive(256)
    region_hidden: int | None = field(default=None, metadata={"doc": "hidden width of the region discriminators"})
    global_hidden: int = _positive(1024, "hidden width of the global discriminator")
    dropout: float = _fraction(0.5, "dropout in the discriminators")
    detach_attention: bool = field(default=True, metadata={"doc": "stop gradients through the attention weights"})


@dataclass
class LossConfig:
    adaptation_weight: float = _non_negative(1.0, "lambda of eq. 9")
    entropy_weight: float = _non_negative(0.1, "gamma of eq. 9")


@dataclass
class OptimConfig:
    lr: float = _positive(0.01, "backbone learning rate at step 0")
    new_layer_mult: float = _positive(10.0, "learning-rate multiplier of the layers trained from scratch")
    momentum: float = _fraction(0.95)
    weight_decay: float = _non_negative(5e-4)
    nesterov: bool = True
    grad_clip: float = _non_negative(0.0, "gradient norm clipping; 0 disables it")


@dataclass
class ScheduleConfig:
    lr_gamma: float = _non_negative(10.0, "lr_p = lr * (1 + lr_gamma * p) ** -lr_power")
    lr_power: float = _non_negative(0.75)
    grl_alpha: float = _non_negative(10.0, "GRL coefficient 2 / (1 + exp(-grl_alpha * p)) - 1")


@dataclass
class TrainConfig:
    steps: int = _positive(1500, "optimizer steps")
    log_every: int = _positive(25, "steps between metric logs")
    eval_every: int = _non_negative(500, "steps between target evaluations; 0: only at the end")
    max_nonfinite_steps: int = _positive(
        10, "a step whose loss is NaN/inf on any rank is skipped; this many in a row stop the run"
    )


@dataclass
class DistributedConfig:
    backend: str = _choice("auto", ("auto", "gloo", "nccl"), "auto: nccl with CUDA, gloo otherwise")
    zero_stage: int = _choice(0, (0, 1, 2), "DeepSpeed ZeRO stage")
    precision: str = _choice("fp32", ("fp32", "bf16"))
    grad_accum: int = _positive(1, "micro-steps per optimizer step")


@dataclass
class KernelsConfig:
    backend: str = _choice("auto", tada_kernels.BACKENDS, "tada_kernels backend")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = field(default=None, metadata={"doc": "MLflow URI; default sqlite:///<output_dir parent>/mlflow.db"})
    experiment: str = "tada-dist"
    run_name: str | None = None
    system_metrics: bool = field(default=False, metadata={"doc": "log CPU/GPU/memory use through MLflow"})


@dataclass
class CheckpointConfig:
    every: int = _non_negative(500, "steps between checkpoints; 0: only at the end")
    resume: bool = field(default=True, metadata={"doc": "continue from the latest checkpoint in output_dir"})
    keep: int = _non_negative(3, "complete checkpoints kept (older ones are deleted); 0: keep all")


@dataclass
class Config:
    method: str = _choice("tada", tuple(METHODS), "which terms of eq. 9 are trained")
    seed: int = _non_negative(0)
    output_dir: str = field(default="", metadata={"doc": "empty: runs/<source>_to_<target>/<method>-seed<seed>"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def resolved_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        pair = f"{Path(self.data.source).stem}_to_{Path(self.data.target).stem}"
        return Path("runs") / pair / f"{self.method}-seed{self.seed}"


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


def _unknown_key_error(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.5)
    hint = f" (closest valid keys: {', '.join(close)})" if close else " (see the config reference in README.md)"
    return ConfigError(f"unknown config key '{key}'{hint}")


def _coerce(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Convert a YAML value to the field's type and check its allowed range."""
    optional = False
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional, tp = True, args[0]
    if value is None or (optional and isinstance(value, str) and value.lower() in ("null", "none", "")):
        if optional:
            return None
        raise ConfigError(f"config key '{key}' must be a {tp.__name__}, got null")
    if tp is bool:
        if isinstance(value, bool):
            converted = value
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            converted = value.lower() in ("true", "yes", "1")
        else:
            raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
        try:
            converted = int(value)
        except ValueError:
            raise ConfigError(f"config key '{key}' must be an integer, got {value!r}") from None
    elif tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
        try:
            converted = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {value!r}") from None
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


def build_config(config_file: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides; everything validated."""
    config = Config()
    if config_file is not None:
        for key, value in load_yaml(config_file).items():
            _set(config, str(key), value)
    for text in overrides:
        key, value = parse_override(text)
        _set(config, key, value)
    _check_consistency(config)
    return config


def _check_consistency(config: Config) -> None:
    if config.data.crop > config.data.resize:
        raise ConfigError(
            f"config key 'data.crop' ({config.data.crop}) must not exceed 'data.resize' ({config.data.resize})"
        )
    if config.data.root and not Path(config.data.root).is_dir():
        raise ConfigError(f"config key 'data.root' points to a missing folder: {config.data.root}")
    if config.model.backbone == "small_cnn" and config.data.crop != 28:
        raise ConfigError(f"model.backbone=small_cnn expects data.crop=28 (a 7x7 map), got {config.data.crop}")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def from_dict(values: dict) -> Config:
    config = Config()
    for key, value in values.items():
        _set(config, key, value)
    _check_consistency(config)
    return config


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.01}} -> {"optim.lr": 0.01}; for MLflow params."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def load_saved_config(path: str | Path) -> Config:
    return from_dict(load_yaml(path))
