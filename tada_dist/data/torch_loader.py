"""The torchvision fallback loaders: PIL decoding and torchvision.transforms.v2, in a torch DataLoader.

Same batches, positions and outputs as the DALI loaders; `num_threads` is the number of DataLoader
worker processes (0 loads in the training process).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as F

from tada_dist.data.domain import Domain
from tada_dist.data.loader import EvalLoader, TrainLoader, torch_device
from tada_dist.data.sampler import LookaheadSampler, ShardedSampler
from tada_dist.data.transforms import TEN_CROP_VIEWS, RandomCrops, TransformSpec


# One training image's crop: (x, y, width, height, flip), as in RandomCrops.
Crop = tuple[float, float, float, float, int]


def transform_image(image: Image.Image, spec: TransformSpec, crop: Crop | None) -> torch.Tensor:
    """TransformSpec on a PIL image: `crop` places the training crop; None is evaluation (the centre
    crop, or with spec.ten_crop the ten views stacked as [10, 3, crop, crop])."""
    pixels = F.pil_to_tensor(image.convert("RGB"))
    if crop is not None and spec.train_crop == "random_resized":
        x, y, width, height, flip = crop
        rows, columns = pixels.shape[-2:]
        pixels = F.resized_crop(pixels, round(y * rows), round(x * columns), max(1, round(height * rows)),
                                max(1, round(width * columns)), [spec.crop, spec.crop], antialias=True)
        return _normalize(F.horizontal_flip(pixels) if flip else pixels, spec)
    size = [spec.resize, spec.resize] if spec.resize_mode == "square" else [spec.resize]
    pixels = F.resize(pixels, size, antialias=True)
    if crop is not None:
        return _normalize(_place_crop(pixels, spec.crop, crop[0], crop[1], crop[4]), spec)
    if spec.ten_crop:
        return torch.stack([_normalize(_place_crop(pixels, spec.crop, x, y, m), spec) for x, y, m in TEN_CROP_VIEWS])
    return _normalize(F.center_crop(pixels, [spec.crop, spec.crop]), spec)


def memory_format(images: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    """A batch [b, 3, s, s] in channels-last memory format when the transform asks for it."""
    return images.contiguous(memory_format=torch.channels_last) if spec.channels_last and images.dim() == 4 else images


def _place_crop(pixels: torch.Tensor, size: int, x: float, y: float, flip: int) -> torch.Tensor:
    """A size x size crop at fractions (x, y) of the room left around it (DALI's crop_pos_x/y)."""
    height, width = pixels.shape[-2:]
    pixels = F.crop(pixels, round(y * (height - size)), round(x * (width - size)), size, size)
    return F.horizontal_flip(pixels) if flip else pixels


def _normalize(pixels: torch.Tensor, spec: TransformSpec) -> torch.Tensor:
    return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), list(spec.mean), list(spec.std))


class ImageDataset(Dataset):
    """Items are an index (centre crop) or an (index, crop) pair from SamplerBatches."""

    def __init__(self, files: list[str], labels: list[int], spec: TransformSpec):
        self.files = files
        self.labels = labels
        self.spec = spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, Crop]) -> tuple[torch.Tensor, int]:
        index, crop = item if isinstance(item, tuple) else (item, None)
        with Image.open(self.files[index]) as image:
            return transform_image(image, self.spec, crop), self.labels[index]


class TorchTrainLoader(TrainLoader):
    def __init__(self, domain: Domain, sampler: ShardedSampler, transform: TransformSpec, *, device: str,
                 num_threads: int):
        super().__init__(sampler)
        self._domain = domain
        self._transform = transform
        self._device = torch_device(device)
        self._num_workers = num_threads
        self._restart()

    def _produce_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = next(self._batches)
        return memory_format(images, self._transform).to(self._device, non_blocking=True), \
            labels.to(self._device, non_blocking=True)

    def _restart(self) -> None:
        # A new DataLoader iterator drops what the workers prefetched.
        dataset = ImageDataset(self._domain.files, self._domain.labels, self._transform)
        loader = DataLoader(
            dataset, batch_sampler=SamplerBatches(self._sampler, self._transform),
            num_workers=self._num_workers, pin_memory=self._device.type == "cuda",
        )
        self._batches = iter(loader)


class SamplerBatches:
    """The DataLoader's batch sampler: endless batches drawn from the loader's lookahead sampler, each
    index paired with its crop, so that workers hold no random state of their own."""

    def __init__(self, sampler: LookaheadSampler, transform: TransformSpec):
        self._sampler = sampler
        self._flip = transform.flip
        self._kind = transform.train_crop

    def __iter__(self) -> Iterator[list[tuple[int, Crop]]]:
        while True:
            indices, key = self._sampler.draw()
            c = RandomCrops.draw(len(indices), flip=self._flip, key=key, kind=self._kind)
            yield [(index, (float(c.x[i]), float(c.y[i]), float(c.width[i]), float(c.height[i]), int(c.flip[i])))
                   for i, index in enumerate(indices)]


class TorchEvalLoader(EvalLoader):
    def __init__(self, domain: Domain, transform: TransformSpec, *, batch_size: int, rank: int, world_size: int,
                 device: str, num_threads: int):
        super().__init__(domain, batch_size=batch_size, rank=rank, world_size=world_size)
        self._transform = transform
        self._device = torch_device(device)
        self._loader = DataLoader(
            ImageDataset(self.files, self.labels, transform), batch_size=batch_size,
            shuffle=False, num_workers=num_threads, pin_memory=self._device.type == "cuda",
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._loader:
            yield memory_format(images, self._transform).to(self._device, non_blocking=True), \
                labels.to(self._device, non_blocking=True)
