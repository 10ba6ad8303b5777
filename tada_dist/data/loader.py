"""Loader factories, and the two loader interfaces every backend implements.

A train loader is an infinite, resumable stream of equal-size batches from this rank's share of a
domain; an eval loader is one pass over this rank's share, each image exactly once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from tada_dist.data.domain import DataError, Domain
from tada_dist.data.options import DEVICES, LOADER_BACKENDS as BACKENDS
from tada_dist.data.sampler import LookaheadSampler, ShardedSampler
from tada_dist.data.transforms import TransformSpec


class TrainLoader(ABC):
    """Infinite iterator of (images [B, 3, crop, crop] float32, labels [B] int64).

    state_dict() is the sampler position after the last batch returned by next(), however far the
    backend has read ahead; loading it reproduces the same following batches (the same images in the
    same order). Each batch's crops and flips are drawn from its key (see LookaheadSampler.draw), so
    they are reproduced too: a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, sampler: ShardedSampler):
        self._sampler = LookaheadSampler(sampler)
        self.data_wait_seconds = 0.0  # time spent inside next(): what the training loop waited for data

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        batch = self._produce_batch()
        self._sampler.mark_consumed()
        self.data_wait_seconds += time.perf_counter() - started
        return batch

    def state_dict(self) -> dict:
        return self._sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._sampler.load_state_dict(state)
        self._restart()

    @abstractmethod
    def _produce_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, in the order the sampler drew the batches."""

    @abstractmethod
    def _restart(self) -> None:
        """Discards every batch read ahead and reads on from the sampler's position."""


class EvalLoader(ABC):
    """One pass over this rank's share per iteration: files[rank::world_size], no padding, so that across
    ranks every image is counted exactly once. A rank may get no image; it then yields nothing."""

    def __init__(self, domain: Domain, *, batch_size: int, rank: int, world_size: int):
        if batch_size < 1:
            raise DataError(f"eval loader batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"eval loader rank {rank} is not in range(world_size={world_size})")
        self.batch_size = batch_size
        self.files = domain.files[rank::world_size]
        self.labels = domain.labels[rank::world_size]

    def __len__(self) -> int:
        return len(self.files)

    @abstractmethod
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields (images [b, 3, crop, crop] float32, labels [b] int64), b <= batch_size."""


def create_train_loader(domain: Domain, *, batch_size: int, transform: TransformSpec, rank: int, world_size: int,
                        seed: int, backend: str = "dali", device: str = "cpu", num_threads: int = 2) -> TrainLoader:
    """`device="gpu"` decodes on the current CUDA device (DALI) and returns CUDA tensors."""
    train_loader_class, _ = _loader_classes(backend, device, num_threads)
    sampler = ShardedSampler(len(domain.files), batch_size, rank=rank, world_size=world_size, seed=seed)
    return train_loader_class(domain, sampler, transform, device=device, num_threads=num_threads)


def create_eval_loader(domain: Domain, *, batch_size: int, transform: TransformSpec, rank: int, world_size: int,
                       backend: str = "dali", device: str = "cpu", num_threads: int = 2) -> EvalLoader:
    """Evaluation ignores `transform.flip` and crops the centre."""
    _, eval_loader_class = _loader_classes(backend, device, num_threads)
    return eval_loader_class(domain, transform, batch_size=batch_size, rank=rank, world_size=world_size,
                             device=device, num_threads=num_threads)


def torch_device(device: str) -> torch.device:
    """The torch device that a loader's `device` setting delivers batches on."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")


def _loader_classes(backend: str, device: str, num_threads: int) -> tuple[type[TrainLoader], type[EvalLoader]]:
    # Backends are imported on demand: DALI is optional when the torch backend is used.
    if backend not in BACKENDS:
        raise ValueError(f"unknown data loader backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if device not in DEVICES:
        raise ValueError(f"unknown data loader device {device!r} (expected one of {', '.join(DEVICES)})")
    if device == "gpu" and not torch.cuda.is_available():
        raise DataError("data loader device 'gpu' needs CUDA, which is not available here (use device 'cpu')")
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
