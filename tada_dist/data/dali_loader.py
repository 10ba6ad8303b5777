"""NVIDIA DALI loaders: images are decoded, resized, cropped and normalized inside a DALI pipeline.

The pipeline's input is an external source that this module feeds with the encoded file bytes of
the batches our own sampler picks, rather than a DALI reader, so that the training position is ours
to save and restore exactly.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import feed_ndarray
from nvidia.dali.tensors import TensorListCPU, TensorListGPU

from tada_dist.data.domain import Domain
from tada_dist.data.loader import EvalLoader, TrainLoader, torch_device
from tada_dist.data.sampler import LookaheadSampler, ShardedSampler
from tada_dist.data.transforms import TEN_CROP_VIEWS, RandomCrops, TransformSpec

# Batches DALI prepares ahead of the one being consumed: enough to overlap decoding with a training
# step, few enough to keep memory small.
_PREFETCH_DEPTH = 2
# Batches whose files are read ahead of the ones DALI has asked for.
_READ_AHEAD = 1

EncodedBatch = tuple[list[np.ndarray], list[np.ndarray]]
# Encoded batch plus where every image is cropped and whether it is mirrored: crop x and crop y
# ([n] each, "random" crops), or the window's (y, x) start and end ([n, 2] each, "random_resized").
AugmentedBatch = tuple[list[np.ndarray], list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]


class DaliTrainLoader(TrainLoader):
    def __init__(self, domain: Domain, sampler: ShardedSampler, transform: TransformSpec, *, device: str,
                 num_threads: int):
        super().__init__(sampler)
        self._domain = domain
        self._batch_size = sampler.batch_size
        self._transform = transform
        self._device = device
        self._num_threads = num_threads
        self._restart()

    def _produce_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self._pipeline.run()
        return _images(images, self._transform, self._device), _to_torch(labels, torch.int64, self._device)

    def _restart(self) -> None:
        # A fresh pipeline is the only way to drop DALI's prefetched batches.
        self._pipeline = None  # frees the old pipeline's threads and buffers before the new one allocates
        self._pipeline = _build_pipeline(
            SampledBatchReader(self._domain, self._sampler, self._transform), batch_info=False,
            batch_size=self._batch_size, transform=self._transform, train=True, device=self._device,
            num_threads=self._num_threads,
        )


class SampledBatchReader:
    """The train pipeline's external source. DALI calls it up to the prefetch depth ahead of next(),
    from the thread that calls run(), that is the training loop's; the lookahead sampler keeps track.

    The encoded bytes of the next batches are read by a thread of the reader's own while the training
    step runs, so that the loop's thread only hands them over (with 64 digit files per batch and a 5 ms
    step, next() waited 1.5 ms when they were read inside the call, 0.8 ms now). Draws happen in the
    caller's thread, in order, so each batch keeps its key and a resumed run its batches. The reader
    holds no reference to the loader, so that dropping a loader frees its pipeline (and the pipeline's
    threads) at once instead of at the next garbage collection; its read thread ends with it."""

    def __init__(self, domain: Domain, sampler: LookaheadSampler, transform: TransformSpec):
        self._domain = domain
        self._sampler = sampler
        self._flip = transform.flip
        self._kind = transform.train_crop
        self._reads: deque[tuple[list[int], tuple[int, ...], Future[EncodedBatch]]] = deque()
        self._read_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tada-dali-read")

    def _read_next(self) -> None:
        indices, key = self._sampler.draw()
        reading = self._read_thread.submit(_encoded_batch, self._domain.files, self._domain.labels, indices)
        self._reads.append((indices, key, reading))

    def __call__(self) -> AugmentedBatch:
        while len(self._reads) < 1 + _READ_AHEAD:  # the next batches' files load while the step runs
            self._read_next()
        indices, key, reading = self._reads.popleft()
        encoded, labels = reading.result()
        crops = RandomCrops.draw(len(indices), flip=self._flip, key=key, kind=self._kind)
        if self._kind == "random":
            return encoded, labels, crops.x, crops.y, crops.flip  # an [n] array is a batch of n scalars to DALI
        start = np.stack([crops.y, crops.x], axis=1)  # DALI's ROI coordinates follow the shape order (H, W)
        return encoded, labels, start, start + np.stack([crops.height, crops.width], axis=1), crops.flip


class DaliEvalLoader(EvalLoader):
    def __init__(self, domain: Domain, transform: TransformSpec, *, batch_size: int, rank: int, world_size: int,
                 device: str, num_threads: int):
        super().__init__(domain, batch_size=batch_size, rank=rank, world_size=world_size)
        self._transform = transform
        self._device = device
        self._num_threads = num_threads

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.files:
            return
        # One pipeline per pass: a pass abandoned half-way leaves nothing behind for the next one.
        pipeline = _build_pipeline(
            self._read_batch, batch_info=True, batch_size=self.batch_size, transform=self._transform, train=False,
            device=self._device, num_threads=self._num_threads,
        )
        while True:
            try:
                images, labels = pipeline.run()
            except StopIteration:
                return
            yield _images(images, self._transform, self._device), _to_torch(labels, torch.int64, self._device)

    def _read_batch(self, batch_info: types.BatchInfo) -> EncodedBatch:
        start = batch_info.iteration * self.batch_size
        if start >= len(self.files):
            raise StopIteration  # the pass is over; the last batch may have been partial
        positions = range(start, min(start + self.batch_size, len(self.files)))
        return _encoded_batch(self.files, self.labels, positions)


def _encoded_batch(files: list[str], labels: list[int], positions: Sequence[int]) -> EncodedBatch:
    return (
        [np.fromfile(files[i], dtype=np.uint8) for i in positions],
        [np.array(labels[i], dtype=np.int64) for i in positions],
    )


def _build_pipeline(source: Callable, *, batch_info: bool, batch_size: int, transform: TransformSpec, train: bool,
                    device: str, num_threads: int) -> Pipeline:
    """external source (bytes, label[, crop placement, flip]) -> decode RGB -> resize -> crop (+ flip)
    -> normalize, CHW; ten evaluation views stacked as [10, 3, crop, crop] with `transform.ten_crop`.
    Training crops come from the source, not from DALI's random ops, whose state cannot be saved in a
    checkpoint. A "random_resized" window is cut from the decoded image and resized to the crop in
    one step: the square resize before it only rescales, so the window's relative place is the same."""
    on_gpu = device == "gpu"
    pipeline = Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=torch.cuda.current_device() if on_gpu else None,
        prefetch_queue_depth=_PREFETCH_DEPTH,
    )
    normalize = dict(mean=[255.0 * m for m in transform.mean], std=[255.0 * s for s in transform.std],
                     dtype=types.FLOAT, output_layout="HWC" if transform.channels_last else "CHW")
    with pipeline:
        if train:
            encoded, labels, placement_a, placement_b, mirror = fn.external_source(
                source=source, num_outputs=5, batch=True, batch_info=batch_info,
                dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.INT32],
            )
        else:
            encoded, labels = fn.external_source(
                source=source, num_outputs=2, batch=True, batch_info=batch_info, dtype=[types.UINT8, types.INT64],
            )
        images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
        if train and transform.train_crop == "random_resized":
            images = fn.resize(images, size=[transform.crop, transform.crop], roi_start=placement_a,
                               roi_end=placement_b, roi_relative=True)
            images = fn.crop_mirror_normalize(images, mirror=mirror, **normalize)
        else:
            if transform.resize_mode == "square":
                images = fn.resize(images, size=[transform.resize, transform.resize])
            else:
                images = fn.resize(images, resize_shorter=transform.resize)
            crop = (transform.crop, transform.crop)
            if train:
                images = fn.crop_mirror_normalize(images, crop=crop, crop_pos_x=placement_a, crop_pos_y=placement_b,
                                                  mirror=mirror, **normalize)
            elif transform.ten_crop:
                images = fn.stack(*[
                    fn.crop_mirror_normalize(images, crop=crop, crop_pos_x=x, crop_pos_y=y, mirror=m, **normalize)
                    for x, y, m in TEN_CROP_VIEWS
                ])
            else:
                images = fn.crop_mirror_normalize(images, crop=crop, crop_pos_x=0.5, crop_pos_y=0.5, **normalize)
        pipeline.set_outputs(images, labels)
    pipeline.build()
    return pipeline


def _images(batch: TensorListCPU | TensorListGPU, transform: TransformSpec, device: str) -> torch.Tensor:
    """A batch of images as [b, 3, s, s] (or [b, views, 3, s, s]); with transform.channels_last DALI wrote
    them HWC, which the permute turns into a channels-last view without a copy."""
    images = _to_torch(batch, torch.float32, device)
    if transform.channels_last:
        images = images.movedim(-1, -3)
    return images


def _to_torch(batch: TensorListCPU | TensorListGPU, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Copies a DALI batch into a new torch tensor (DALI reuses its output buffers on the next run()).
    Labels come out of DALI on the CPU even in GPU mode, so they are moved afterwards."""
    dense = batch.as_tensor()
    on_gpu = isinstance(batch, TensorListGPU)
    tensor = torch.empty(dense.shape(), dtype=dtype, device=torch_device("gpu") if on_gpu else torch.device("cpu"))
    feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream() if on_gpu else None)
    return tensor.to(torch_device(device), non_blocking=True)
