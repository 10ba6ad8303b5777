"""The training loop a user would write instead of tada-train, for the pipeline benchmark.

    python bench/plain_loop.py --config configs/digits/mnist_to_mnistm.yaml --data ImageFolder ...
    torchrun --nproc_per_node=2 bench/plain_loop.py ...          (DistributedDataParallel on gloo)

The same model (tada_dist's, built from the same config) and the same loss (eq. 9), trained with a
plain torch.optim.SGD and no DeepSpeed, MLflow or checkpoints. Data, as --data says:

    dataloader  torchvision ImageFolder + DataLoader with 2 workers and the same transforms (resize,
                random crop, normalise), the way thuml/tllib's examples read their datasets
    memory      every image decoded and normalised once, batches indexed from tensors in memory, model
                in the channels-last memory format tada-train feeds: the bound any loader can only
                approach

Prints one JSON line on rank 0: images per second over the timed steps (after --warmup steps).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler
from torchvision import datasets, transforms

from tada_dist.build import model_from_config, seed_everything
from tada_dist.config import build_config
from tada_dist.host_memory import retain_freed_memory
from tada_dist.losses import LossWeights, tada_objective
from tada_dist.model import method_parts
from tada_dist.schedules import grl_schedule, progress


def image_folder(root: str, config, *, train: bool) -> datasets.ImageFolder:
    data = config.data
    steps = [transforms.Lambda(lambda image: image.convert("RGB")), transforms.Resize(data.resize)]
    steps.append(transforms.RandomCrop(data.crop) if train else transforms.CenterCrop(data.crop))
    steps += [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
    return datasets.ImageFolder(root, transform=transforms.Compose(steps))


def dataloader_batches(dataset, batch_size: int, world_size: int, rank: int, seed: int):
    """Endless batches from a DataLoader (a new epoch when one ends), sharded like DistributedSampler does."""
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=2, drop_last=True,
                        persistent_workers=True)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def memory_batches(dataset, batch_size: int, world_size: int, rank: int, seed: int):
    images, labels = zip(*(dataset[i] for i in range(rank, len(dataset), world_size)))
    images, labels = torch.stack(images), torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed + rank)
    while True:
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield images[index], labels[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", choices=("dataloader", "memory"), required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--retain-host-memory", action="store_true",
                        help="keep freed host memory in the process, as tada-train does (train.retain_host_memory)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    if args.retain_host_memory:
        retain_freed_memory()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        dist.init_process_group("gloo")
    config = build_config(args.config, args.overrides, world_size=world_size)
    seed_everything(config.seed)
    source = image_folder(os.path.join(config.data.root, config.data.source), config, train=True)
    target = image_folder(os.path.join(config.data.root, config.data.target), config, train=True)
    batches = dataloader_batches if args.data == "dataloader" else memory_batches
    source_batches = batches(source, config.data.batch_size, world_size, rank, config.seed)
    target_batches = batches(target, config.data.batch_size, world_size, rank, config.seed + 1)

    model = model_from_config(config, len(source.classes))
    # The bound feeds channels-last batches as tada-train does; the DataLoader loop keeps PyTorch's
    # default layout, as the loops users copy from tllib's examples do.
    memory_format = torch.channels_last if args.data == "memory" else torch.contiguous_format
    optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.lr, momentum=config.optim.momentum,
                                weight_decay=config.optim.weight_decay, nesterov=config.optim.nesterov)
    trained = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    adapts = method_parts(config.method).adapts
    weights = LossWeights(config.loss.adaptation_weight, config.loss.entropy_weight)
    images_per_step = config.data.batch_size * world_size * (2 if adapts else 1)

    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        model.set_grl_coeff(grl_schedule(progress(step, config.train.steps)))
        source_images, source_labels = next(source_batches)
        target_images = next(target_batches)[0].contiguous(memory_format=memory_format) if adapts else None
        outputs = trained(source_images.contiguous(memory_format=memory_format), target_images)
        loss, _ = tada_objective(outputs, source_labels, weights, method=config.method,
                                 entropy_unit=config.model.entropy_unit)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    if rank == 0:
        print(json.dumps({"data": args.data, "processes": world_size, "steps": args.steps,
                          "images_per_sec": images_per_step * args.steps / seconds}))
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
