"""The image transform, described once and applied by either loader backend.

Training: resize the shorter side -> random square crop -> optional horizontal flip -> normalize.
Evaluation: resize the shorter side -> centre crop -> normalize. Images are always decoded as RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tada_dist.data.domain import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TransformSpec:
    resize: int  # shorter side after resizing (256 for ImageNet-style backbones, 32 for digits)
    crop: int  # side of the square crop fed to the network
    flip: bool  # random horizontal flip, training only
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, in [0, 1] units
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.resize < 1 or self.crop < 1:
            raise DataError(f"transform sizes must be positive, got resize={self.resize}, crop={self.crop}")
        if self.crop > self.resize:
            raise DataError(f"transform crop {self.crop} is larger than resize {self.resize} (expected crop <= resize)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(
                f"transform mean/std must have 3 values each with std > 0, got mean={self.mean}, std={self.std}"
            )


@dataclass(frozen=True)
class RandomCrops:
    """Where each image of a training batch is cropped, and whether it is flipped.

    x and y are fractions of the room left around the crop (0: left/top edge, 1: right/bottom edge),
    the convention of DALI's crop_pos_x/crop_pos_y, so both loader backends read them the same way.
    """

    x: np.ndarray  # float32 [n] in [0, 1]
    y: np.ndarray  # float32 [n] in [0, 1]
    flip: np.ndarray  # int32 [n], 1 to mirror

    @staticmethod
    def draw(count: int, *, flip: bool, key: Sequence[int]) -> RandomCrops:
        """The crops of one batch, drawn from `key` alone (see LookaheadSampler.draw): a batch gets the
        same augmentation whether or not the run was interrupted and resumed before it."""
        rng = np.random.default_rng(list(key))
        x, y = rng.random(count, dtype=np.float32), rng.random(count, dtype=np.float32)
        mirror = rng.random(count) < 0.5 if flip else np.zeros(count, dtype=bool)
        return RandomCrops(x=x, y=y, flip=mirror.astype(np.int32))
