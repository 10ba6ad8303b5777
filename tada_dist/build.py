"""Turning a config into the parts of a run: data folder and domains, transforms, loaders, model, seeds.

Training (trainer.py) and evaluation (evaluate.py) build their parts here, so that neither has to
import the other and a checkpoint is always rebuilt exactly as it was trained.
"""

from __future__ import annotations

import random
import zlib
from pathlib import Path

import numpy as np
import torch

from tada_dist.config import Config
from tada_dist.data import (
    DataError,
    Domain,
    EvalLoader,
    TrainLoader,
    TransformSpec,
    check_same_classes,
    create_eval_loader,
    create_train_loader,
    ensure_synthetic_dataset,
    load_domain,
)
from tada_dist.distributed import DistInfo, broadcast_object
from tada_dist.model import create_model
from tada_dist.paths import is_generated_data_root


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_domains(config: Config, dist_info: DistInfo) -> tuple[Domain, Domain]:
    """Rank 0 lists and checks every image once; the other ranks receive the result (or its error).

    The generated default dataset is written by every rank (it is locked and idempotent), because
    nodes need not share a file system."""
    root = Path(config.data.root)
    if is_generated_data_root(root):
        ensure_synthetic_dataset(root)
    result: tuple[Domain, Domain] | str
    if dist_info.is_main:
        try:
            source = load_domain(root / config.data.source, skip_corrupt=config.data.skip_corrupt)
            target = load_domain(root / config.data.target, skip_corrupt=config.data.skip_corrupt)
            check_same_classes(source, target)
            result = (source, target)
        except DataError as err:
            result = str(err)
    else:
        result = ""
    result = broadcast_object(result)
    if isinstance(result, str):
        raise DataError(result)
    return result


def split_holdout(domain: Domain, fraction: float) -> tuple[Domain, Domain | None]:
    """(training part, held-out part) of a domain; an image is held out by a hash of its class folder and
    file name, so the same images are held out in every run and every process, whatever the seed."""
    if fraction <= 0:
        return domain, None
    held = [zlib.crc32("/".join(Path(file).parts[-2:]).encode()) % 10_000 < fraction * 10_000
            for file in domain.files]
    if all(held) or not any(held):
        raise DataError(f"data.source_holdout={fraction} leaves {'no' if all(held) else 'all'} images of "
                        f"'{domain.name}' for training; choose a share between 0 and 1 that keeps both parts")

    def part(keep: bool) -> Domain:
        chosen = [i for i, flag in enumerate(held) if flag == keep]
        return Domain(name=domain.name if not keep else f"{domain.name} (held out)",
                      files=[domain.files[i] for i in chosen], labels=[domain.labels[i] for i in chosen],
                      classes=domain.classes)

    return part(False), part(True)


def transform_from_config(config: Config, *, ten_crop: bool | None = None, channels_last: bool = False
                          ) -> TransformSpec:
    """The image transform of `config.data`; ten_crop (evaluation only) defaults to data.eval_ten_crop."""
    data = config.data
    return TransformSpec(
        resize=data.resize, crop=data.crop, flip=data.flip, mean=tuple(data.mean), std=tuple(data.std),
        resize_mode=data.resize_mode, train_crop=data.train_crop,
        ten_crop=data.eval_ten_crop if ten_crop is None else ten_crop, channels_last=channels_last,
    )


def channels_last(dist_info: DistInfo) -> bool:
    """Whether batches (and so the feature maps) use the channels-last memory format. On GPUs cuDNN's
    convolutions and the Triton region discriminators read it fastest. On CPUs too: oneDNN's
    convolutions take it natively and PyTorch's max pooling vectorises over channels only in it (an
    NCHW 2x2 max pool of the digits network's 128 x 32 x 24 x 24 map took 2.9 ms, a fifth of the
    step; see bench/results/profile_step_cpu_nchw.md)."""
    return dist_info.device.type in ("cuda", "cpu")


def loader_device(config: Config, dist_info: DistInfo) -> str:
    """Where DALI decodes: `data.device`, or the training device when it is `auto`."""
    if config.data.device != "auto":
        return config.data.device
    return "gpu" if dist_info.device.type == "cuda" else "cpu"


def create_train_loaders(config: Config, source: Domain, target: Domain, dist_info: DistInfo
                         ) -> tuple[TrainLoader, TrainLoader]:
    """Source and target training streams of this rank; the target's order has its own seed."""
    data = config.data
    common = dict(batch_size=data.batch_size,
                  transform=transform_from_config(config, ten_crop=False, channels_last=channels_last(dist_info)),
                  rank=dist_info.rank, world_size=dist_info.world_size, backend=data.loader,
                  device=loader_device(config, dist_info), num_threads=data.num_threads, cache=data.cache)
    return (create_train_loader(source, seed=config.seed, **common),
            create_train_loader(target, seed=config.seed + 1, **common))


def create_evaluation_loader(config: Config, domain: Domain, dist_info: DistInfo, *, batch_size: int | None = None,
                             ten_crop: bool | None = None) -> EvalLoader:
    data = config.data
    return create_eval_loader(
        domain, batch_size=batch_size or data.eval_batch_size,
        transform=transform_from_config(config, ten_crop=ten_crop, channels_last=channels_last(dist_info)),
        rank=dist_info.rank, world_size=dist_info.world_size, backend=data.loader,
        device=loader_device(config, dist_info), num_threads=data.num_threads, cache=data.cache,
    )


def model_from_config(config: Config, num_classes: int, *, load_pretrained: bool = True) -> torch.nn.Module:
    """The TADA model a config describes; evaluation skips the pretrained weights it overwrites anyway."""
    model = config.model
    return create_model(
        method=config.method,
        backbone=model.backbone,
        num_classes=num_classes,
        image_size=config.data.crop,
        pretrained=model.pretrained if load_pretrained else None,
        pooling=model.pooling,
        bottleneck_dim=model.bottleneck_dim,
        bottleneck_layers=model.bottleneck_layers,
        bottleneck_batchnorm=model.bottleneck_batchnorm,
        bottleneck_dropout=model.bottleneck_dropout,
        classifier_hidden=model.classifier_hidden,
        classifier_layers=model.classifier_layers,
        region_hidden=model.region_hidden,
        global_hidden=model.global_hidden,
        global_layers=model.global_layers,
        discriminator_dropout=model.discriminator_dropout,
        attention=model.attention,
        entropy_unit=model.entropy_unit,
        detach_attention=model.detach_attention,
        kernels_backend=config.kernels.backend,
    )
