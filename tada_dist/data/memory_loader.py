"""Loaders over a domain decoded once and kept in memory (`data.cache=true`), for small datasets.

Every image is decoded and resized once (the deterministic part of the transform), in parallel, and
kept as uint8 pixels; each batch is then cut, mirrored and normalised from memory with a few tensor
operations. Crops and flips are still drawn from each batch's key (RandomCrops), so a resumed run
sees exactly the batches of an uninterrupted one, as with the other backends. The pixels of a domain
are shared by its train and eval loaders. Digits (19,000 images of 28x28) take 45 MB.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from tada_dist.data.domain import Domain
from tada_dist.data.loader import EvalLoader, TrainLoader, torch_device
from tada_dist.data.sampler import ShardedSampler
from tada_dist.data.transforms import TEN_CROP_VIEWS, RandomCrops, TransformSpec

_DECODE_THREADS = min(8, os.cpu_count() or 1)


class DecodedDomain:
    """The pixels of every image of a domain after the transform's resize ([h, w, 3] uint8 each), or
    as decoded when training crops are RandomResizedCrop windows of the original image. When every
    image has the same size they are also one [n, h, w, 3] tensor, which batches index directly."""

    _shared: dict[tuple, DecodedDomain] = {}

    def __init__(self, files: list[str], transform: TransformSpec, *, resized: bool):
        self.resized = resized
        with ThreadPoolExecutor(_DECODE_THREADS) as pool:
            self.images = list(pool.map(lambda file: self._decode(file, transform), files))
        shapes = {image.shape for image in self.images}
        self.stacked = torch.from_numpy(np.stack(self.images)) if len(shapes) == 1 else None

    @classmethod
    def of(cls, domain: Domain, transform: TransformSpec, *, resized: bool) -> DecodedDomain:
        """The pixels of `domain`, decoded on first use and shared afterwards (train and eval loaders)."""
        key = (tuple(domain.files), transform.resize, transform.resize_mode, resized)
        if key not in cls._shared:
            cls._shared[key] = cls(domain.files, transform, resized=resized)
        return cls._shared[key]

    def _decode(self, file: str, transform: TransformSpec) -> np.ndarray:
        with Image.open(file) as image:
            pixels = F.pil_to_tensor(image.convert("RGB"))
        if self.resized:
            size = [transform.resize, transform.resize] if transform.resize_mode == "square" else [transform.resize]
            pixels = F.resize(pixels, size, antialias=True)
        return pixels.permute(1, 2, 0).numpy().copy()


def normalize(batch: torch.Tensor, transform: TransformSpec) -> torch.Tensor:
    """[b, h, w, 3] uint8 -> [b, 3, h, w] float32, normalised with the transform's mean and std."""
    # The permuted [b, 3, h, w] view of HWC pixels is already channels-last, and .float() keeps its strides.
    # Multiplied by 1/255 as torchvision's to_dtype does, then the mean and std, each in place: the same
    # float32 operations as the torch loader's, so the pixels equal its own bit for bit. One value for all
    # channels (digits: 0.5) is applied as a scalar, 3x faster than broadcasting over the channel dimension.
    uniform = len(set(transform.mean)) == 1 and len(set(transform.std)) == 1
    mean = transform.mean[0] if uniform else torch.tensor(transform.mean).view(1, 3, 1, 1)
    std = transform.std[0] if uniform else torch.tensor(transform.std).view(1, 3, 1, 1)
    images = batch.permute(0, 3, 1, 2).float()
    images.mul_(1.0 / 255).sub_(mean).div_(std)
    return images.contiguous(memory_format=torch.channels_last if transform.channels_last else torch.contiguous_format)


def cut(images: DecodedDomain, indices: list[int], xs, ys, size: int) -> torch.Tensor:
    """A size x size window of each image at fractions (x, y) of the room around it: [b, size, size, 3]."""
    if images.stacked is not None:
        height, width = images.stacked.shape[1:3]
        if height == width == size:  # no room to move (digits at 28x28): the images as they are
            return images.stacked.index_select(0, torch.as_tensor(indices))
        tops = torch.from_numpy(np.rint(np.asarray(ys) * (height - size)).astype(np.int64))
        lefts = torch.from_numpy(np.rint(np.asarray(xs) * (width - size)).astype(np.int64))
        offsets = torch.arange(size)
        rows = (tops[:, None] + offsets)[:, :, None]
        columns = (lefts[:, None] + offsets)[:, None, :]
        return images.stacked[torch.as_tensor(indices)[:, None, None], rows, columns]
    windows = []
    for index, x, y in zip(indices, xs, ys):
        image = images.images[index]
        top, left = round(y * (image.shape[0] - size)), round(x * (image.shape[1] - size))
        windows.append(torch.from_numpy(image[top:top + size, left:left + size]))
    return torch.stack(windows)


class MemoryTrainLoader(TrainLoader):
    def __init__(self, domain: Domain, sampler: ShardedSampler, transform: TransformSpec, *, device: str,
                 num_threads: int):
        super().__init__(sampler)
        self._labels = torch.tensor(domain.labels, dtype=torch.int64)
        self._transform = transform
        self._device = torch_device(device)
        self._images = DecodedDomain.of(domain, transform, resized=transform.train_crop == "random")

    def _produce_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        indices, key = self._sampler.draw()
        spec = self._transform
        crops = RandomCrops.draw(len(indices), flip=spec.flip, key=key, kind=spec.train_crop)
        if spec.train_crop == "random":
            batch = cut(self._images, indices, crops.x, crops.y, spec.crop)
        else:
            batch = torch.stack([self._resized_window(i, crops, n) for n, i in enumerate(indices)])
        if crops.flip.any():
            mirrored = torch.from_numpy(crops.flip.astype(bool))
            batch[mirrored] = batch[mirrored].flip(2)
        images = normalize(batch, spec).to(self._device, non_blocking=True)
        return images, self._labels[indices].to(self._device, non_blocking=True)

    def _resized_window(self, index: int, crops: RandomCrops, n: int) -> torch.Tensor:
        pixels = torch.from_numpy(self._images.images[index]).permute(2, 0, 1)
        rows, columns = pixels.shape[1:]
        window = F.resized_crop(pixels, round(float(crops.y[n]) * rows), round(float(crops.x[n]) * columns),
                                max(1, round(float(crops.height[n]) * rows)),
                                max(1, round(float(crops.width[n]) * columns)),
                                [self._transform.crop, self._transform.crop], antialias=True)
        return window.permute(1, 2, 0)

    def _restart(self) -> None:
        """Nothing is read ahead: the next batch is drawn when it is asked for."""


class MemoryEvalLoader(EvalLoader):
    def __init__(self, domain: Domain, transform: TransformSpec, *, batch_size: int, rank: int, world_size: int,
                 device: str, num_threads: int):
        super().__init__(domain, batch_size=batch_size, rank=rank, world_size=world_size)
        self._transform = transform
        self._device = torch_device(device)
        self._images = DecodedDomain.of(domain, transform, resized=True)
        self._indices = list(range(len(domain.files)))[rank::world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        spec = self._transform
        for start in range(0, len(self._indices), self.batch_size):
            indices = self._indices[start:start + self.batch_size]
            views = TEN_CROP_VIEWS if spec.ten_crop else ((0.5, 0.5, 0),)
            cuts = [cut(self._images, indices, [x] * len(indices), [y] * len(indices), spec.crop) for x, y, _ in views]
            cuts = [window.flip(2) if mirror else window for window, (_, _, mirror) in zip(cuts, views)]
            images = torch.stack([normalize(window, spec) for window in cuts], dim=1)  # [b, views, 3, s, s]
            labels = torch.tensor(self.labels[start:start + self.batch_size], dtype=torch.int64)
            yield (images if spec.ten_crop else images[:, 0]).to(self._device), labels.to(self._device)
