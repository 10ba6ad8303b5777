"""The torchvision fallback loaders: PIL decoding and torchvision.transforms.v2, in a torch DataLoader.

Same batches, positions and outputs as the DALI loaders; `num_threads` is the number of DataLoader
worker processes (0 loads in the training process).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info
from torchvision.transforms.v2 import functional as F

from tada_dist.data.domain import Domain
from tada_dist.data.loader import EvalLoader, TrainLoader, torch_device
from tada_dist.data.sampler import LookaheadSampler, ShardedSampler
from tada_dist.data.transforms import TransformSpec


class ImageTransform:
    """TransformSpec on a PIL image. Training randomness comes from a private generator, so the loader
    never draws from (or disturbs) the global torch RNG that seeds model weights and dropout."""

    def __init__(self, spec: TransformSpec, *, train: bool, seed: int = 0):
        self.spec = spec
        self.train = train
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        spec = self.spec
        pixels = F.resize(F.pil_to_tensor(image.convert("RGB")), [spec.resize], antialias=True)
        if self.train:
            height, width = pixels.shape[-2:]
            top = int(torch.randint(height - spec.crop + 1, (1,), generator=self.generator))
            left = int(torch.randint(width - spec.crop + 1, (1,), generator=self.generator))
            pixels = F.crop(pixels, top, left, spec.crop, spec.crop)
            if spec.flip and bool(torch.rand((), generator=self.generator) < 0.5):
                pixels = F.horizontal_flip(pixels)
        else:
            pixels = F.center_crop(pixels, [spec.crop, spec.crop])
        return F.normalize(F.to_dtype(pixels, torch.float32, scale=True), list(spec.mean), list(spec.std))


class ImageDataset(Dataset):
    def __init__(self, files: list[str], labels: list[int], transform: ImageTransform):
        self.files = files
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.files[index]) as image:
            return self.transform(image), self.labels[index]


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
        return images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)

    def _restart(self) -> None:
        # A new DataLoader iterator drops what the workers prefetched; seeding both the in-process
        # transform and the workers' base seed from the position keeps augmentation reproducible.
        seed = self._augmentation_seed()
        transform = ImageTransform(self._transform, train=True, seed=seed)
        dataset = ImageDataset(self._domain.files, self._domain.labels, transform)
        loader = DataLoader(
            dataset, batch_sampler=SamplerBatches(self._sampler), num_workers=self._num_workers,
            worker_init_fn=_seed_worker_transform, generator=torch.Generator().manual_seed(seed),
            pin_memory=self._device.type == "cuda",
        )
        self._batches = iter(loader)


class SamplerBatches:
    """The DataLoader's batch sampler: endless batches drawn from the loader's lookahead sampler."""

    def __init__(self, sampler: LookaheadSampler):
        self._sampler = sampler

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self._sampler.draw()


def _seed_worker_transform(worker_id: int) -> None:
    """Each worker gets its own augmentation stream, derived from the DataLoader's seeded generator."""
    info = get_worker_info()
    info.dataset.transform.generator.manual_seed(info.seed)


class TorchEvalLoader(EvalLoader):
    def __init__(self, domain: Domain, transform: TransformSpec, *, batch_size: int, rank: int, world_size: int,
                 device: str, num_threads: int):
        super().__init__(domain, batch_size=batch_size, rank=rank, world_size=world_size)
        self._device = torch_device(device)
        self._loader = DataLoader(
            ImageDataset(self.files, self.labels, ImageTransform(transform, train=False)), batch_size=batch_size,
            shuffle=False, num_workers=num_threads, pin_memory=self._device.type == "cuda",
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self._loader:
            yield images.to(self._device, non_blocking=True), labels.to(self._device, non_blocking=True)
