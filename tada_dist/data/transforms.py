"""The image transform, described once and applied by either loader backend.

Training: resize -> random crop -> optional horizontal flip -> normalize.
Evaluation: resize -> centre crop (or ten crops: the four corners and the centre, each also
mirrored, whose predictions are averaged) -> normalize. Images are always decoded as RGB.

Resizing makes the shorter side `resize` ("shorter", torchvision's Resize(int)) or the whole image
`resize` x `resize` ("square", the thuml/tllib practice for Office and PACS). The training crop is a
`crop` x `crop` window of the resized image ("random"), or a window of random area and aspect ratio
resized to `crop` x `crop` ("random_resized", torchvision's RandomResizedCrop with its default
scale 0.08-1 and ratio 3/4-4/3, drawn on the square resized image as tllib does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tada_dist.data.domain import DataError
from tada_dist.data.options import IMAGENET_MEAN, IMAGENET_STD, RESIZE_MODES, TRAIN_CROPS

# torchvision's RandomResizedCrop defaults: the window covers 8-100% of the image, with an aspect
# ratio between 3/4 and 4/3 drawn log-uniformly; 10 tries to fit, else the whole image.
RESIZED_CROP_SCALE = (0.08, 1.0)
RESIZED_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RESIZED_CROP_TRIES = 10

# The ten evaluation views as (crop x, crop y, mirror), in the units of RandomCrops.x/y.
TEN_CROP_VIEWS = tuple(
    (x, y, mirror) for mirror in (0, 1) for x, y in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))
)


@dataclass(frozen=True)
class TransformSpec:
    resize: int  # side after resizing (256 for ImageNet-style backbones, 28 or 32 for digits)
    crop: int  # side of the square crop fed to the network
    flip: bool  # random horizontal flip, training only
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, in [0, 1] units
    std: tuple[float, float, float] = IMAGENET_STD
    resize_mode: str = "shorter"  # see RESIZE_MODES
    train_crop: str = "random"  # see TRAIN_CROPS
    ten_crop: bool = False  # evaluation only: ten views per image instead of the centre crop
    channels_last: bool = False  # batches in channels-last memory format (NHWC strides), the GPU fast path

    def __post_init__(self) -> None:
        if self.resize < 1 or self.crop < 1:
            raise DataError(f"transform sizes must be positive, got resize={self.resize}, crop={self.crop}")
        if self.crop > self.resize:
            raise DataError(f"transform crop {self.crop} is larger than resize {self.resize} (expected crop <= resize)")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise DataError(
                f"transform mean/std must have 3 values each with std > 0, got mean={self.mean}, std={self.std}"
            )
        if self.resize_mode not in RESIZE_MODES:
            raise DataError(f"transform resize_mode {self.resize_mode!r} is not one of {', '.join(RESIZE_MODES)}")
        if self.train_crop not in TRAIN_CROPS:
            raise DataError(f"transform train_crop {self.train_crop!r} is not one of {', '.join(TRAIN_CROPS)}")
        if self.train_crop == "random_resized" and self.resize_mode != "square":
            raise DataError("transform train_crop 'random_resized' draws its window on a square image: "
                            "use resize_mode 'square'")

    @property
    def views(self) -> int:
        """Images an evaluation sample becomes."""
        return len(TEN_CROP_VIEWS) if self.ten_crop else 1


@dataclass(frozen=True)
class RandomCrops:
    """Where each image of a training batch is cropped, and whether it is flipped.

    For "random" crops, x and y are fractions of the room left around the crop (0: left/top edge,
    1: right/bottom edge), the convention of DALI's crop_pos_x/crop_pos_y, and width = height = 0.
    For "random_resized" crops, (x, y) is the window's top-left corner and (width, height) its size,
    all as fractions of the resized image's side.
    """

    x: np.ndarray  # float32 [n] in [0, 1]
    y: np.ndarray  # float32 [n] in [0, 1]
    width: np.ndarray  # float32 [n] in [0, 1]
    height: np.ndarray  # float32 [n] in [0, 1]
    flip: np.ndarray  # int32 [n], 1 to mirror

    @staticmethod
    def draw(count: int, *, flip: bool, key: Sequence[int], kind: str = "random") -> RandomCrops:
        """The crops of one batch, drawn from `key` alone (see LookaheadSampler.draw): a batch gets the
        same augmentation whether or not the run was interrupted and resumed before it."""
        rng = np.random.default_rng(list(key))
        if kind == "random":
            x, y = rng.random(count, dtype=np.float32), rng.random(count, dtype=np.float32)
            width = height = np.zeros(count, dtype=np.float32)
        else:
            x, y, width, height = _resized_crop_windows(rng, count)
        mirror = rng.random(count) < 0.5 if flip else np.zeros(count, dtype=bool)
        return RandomCrops(x=x, y=y, width=width, height=height, flip=mirror.astype(np.int32))


def _resized_crop_windows(rng: np.random.Generator, count: int) -> tuple[np.ndarray, ...]:
    """RandomResizedCrop's windows on a unit square, vectorised over images and tries."""
    shape = (count, RESIZED_CROP_TRIES)
    area = rng.uniform(*RESIZED_CROP_SCALE, size=shape)
    ratio = np.exp(rng.uniform(math.log(RESIZED_CROP_RATIO[0]), math.log(RESIZED_CROP_RATIO[1]), size=shape))
    width, height = np.sqrt(area * ratio), np.sqrt(area / ratio)
    fits = (width <= 1.0) & (height <= 1.0)
    first = fits.argmax(axis=1)
    rows = np.arange(count)
    width = np.where(fits.any(axis=1), width[rows, first], 1.0)
    height = np.where(fits.any(axis=1), height[rows, first], 1.0)
    x = rng.random(count) * (1.0 - width)
    y = rng.random(count) * (1.0 - height)
    return tuple(a.astype(np.float32) for a in (x, y, width, height))
