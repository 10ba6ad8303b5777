"""The textbook digits recipe in plain PyTorch: the reference the project's digits numbers are held to.

    python bench/digits_textbook.py --data-root data/digits --method dann --steps 10000 --seed 0

Ganin & Lempitsky (ICML 2015) / Ganin et al. (JMLR 2016) for MNIST -> MNIST-M: conv 5x5 32 -> maxpool
-> conv 5x5 48 -> maxpool -> 768 features; label predictor FC 100 -> FC 100 -> 10; domain classifier
FC 100 -> 1 on the 768 features behind a gradient reversal layer; no BatchNorm; both domains at
28x28, normalised with mean 0.5 and std 0.5; batch 64 source + 64 target; SGD lr 0.01, momentum 0.9,
one learning rate for every layer, lr_p = lr (1 + 10 p)^-0.75 and GRL coefficient
2 / (1 + exp(-10 p)) - 1 with p the training progress. Nothing here comes from tada_dist: it is what a
user would write instead, decoded once into memory with torchvision's ImageFolder. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from torch import nn
from torchvision import datasets, transforms


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coeff):
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coeff * grad, None


class DigitsDANN(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(32, 48, 5), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(768, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                                        nn.Linear(100, classes))
        self.domain = nn.Sequential(nn.Linear(768, 100), nn.ReLU(), nn.Linear(100, 1))

    def forward(self, x, grl_coeff: float = 0.0):
        features = self.features(x)
        return self.classifier(features), self.domain(GradientReversal.apply(features, grl_coeff)).squeeze(1)


def load(folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    transform = transforms.Compose([
        transforms.Lambda(lambda image: image.convert("RGB")), transforms.Resize((28, 28)), transforms.ToTensor(),
        transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ])
    dataset = datasets.ImageFolder(folder, transform=transform)
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def batches(count: int, batch_size: int, generator: torch.Generator):
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count - batch_size + 1, batch_size):
            yield order[start:start + batch_size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--source", default="mnist")
    parser.add_argument("--target", default="mnist_m")
    parser.add_argument("--method", choices=("source_only", "dann"), default="dann")
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    started = time.perf_counter()
    source_x, source_y = load(f"{args.data_root}/{args.source}")
    target_x, target_y = load(f"{args.data_root}/{args.target}")
    model = DigitsDANN(classes=int(source_y.max()) + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 + 10 * step / args.steps) ** -0.75)
    generator = torch.Generator().manual_seed(args.seed)
    source_batches = batches(len(source_x), args.batch_size, generator)
    target_batches = batches(len(target_x), args.batch_size, generator)
    bce, cross_entropy = nn.BCEWithLogitsLoss(), nn.CrossEntropyLoss()
    train_started = time.perf_counter()
    for step in range(args.steps):
        grl_coeff = 2 / (1 + math.exp(-10 * step / args.steps)) - 1
        s = next(source_batches)
        if args.method == "dann":
            t = next(target_batches)
            class_logits, domain_logits = model(torch.cat([source_x[s], target_x[t]]), grl_coeff)
            domain_labels = torch.cat([torch.ones(len(s)), torch.zeros(len(t))])
            loss = cross_entropy(class_logits[:len(s)], source_y[s]) + bce(domain_logits, domain_labels)
        else:
            loss = cross_entropy(model(source_x[s])[0], source_y[s])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    train_seconds = time.perf_counter() - train_started
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk)[0].argmax(1) for chunk in target_x.split(1000)])
    accuracy = 100.0 * (predictions == target_y).float().mean().item()
    print(json.dumps({"method": args.method, "seed": args.seed, "steps": args.steps, "target_acc": accuracy,
                      "images_per_sec": args.steps * args.batch_size * (2 if args.method == "dann" else 1) / train_seconds,
                      "wall_seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
