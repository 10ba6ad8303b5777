"""The two loader interfaces every backend implements (the factories are in factory.py).

A train loader is an infinite, resumable stream of equal-size batches from this rank's share of a
domain; an eval loader is one pass over this rank's share, each image exactly once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch

from tada_dist.data.domain import DataError, Domain
from tada_dist.data.sampler import LookaheadSampler, ShardedSampler


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


def torch_device(device: str) -> torch.device:
    """The torch device that a loader's `device` setting delivers batches on."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "gpu" else torch.device("cpu")
