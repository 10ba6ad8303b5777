"""The `tada-eval` command: a trained run's accuracy on a domain, its attention maps and feature analysis.

    tada-eval --checkpoint OUTPUT_DIR [--domain PATH] [--attention N] [--features] [--json]
    tada-eval --model runs:/<run id>/model [--tracking-uri URI] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from tada_dist.cli import fail, setup_logging
from tada_dist.evaluation import Accuracy, evaluate

PROG = "tada-eval"


def format_report(accuracy: Accuracy, classes: list[str], domain_name: str) -> str:
    width = max(len(name) for name in classes)
    lines = [f"{domain_name}: accuracy {accuracy.overall:.2f}% over {accuracy.images} images"]
    for name, acc, total in zip(classes, accuracy.per_class, accuracy.total):
        lines.append(f"  {name:<{width}}  {acc:6.2f}%  ({total} images)")
    return "\n".join(lines)


def load_trained(args, num_classes_of) -> tuple:
    """(config, model, step, where) from --checkpoint DIR or --model URI (an MLflow model of a run).
    num_classes_of(config) gives the class count a checkpoint's model is rebuilt with."""
    from tada_dist import checkpoint
    from tada_dist.build import model_from_config
    from tada_dist.config import load_saved_config

    if args.model:
        import mlflow

        if args.tracking_uri:
            mlflow.set_tracking_uri(args.tracking_uri)
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=args.model))
        except Exception as error:  # MLflow raises its own exceptions for unknown runs, models and versions
            raise FileNotFoundError(f"cannot load MLflow model {args.model} ({str(error).splitlines()[0]}); "
                                    "is --tracking-uri (or MLFLOW_TRACKING_URI) the store it was logged to?") from None
        config = load_saved_config(local / "extra_files" / "config.yaml")
        model = mlflow.pytorch.load_model(str(local), map_location="cpu")
        return config, model, None, args.model
    output_dir = Path(args.checkpoint)
    config_file = output_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{output_dir} is not a training output directory (missing config.yaml)")
    config = load_saved_config(config_file)
    weights, step = checkpoint.load_module_weights(output_dir)
    model = model_from_config(config, num_classes_of(config), load_pretrained=False)
    model.load_state_dict(weights)
    return config, model, step, f"checkpoint step {step}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate a trained TADA run on a domain.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a training output directory (holding config.yaml)")
    source.add_argument("--model", help="an MLflow model: runs:/<run id>/model or models:/<name>/<version>")
    parser.add_argument("--tracking-uri", help="the MLflow store of --model (default: MLFLOW_TRACKING_URI)")
    parser.add_argument("--domain", help="an ImageFolder directory or image-list file (default: the run's target)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: the run's)")
    parser.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=None,
                        help="average the predictions of ten crops per image (default: the run's data.eval_ten_crop)")
    parser.add_argument("--attention", type=int, metavar="N", default=0,
                        help="draw the attention maps of N source and N target images (local attention only)")
    parser.add_argument("--features", action="store_true",
                        help="t-SNE of source and target features, and the proxy A-distance")
    parser.add_argument("--out", help="folder for the pictures and tables (default: <checkpoint>/analysis, or "
                                      "./analysis with --model)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line, alone on stdout")
    parser.add_argument("--verbose", action="store_true", help="show DeepSpeed's start-up messages")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["TADA_DIST_VERBOSE"] = "1"
    setup_logging(PROG)

    from tada_dist import analysis
    from tada_dist.build import create_evaluation_loader, resolve_domains, transform_from_config
    from tada_dist.config import ConfigError
    from tada_dist.data import DataError, create_eval_loader, load_domain
    from tada_dist.distributed import init_distributed
    from tada_dist.model import ModelError, method_parts

    domains = {}

    def classes_of(config) -> int:
        domains["dist_info"] = init_distributed(config.distributed.backend)
        domains["source"], domains["target"] = resolve_domains(config, domains["dist_info"])
        return len(domains["source"].classes)

    try:
        config, model, step, where = load_trained(args, classes_of)
        if not domains:
            classes_of(config)
        dist_info, source, target = domains["dist_info"], domains["source"], domains["target"]
        domain = load_domain(args.domain, classes=source.classes) if args.domain else target
        if args.attention and not method_parts(config.method).local_attention:
            raise ConfigError(f"--attention draws local attention, which method {config.method!r} does not have")
    except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
        return fail(PROG, err)

    model.to(dist_info.device).eval()
    classes = source.classes
    loader = create_evaluation_loader(config, domain, dist_info, batch_size=args.batch_size, ten_crop=args.ten_crop)
    accuracy, predictions = evaluate(model, loader, len(classes), device=dist_info.device, dtype=torch.float32,
                                     keep_predictions=args.features)
    result = {"domain": domain.name, "step": step, "accuracy": accuracy.overall,
              "per_class": dict(zip(classes, accuracy.per_class)), "images": accuracy.images}
    out = Path(args.out) if args.out else (Path(args.checkpoint) / "analysis" if args.checkpoint else Path("analysis"))
    if args.features:
        source_loader = create_evaluation_loader(config, source, dist_info, batch_size=args.batch_size, ten_crop=False)
        _, source_predictions = evaluate(model, source_loader, len(classes), device=dist_info.device,
                                         dtype=torch.float32, keep_predictions=True)
        if dist_info.is_main:
            result["a_distance"] = analysis.proxy_a_distance(source_predictions.features, predictions.features)
            result["tsne"] = str(analysis.draw_tsne(
                source_predictions.features, source_predictions.labels, predictions.features, predictions.labels,
                classes, title=f"{config.method}: {source.name} -> {domain.name}", path=out / "tsne.png"))
    if args.attention and dist_info.is_main:
        transform = transform_from_config(config, ten_crop=False)
        result["attention"] = []
        for role, shown in (("source", source), ("target", domain)):
            chosen = analysis.subset(shown, analysis.shown_images(shown, args.attention))
            images, labels = next(iter(create_eval_loader(chosen, batch_size=len(chosen.files), transform=transform,
                                                          rank=0, world_size=1, backend=config.data.loader,
                                                          device="cpu", num_threads=1)))
            path = analysis.draw_attention(model, images.to(dist_info.device), labels, classes,
                                           mean=tuple(config.data.mean), std=tuple(config.data.std),
                                           title=f"{config.method}: {role} {shown.name} ({where})",
                                           path=out / f"attention_{role}.png")
            result["attention"].append(str(path))
    if dist_info.is_main:
        if args.json:
            print(json.dumps(result))
        else:
            print(where)
            print(format_report(accuracy, classes, domain.name))
            if "a_distance" in result:
                print(f"proxy A-distance: {result['a_distance']:.3f} (0: domains indistinguishable, 2: separable)")
            for key in ("tsne", "attention"):
                if key in result:
                    print(f"{key}: {result[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
