"""Loader factories: a backend's train or eval loader for a domain, checked before it is built."""

from __future__ import annotations

import torch

from tada_dist.data.domain import DataError, Domain
from tada_dist.data.loader import EvalLoader, TrainLoader
from tada_dist.data.options import DEVICES, LOADER_BACKENDS as BACKENDS
from tada_dist.data.sampler import ShardedSampler
from tada_dist.data.transforms import TransformSpec


def create_train_loader(domain: Domain, *, batch_size: int, transform: TransformSpec, rank: int, world_size: int,
                        seed: int, backend: str = "dali", device: str = "cpu", num_threads: int = 2,
                        cache: bool = False) -> TrainLoader:
    """`device="gpu"` decodes on the current CUDA device (DALI) and returns CUDA tensors; `cache` decodes
    the domain once into memory instead of reading files during training (memory_loader.py)."""
    train_loader_class, _ = _loader_classes(backend, device, num_threads, cache)
    sampler = ShardedSampler(len(domain.files), batch_size, rank=rank, world_size=world_size, seed=seed)
    return train_loader_class(domain, sampler, transform, device=device, num_threads=num_threads)


def create_eval_loader(domain: Domain, *, batch_size: int, transform: TransformSpec, rank: int, world_size: int,
                       backend: str = "dali", device: str = "cpu", num_threads: int = 2,
                       cache: bool = False) -> EvalLoader:
    """Evaluation ignores `transform.flip` and crops the centre (or the ten views of transform.ten_crop)."""
    _, eval_loader_class = _loader_classes(backend, device, num_threads, cache)
    return eval_loader_class(domain, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                             device=device, num_threads=num_threads)


def _loader_classes(backend: str, device: str, num_threads: int, cache: bool = False
                    ) -> tuple[type[TrainLoader], type[EvalLoader]]:
    # Backends are imported on demand: DALI is optional when the torch backend is used.
    if backend not in BACKENDS:
        raise ValueError(f"unknown data loader backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise ValueError(f"unknown data loader device {device!r} (expected one of {', '.join(DEVICES)})")
    if device == "gpu" and not torch.cuda.is_available():
        raise DataError("data loader device 'gpu' needs CUDA, which is not available here (use device 'cpu')")
    if cache:
        from tada_dist.data.memory_loader import MemoryEvalLoader, MemoryTrainLoader

        return MemoryTrainLoader, MemoryEvalLoader
    minimum_threads = 1 if backend == "dali" else 0
    if num_threads < minimum_threads:
        raise DataError(f"data loader num_threads must be >= {minimum_threads} for '{backend}', got {num_threads}")
    if backend == "torch":
        from tada_dist.data.torch_loader import TorchEvalLoader, TorchTrainLoader

        return TorchTrainLoader, TorchEvalLoader
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as error:
        raise DataError(
            f"data loader 'dali' needs NVIDIA DALI, which failed to import ({error}): "
            "pip install nvidia-dali-cuda130, or set data.loader=torch"
        ) from error
    from tada_dist.data.dali_loader import DaliEvalLoader, DaliTrainLoader

    return DaliTrainLoader, DaliEvalLoader
