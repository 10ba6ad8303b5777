"""What a run learned, as pictures and numbers beside its accuracy.

- attention maps (the paper's Fig. 3): for a fixed set of source and target images, the local
  attention w of every region upsampled to the image and laid over it, and the region
  discriminators' entropy, drawn at each evaluation;
- t-SNE of the bottleneck features coloured by domain and by class (Fig. 2), and the proxy A-distance
  2 (1 - 2 err) of a linear domain classifier on held-out features (Ben-David et al. 2007);
- the target confusion matrix and per-class accuracy.

The images shown are the same in every evaluation and every run of a task: a fixed-seed choice over
each domain's files. Everything here runs at evaluations only, never between them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tada_dist.data import Domain  # noqa: E402

FIGURE_DPI = 100
TILE_INCHES = 1.6  # one image column of an attention figure


def shown_images(domain: Domain, count: int) -> list[int]:
    """`count` images of `domain`, the same whatever the run: a fixed permutation of its file list."""
    order = np.random.default_rng(0).permutation(len(domain.files))
    return sorted(order[:count].tolist())


def subset(domain: Domain, indices: list[int]) -> Domain:
    return Domain(name=domain.name, files=[domain.files[i] for i in indices],
                  labels=[domain.labels[i] for i in indices], classes=domain.classes)


def denormalize(images: torch.Tensor, mean: tuple, std: tuple) -> np.ndarray:
    """[n, 3, S, S] normalised -> [n, S, S, 3] in [0, 1] for display."""
    pixels = images.float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return pixels.clamp(0, 1).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def draw_attention(model, images: torch.Tensor, labels: torch.Tensor, classes: list[str], *, mean: tuple,
                   std: tuple, title: str, path: Path) -> Path:
    """One column per image: the image, its attention w laid over it, its regions' entropy H(d_k).
    The PNG is TILE_INCHES * FIGURE_DPI pixels wide per image and three tiles high (plus the title)."""
    was_training = model.training
    model.eval()
    outputs = model.inspect(images)
    model.train(was_training)
    if "attention" not in outputs:
        raise ValueError(f"method {model.method!r} has no local attention to draw")
    side = images.shape[-1]
    height, width = model.map_size

    def upsample(values: torch.Tensor) -> np.ndarray:
        grid = values.float().view(-1, 1, height, width).cpu()
        return F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[:, 0].numpy()

    attention, entropy = upsample(outputs["attention"]), upsample(outputs["region_entropy"])
    pictures = denormalize(images, mean, std)
    predicted = outputs["logits"].argmax(dim=1).cpu()
    columns = len(images)
    figure, axes = plt.subplots(3, columns, figsize=(TILE_INCHES * columns, TILE_INCHES * 3 + 0.5), dpi=FIGURE_DPI,
                                squeeze=False)
    # The colours span the whole range w can take (eq. 3 or the uncertainty form, H between 0 and ln 2),
    # so that a nearly constant w looks constant; the values it really took are in the row's title.
    import tada_kernels

    offset, slope = tada_kernels.attention_coefficients(model.attention, model.entropy_unit)
    a_range = tuple(sorted((offset, offset + slope * float(np.log(2.0)))))
    for column in range(columns):
        label, guess = classes[int(labels[column])], classes[int(predicted[column])]
        axes[0, column].imshow(pictures[column])
        axes[0, column].set_title(f"{label} ({'ok' if label == guess else guess})", fontsize=7)
        axes[1, column].imshow(pictures[column])
        axes[1, column].imshow(attention[column], cmap="jet", alpha=0.5, vmin=a_range[0], vmax=a_range[1])
        axes[2, column].imshow(entropy[column], cmap="viridis", vmin=0.0, vmax=float(np.log(2.0)))
        for row in range(3):
            axes[row, column].axis("off")
    axes[1, 0].set_title(f"attention w: {attention.min():.3f} to {attention.max():.3f} "
                         f"(colours {a_range[0]:.2f} to {a_range[1]:.2f})", fontsize=7, loc="left")
    axes[2, 0].set_title(f"region entropy H(d), nats: {entropy.min():.3f} to {entropy.max():.3f} "
                         "(colours 0 to ln 2)", fontsize=7, loc="left")
    figure.suptitle(title, fontsize=8)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.15)
    return save(figure, path)


def save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)
    return path


def fixed_points(count: int, at_most: int, seed: int = 0) -> np.ndarray:
    """At most `at_most` of `count` indices, the same for the same count."""
    if count <= at_most:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=at_most, replace=False))


def proxy_a_distance(source: torch.Tensor, target: torch.Tensor, *, at_most: int = 1000) -> float:
    """2 (1 - 2 err): err is the held-out error of a linear domain classifier trained on half of an equal
    number of source and target features (standardised), tested on the other half."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    n = min(len(source), len(target), at_most)
    features = torch.cat([source[fixed_points(len(source), n, 1)], target[fixed_points(len(target), n, 2)]]).numpy()
    domains = np.array([0] * n + [1] * n)
    train_x, test_x, train_y, test_y = train_test_split(features, domains, test_size=0.5, random_state=0,
                                                        stratify=domains)
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
    error = 1.0 - classifier.score(scaler.transform(test_x), test_y)
    return 2.0 * (1.0 - 2.0 * error)


def draw_tsne(source: torch.Tensor, source_labels: torch.Tensor, target: torch.Tensor, target_labels: torch.Tensor,
              classes: list[str], *, title: str, path: Path, at_most: int = 1000) -> Path:
    """Two panels of one t-SNE embedding of source and target features: coloured by domain, by class."""
    from sklearn.manifold import TSNE

    s, t = fixed_points(len(source), at_most, 1), fixed_points(len(target), at_most, 2)
    features = torch.cat([source[s], target[t]]).numpy()
    labels = torch.cat([source_labels[s], target_labels[t]]).numpy()
    is_target = np.array([0] * len(s) + [1] * len(t))
    perplexity = min(30.0, (len(features) - 1) / 3)
    embedded = TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=0).fit_transform(features)
    figure, (by_domain, by_class) = plt.subplots(1, 2, figsize=(10, 5), dpi=FIGURE_DPI)
    for flag, name, colour in ((0, "source", "tab:red"), (1, "target", "tab:blue")):
        points = embedded[is_target == flag]
        by_domain.scatter(points[:, 0], points[:, 1], s=3, c=colour, label=name, alpha=0.6)
    by_domain.legend(markerscale=4, fontsize=8)
    by_domain.set_title("by domain", fontsize=9)
    scatter = by_class.scatter(embedded[:, 0], embedded[:, 1], s=3, c=labels, cmap="tab20", alpha=0.6)
    if len(classes) <= 20:
        by_class.legend(scatter.legend_elements()[0], classes, fontsize=6, markerscale=0.8, ncol=2)
    by_class.set_title("by class", fontsize=9)
    for axis in (by_domain, by_class):
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return save(figure, path)


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[i, j]: images of class i predicted as class j."""
    return torch.bincount(labels * num_classes + predictions, minlength=num_classes**2).view(num_classes, num_classes)


def write_confusion(counts: torch.Tensor, classes: list[str], *, title: str, folder: Path) -> list[Path]:
    """confusion_matrix.png, confusion_matrix.csv and per_class_accuracy.csv in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "confusion_matrix.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([name, *row] for name, row in zip(classes, counts.tolist()))
    totals = counts.sum(dim=1)
    with open(folder / "per_class_accuracy.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "images", "correct", "accuracy_percent"])
        for index, name in enumerate(classes):
            total, right = int(totals[index]), int(counts[index, index])
            writer.writerow([name, total, right, f"{100.0 * right / total:.2f}" if total else "nan"])
    rates = counts.float() / totals.clamp_min(1).unsqueeze(1)
    size = max(4.0, 0.35 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size), dpi=FIGURE_DPI)
    axis.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(classes))
    axis.set_xticks(ticks, classes, rotation=90, fontsize=6)
    axis.set_yticks(ticks, classes, fontsize=6)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return [save(figure, folder / "confusion_matrix.png"), folder / "confusion_matrix.csv",
            folder / "per_class_accuracy.csv"]


class Analyst:
    """The analysis of one training run: attention maps at each evaluation, the label-free selection
    scores beside each target accuracy, and at the end the feature analysis, the confusion matrix and
    the choice each selection score would have made. Files go to <output_dir>/analysis and to MLflow.

    Collective: every rank calls every method (the passes over the data are sharded); rank 0 draws,
    scores and logs."""

    def __init__(self, config, source: Domain, target: Domain, dist_info, *, output_dir: Path, tracker,
                 device: torch.device, dtype: torch.dtype, source_holdout: Domain | None = None):
        from tada_dist.build import create_evaluation_loader
        from tada_dist.data import create_eval_loader
        from tada_dist.model import method_parts

        self.config = config
        self.source, self.target = source, target
        self.dist_info = dist_info
        self.folder = output_dir / "analysis"
        self.tracker = tracker
        self.device, self.dtype = device, dtype
        self.history: list[dict] = []  # one entry per evaluation: step, target_acc and scores
        settings = config.analysis
        self.shown: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if settings.attention_images and method_parts(config.method).local_attention and dist_info.is_main:
            from tada_dist.build import transform_from_config

            transform = transform_from_config(config, ten_crop=False)
            for role, domain in (("source", source), ("target", target)):
                chosen = subset(domain, shown_images(domain, settings.attention_images))
                loader = create_eval_loader(chosen, batch_size=len(chosen.files), transform=transform, rank=0,
                                            world_size=1, backend=config.data.loader, device="cpu", num_threads=1,
                                            cache=config.data.cache)
                self.shown[role] = next(iter(loader))
        # Source features for the feature analysis and for DEV, over a fixed subset of the training source.
        needs_source = settings.features or source_holdout is not None
        subset_size = min(len(source.files), settings.max_points)
        self.source_loader = create_evaluation_loader(
            config, subset(source, fixed_points(len(source.files), subset_size, 3).tolist()), dist_info,
            ten_crop=False) if needs_source else None
        self.holdout_loader = create_evaluation_loader(config, source_holdout, dist_info, ten_crop=False) \
            if source_holdout is not None else None

    def _evaluate(self, model, loader):
        from tada_dist.evaluation import evaluate

        return evaluate(model, loader, len(self.source.classes), device=self.device, dtype=self.dtype,
                        keep_predictions=True)

    def at_evaluation(self, model, step: int, accuracy: float, target) -> dict[str, float]:
        """Scores of this evaluation (rank 0; {} elsewhere), logged beside target_acc; attention maps."""
        from tada_dist.selection import deep_embedded_validation, target_scores

        scores: dict[str, float] = {}
        if self.config.analysis.selection and target is not None:
            source_features = None
            if self.holdout_loader is not None:
                _, holdout = self._evaluate(model, self.holdout_loader)
                _, source_features = self._evaluate(model, self.source_loader)
            if self.dist_info.is_main:
                scores = target_scores(target.logits)
                if self.holdout_loader is not None:
                    losses = F.cross_entropy(holdout.logits, holdout.labels, reduction="none")
                    scores["dev"] = deep_embedded_validation(holdout.features, losses, source_features.features,
                                                             target.features)
        if self.dist_info.is_main:
            self.history.append({"step": step, "target_acc": accuracy, **scores})
            self.tracker.log_metrics({f"selection/{name}": value for name, value in scores.items()}, step=step)
            for role, (images, labels) in self.shown.items():
                domain = self.source if role == "source" else self.target
                path = draw_attention(
                    model, images.to(self.device, self.dtype), labels, domain.classes, mean=tuple(self.config.data.mean),
                    std=tuple(self.config.data.std), title=f"{self.config.method}: {role} {domain.name}, step {step}",
                    path=self.folder / f"attention_{role}_step{step:08d}.png")
                self.tracker.log_artifact(path, "attention")
        return scores

    def at_end(self, model, step: int, target) -> dict:
        """Feature analysis and confusion matrix of the final model; the selection summary."""
        from tada_dist.selection import picks

        summary: dict = {}
        source = self._evaluate(model, self.source_loader)[1] if self.config.analysis.features else None
        if not self.dist_info.is_main or target is None:
            return summary
        classes = self.target.classes
        title = f"{self.config.method}, {self.source.name} -> {self.target.name}, step {step}"
        files = write_confusion(confusion_matrix(target.labels, target.logits.argmax(dim=1), len(classes)),
                                classes, title=title, folder=self.folder)
        if source is not None:
            summary["a_distance"] = proxy_a_distance(source.features, target.features,
                                                     at_most=self.config.analysis.max_points)
            self.tracker.log_metrics({"a_distance": summary["a_distance"]}, step=step)
            files.append(draw_tsne(source.features, source.labels, target.features, target.labels, classes,
                                   title=title, path=self.folder / "tsne.png", at_most=self.config.analysis.max_points))
        chosen = picks(self.history) if self.history else {}
        summary["selection"] = {name: {"step": pick.step, "target_acc": pick.accuracy} for name, pick in chosen.items()}
        for name, pick in chosen.items():
            self.tracker.log_metrics({f"selection/{name}_pick_acc": pick.accuracy}, step=step)
        for path in files:
            self.tracker.log_artifact(path, "analysis")
        return summary
