"""Evaluation: target accuracy counted once per image across ranks, the predictions behind it, and the
Evaluator that decides when the trainer evaluates. The `tada-eval` command is evaluate.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tada_dist.distributed import all_gather_objects, all_reduce_sum, average_batchnorm_statistics


@dataclass(frozen=True)
class Accuracy:
    correct: list[int]
    total: list[int]

    @property
    def overall(self) -> float:
        seen = sum(self.total)
        return 100.0 * sum(self.correct) / seen if seen else float("nan")

    @property
    def per_class(self) -> list[float]:
        return [100.0 * c / t if t else float("nan") for c, t in zip(self.correct, self.total)]

    @property
    def images(self) -> int:
        return sum(self.total)


@dataclass
class Predictions:
    """Every evaluated image of a domain, in a fixed order (rank by rank): class logits (with ten-crop,
    the log of the views' mean probability), bottleneck features G_b(h) and labels."""

    logits: torch.Tensor  # [n, classes] float32
    features: torch.Tensor  # [n, dim] float32
    labels: torch.Tensor  # [n] int64


@torch.no_grad()
def inspect_images(model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, features) of a batch: images [b, 3, S, S], or [b, V, 3, S, S] for V views of each image
    (ten-crop), whose softmax probabilities and features are averaged."""
    if images.dim() == 4:
        outputs = model.inspect(images)
        return outputs["logits"].float(), outputs["features"].float()
    batch, views = images.shape[:2]
    outputs = model.inspect(images.flatten(0, 1))
    probabilities = outputs["logits"].float().softmax(dim=1).view(batch, views, -1).mean(dim=1)
    return probabilities.log(), outputs["features"].float().view(batch, views, -1).mean(dim=1)


@torch.no_grad()
def evaluate(model, loader, num_classes: int, *, device: torch.device, dtype: torch.dtype,
             keep_predictions: bool = False) -> tuple[Accuracy, Predictions | None]:
    """Per-class correct/total over `loader`, summed over all ranks; with keep_predictions, every
    image's logits and features too, gathered from all ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64)
    total = torch.zeros(num_classes, dtype=torch.int64)
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for images, labels in loader:
        logits, features = inspect_images(model, images.to(device, dtype=dtype))
        logits, features, labels = logits.cpu(), features.cpu(), labels.cpu()
        predictions = logits.argmax(dim=1)
        total += torch.bincount(labels, minlength=num_classes)
        correct += torch.bincount(labels[predictions == labels], minlength=num_classes)
        if keep_predictions:
            kept.append((logits, features, labels))
    model.train(was_training)
    counts = all_reduce_sum(torch.stack([correct, total]))
    accuracy = Accuracy(correct=counts[0].tolist(), total=counts[1].tolist())
    if not keep_predictions:
        return accuracy, None
    ranks = all_gather_objects(kept)
    pieces = [piece for rank in ranks for piece in rank]
    if not pieces:
        return accuracy, None
    logits, features, labels = (torch.cat(column) for column in zip(*pieces))
    return accuracy, Predictions(logits=logits, features=features, labels=labels)


def evaluate_accuracy(model, loader, num_classes: int, *, device: torch.device, dtype: torch.dtype) -> Accuracy:
    """Per-class correct/total over this rank's share of `loader`, summed over all ranks."""
    return evaluate(model, loader, num_classes, device=device, dtype=dtype)[0]


class Evaluator:
    """When and how the trainer measures target accuracy: every `every` steps and at the last step.

    Each rank's BatchNorm statistics follow its own shard of the data, so they are averaged over
    ranks first: the accuracy is that of the model a checkpoint saves and `tada-eval` reloads. With
    keep_predictions, every target image's logits and features come back as well (for the
    label-free selection scores and the feature analysis)."""

    def __init__(self, loader, *, every: int, total_steps: int, num_classes: int, device: torch.device,
                 dtype: torch.dtype, keep_predictions: bool = False):
        self.loader = loader
        self.every = every
        self.total_steps = total_steps
        self.num_classes = num_classes
        self.device = device
        self.dtype = dtype
        self.keep_predictions = keep_predictions

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.total_steps

    def __call__(self, model) -> tuple[Accuracy, Predictions | None]:
        average_batchnorm_statistics(model)
        return evaluate(model, self.loader, self.num_classes, device=self.device, dtype=self.dtype,
                        keep_predictions=self.keep_predictions)
