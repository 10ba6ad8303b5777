"""Which images each rank trains on, in which order, and how to resume exactly where a run stopped."""

from __future__ import annotations

from collections import deque

import numpy as np

from tada_dist.data.domain import DataError


class ShardedSampler:
    """Deterministic, resumable index batches for one rank: each epoch a permutation of range(n) from
    (seed, epoch); rank r takes its share; infinite. Position is (epoch, cursor) and can be saved/restored exactly.

    Shares follow torch's DistributedSampler: the permutation is padded by repeating its start until
    its length divides by world_size, then rank r takes every world_size-th index from position r, so
    all ranks run the same number of steps per epoch.
    """

    def __init__(self, num_items: int, batch_size: int, *, rank: int, world_size: int, seed: int, shuffle: bool = True):
        if num_items < 1:
            raise DataError(f"sampler needs at least one item, got num_items={num_items}")
        if batch_size < 1:
            raise DataError(f"sampler batch_size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"sampler rank {rank} is not in range(world_size={world_size})")
        if seed < 0:
            raise DataError(f"sampler seed must be >= 0, got {seed}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.share_size = -(-num_items // world_size)
        self._epoch = 0
        self._cursor = 0
        self._share = self._share_of_epoch(0)

    def next_batch(self) -> list[int]:
        """Exactly batch_size indices; an epoch boundary inside a batch continues into the next epoch."""
        batch: list[int] = []
        while len(batch) < self.batch_size:
            if self._cursor == self.share_size:
                self._epoch += 1
                self._cursor = 0
                self._share = self._share_of_epoch(self._epoch)
            take = min(self.batch_size - len(batch), self.share_size - self._cursor)
            batch += self._share[self._cursor : self._cursor + take]
            self._cursor += take
        return batch

    def state_dict(self) -> dict:
        # num_items and world_size are saved to refuse a state whose cursor would mean something else.
        return {
            "epoch": self._epoch, "cursor": self._cursor, "num_items": self.num_items, "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "world_size"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"sampler state has {key}={state.get(key)}, but this sampler has {key}={getattr(self, key)} "
                    "(the dataset or the number of processes changed since the state was saved)"
                )
        epoch, cursor = state.get("epoch"), state.get("cursor")
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(cursor, int) or not 0 <= cursor <= self.share_size:
            raise DataError(
                f"sampler state has epoch={epoch!r}, cursor={cursor!r} "
                f"(expected an epoch >= 0 and a cursor in 0..{self.share_size})"
            )
        self._epoch, self._cursor = epoch, cursor
        self._share = self._share_of_epoch(epoch)

    def _share_of_epoch(self, epoch: int) -> list[int]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        else:
            order = np.arange(self.num_items)
        padded = np.resize(order, self.share_size * self.world_size)  # np.resize repeats from the start
        return padded[self.rank :: self.world_size].tolist()


class LookaheadSampler:
    """A ShardedSampler that a loader may draw from ahead of its consumer (to prefetch), while
    state_dict() still reports the position right after the last batch the consumer received."""

    def __init__(self, sampler: ShardedSampler):
        self._sampler = sampler
        self._consumed_position = sampler.state_dict()
        self._positions_in_flight: deque[dict] = deque()

    def draw(self) -> tuple[list[int], tuple[int, ...]]:
        """The next batch and its key: (seed, rank, epoch, cursor) right after the batch. The key names
        the batch uniquely within a run and does not depend on how far ahead anyone read, so
        augmentation drawn from it is identical in an interrupted-and-resumed run."""
        batch = self._sampler.next_batch()
        position = self._sampler.state_dict()
        self._positions_in_flight.append(position)
        sampler = self._sampler
        return batch, (sampler.seed, sampler.rank, position["epoch"], position["cursor"])

    def mark_consumed(self) -> None:
        """The oldest drawn batch has reached the consumer."""
        self._consumed_position = self._positions_in_flight.popleft()

    def state_dict(self) -> dict:
        return dict(self._consumed_position)

    def load_state_dict(self, state: dict) -> None:
        """Moves to `state`; the caller must discard every batch drawn before this call."""
        self._sampler.load_state_dict(state)
        self._consumed_position = self._sampler.state_dict()
        self._positions_in_flight.clear()
