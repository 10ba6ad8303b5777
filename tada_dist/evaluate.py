"""Target accuracy, counted once per image across ranks; and the `tada-eval` command.

    tada-eval --checkpoint OUTPUT_DIR [--domain PATH] [--batch-size N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tada_dist.cli import fail, setup_logging
from tada_dist.distributed import all_reduce_sum, average_batchnorm_statistics

PROG = "tada-eval"


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


@torch.no_grad()
def predict_classes(model, images: torch.Tensor) -> torch.Tensor:
    """Predicted class per image. images [b, 3, S, S], or [b, V, 3, S, S] for V views of each image
    (ten-crop), whose softmax probabilities are averaged before the argmax."""
    if images.dim() == 4:
        return model.predict(images).argmax(dim=1)
    batch, views = images.shape[:2]
    probabilities = model.predict(images.flatten(0, 1)).float().softmax(dim=1)
    return probabilities.view(batch, views, -1).mean(dim=1).argmax(dim=1)


@torch.no_grad()
def evaluate_accuracy(model, loader, num_classes: int, *, device: torch.device, dtype: torch.dtype) -> Accuracy:
    """Per-class correct/total over this rank's share of `loader`, summed over all ranks."""
    was_training = model.training
    model.eval()
    correct = torch.zeros(num_classes, dtype=torch.int64)
    total = torch.zeros(num_classes, dtype=torch.int64)
    for images, labels in loader:
        predictions = predict_classes(model, images.to(device, dtype=dtype)).cpu()
        labels = labels.cpu()
        total += torch.bincount(labels, minlength=num_classes)
        correct += torch.bincount(labels[predictions == labels], minlength=num_classes)
    model.train(was_training)
    counts = all_reduce_sum(torch.stack([correct, total]))
    return Accuracy(correct=counts[0].tolist(), total=counts[1].tolist())


class Evaluator:
    """When and how the trainer measures target accuracy: every `every` steps and at the last step.

    Each rank's BatchNorm statistics follow its own shard of the data, so they are averaged over
    ranks first: the accuracy is that of the model a checkpoint saves and `tada-eval` reloads."""

    def __init__(self, loader, *, every: int, total_steps: int, num_classes: int, device: torch.device,
                 dtype: torch.dtype):
        self.loader = loader
        self.every = every
        self.total_steps = total_steps
        self.num_classes = num_classes
        self.device = device
        self.dtype = dtype

    def due(self, step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == self.total_steps

    def __call__(self, model) -> Accuracy:
        average_batchnorm_statistics(model)
        return evaluate_accuracy(model, self.loader, self.num_classes, device=self.device, dtype=self.dtype)


def format_report(accuracy: Accuracy, classes: list[str], domain_name: str) -> str:
    width = max(len(name) for name in classes)
    lines = [f"{domain_name}: accuracy {accuracy.overall:.2f}% over {accuracy.images} images"]
    for name, acc, total in zip(classes, accuracy.per_class, accuracy.total):
        lines.append(f"  {name:<{width}}  {acc:6.2f}%  ({total} images)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate a trained TADA run on a domain.")
    parser.add_argument("--checkpoint", required=True, help="a training output directory (holding config.yaml)")
    parser.add_argument("--domain", help="an ImageFolder directory or image-list file (default: the run's target)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's)")
    parser.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                        help="average the predictions of ten crops per image (default: the run's data.eval_ten_crop)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, alone on stdout")
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's start-up messages")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["TADA_DIST_VERBOSE"] = "1"
    setup_logging(PROG)

    from tada_dist import checkpoint
    from tada_dist.build import create_evaluation_loader, model_from_config, resolve_domains
    from tada_dist.config import ConfigError, load_saved_config
    from tada_dist.data import DataError, load_domain
    from tada_dist.distributed import init_distributed
    from tada_dist.model import ModelError

    output_dir = Path(args.checkpoint)
    config_file = output_dir / "config.yaml"
    if not config_file.is_file():
        return fail(PROG, f"{output_dir} is not a training output directory (missing config.yaml)")
    try:
        config = load_saved_config(config_file)
        weights, step = checkpoint.load_module_weights(output_dir)
        dist_info = init_distributed(config.distributed.backend)
        source, target = resolve_domains(config, dist_info)
        domain = load_domain(args.domain, classes=source.classes) if args.domain else target
        model = model_from_config(config, len(source.classes), load_pretrained=False)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
        return fail(PROG, err)

    model.load_state_dict(weights)
    model.to(dist_info.device)
    loader = create_evaluation_loader(config, domain, dist_info, batch_size=args.batch_size, ten_crop=args.ten_crop)
    accuracy = evaluate_accuracy(model, loader, len(source.classes), device=dist_info.device, dtype=torch.float32)
    if dist_info.is_main:
        if args.json:
            print(json.dumps({"domain": domain.name, "step": step, "accuracy": accuracy.overall,
                              "per_class": dict(zip(source.classes, accuracy.per_class)),
                              "images": accuracy.images}))
        else:
            print(f"checkpoint step {step}")
            print(format_report(accuracy, source.classes, domain.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
