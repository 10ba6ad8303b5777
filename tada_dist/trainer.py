"""The training loop: set up, `train_step`, `validate`, `save`, in the order one step runs them.

    source batch + target batch -> TADA model (DeepSpeed engine) -> eq. 9 -> engine.backward/step
    every log_every steps: metrics to the progress bar and MLflow (rank 0)
    every eval_every steps: target accuracy, counted once per image across ranks
    every checkpoint.every steps: DeepSpeed checkpoint with our client state, written atomically
    a NaN/inf loss on any rank: every rank skips the step (no update); too many in a row stop the run
    SIGTERM: finish the step, save a checkpoint, exit; the same command resumes
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import tada_kernels
from tada_dist import checkpoint
from tada_dist.config import Config, ConfigError, flatten, save_config, to_dict
from tada_dist.data import (
    DataError,
    Domain,
    TransformSpec,
    check_same_classes,
    create_eval_loader,
    create_train_loader,
    load_domain,
)
from tada_dist.data.synthetic import ensure_synthetic_dataset
from tada_dist.deepspeed_config import deepspeed_config
from tada_dist.distributed import (
    DistInfo,
    any_rank,
    average_batchnorm_statistics,
    barrier,
    broadcast_object,
    init_distributed,
)
from tada_dist.evaluate import Accuracy, evaluate_accuracy
from tada_dist.losses import LossWeights, tada_objective
from tada_dist.model import create_model, method_parts
from tada_dist.optim import create_optimizer
from tada_dist.preemption import StopRequest
from tada_dist.schedules import create_lr_scheduler, grl_schedule, progress
from tada_dist.tracking import Tracker, resolve_tracking_uri, ui_command

DEFAULT_DATA_CACHE = Path.home() / ".cache" / "tada-dist" / "synthetic"


def default_data_root() -> Path:
    """Where the generated default dataset lives (TADA_DIST_CACHE overrides it)."""
    return Path(os.environ.get("TADA_DIST_CACHE", DEFAULT_DATA_CACHE))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_domains(config: Config, dist_info: DistInfo) -> tuple[Domain, Domain]:
    """Rank 0 lists and checks every image once; the other ranks receive the result (or its error).

    The generated default dataset is written by every rank (it is locked and idempotent), because
    nodes need not share a file system."""
    root = Path(config.data.root) if config.data.root else ensure_synthetic_dataset(default_data_root())
    result: tuple[Domain, Domain] | str
    if dist_info.is_main:
        try:
            source = load_domain(root / config.data.source, skip_corrupt=config.data.skip_corrupt)
            target = load_domain(root / config.data.target, skip_corrupt=config.data.skip_corrupt)
            check_same_classes(source, target)
            result = (source, target)
        except DataError as err:
            result = str(err)
    else:
        result = ""
    result = broadcast_object(result)
    if isinstance(result, str):
        raise DataError(result)
    return result


def model_from_config(config: Config, num_classes: int, *, load_pretrained: bool = True) -> torch.nn.Module:
    """The TADA model a config describes; evaluation skips the pretrained weights it overwrites anyway."""
    model = config.model
    return create_model(
        method=config.method,
        backbone=model.backbone,
        num_classes=num_classes,
        image_size=config.data.crop,
        pretrained=model.pretrained if load_pretrained else None,
        pooling=model.pooling,
        bottleneck_dim=model.bottleneck_dim,
        bottleneck_layers=model.bottleneck_layers,
        bottleneck_batchnorm=model.bottleneck_batchnorm,
        bottleneck_dropout=model.bottleneck_dropout,
        classifier_hidden=model.classifier_hidden,
        classifier_layers=model.classifier_layers,
        region_hidden=model.region_hidden,
        global_hidden=model.global_hidden,
        global_layers=model.global_layers,
        discriminator_dropout=model.discriminator_dropout,
        attention=model.attention,
        entropy_unit=model.entropy_unit,
        detach_attention=model.detach_attention,
        kernels_backend=config.kernels.backend,
    )


def transform_from_config(config: Config, *, ten_crop: bool | None = None) -> TransformSpec:
    """The image transform of `config.data`; ten_crop (evaluation only) defaults to data.eval_ten_crop."""
    data = config.data
    return TransformSpec(
        resize=data.resize, crop=data.crop, flip=data.flip, mean=tuple(data.mean), std=tuple(data.std),
        resize_mode=data.resize_mode, train_crop=data.train_crop,
        ten_crop=data.eval_ten_crop if ten_crop is None else ten_crop,
    )


def loader_device(config: Config, dist_info: DistInfo) -> str:
    """Where DALI decodes: `data.device`, or the training device when it is `auto`."""
    if config.data.device != "auto":
        return config.data.device
    return "gpu" if dist_info.device.type == "cuda" else "cpu"


def match_batchnorm_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """DeepSpeed's bf16 mode casts parameters but not BatchNorm running statistics; CUDA kernels accept
    the mix, CPU ones do not, so on the CPU the statistics follow the parameters."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.data = module.running_mean.data.to(dtype)
            module.running_var.data = module.running_var.data.to(dtype)


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for train.max_nonfinite_steps steps in a row."""


def zero_gradient_loss(model: torch.nn.Module) -> torch.Tensor:
    """A loss whose gradient is exactly zero for every trainable parameter. It stands in for a
    non-finite loss so that backward still runs on every rank (DeepSpeed's gradient reduction and
    accumulation count expect it) without a single NaN reaching the gradients."""
    return sum((parameter * 0.0).sum() for parameter in model.parameters() if parameter.requires_grad)


@contextmanager
def frozen_optimizer(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Make the next SGD step a no-op: with lr, momentum and weight decay at 0 it changes neither the
    parameters nor the momentum buffers. The LR scheduler sets the next step's rate itself."""
    saved = [(group["momentum"], group["weight_decay"]) for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(lr=0.0, momentum=0.0, weight_decay=0.0)
    try:
        yield
    finally:
        for group, (momentum, weight_decay) in zip(optimizer.param_groups, saved):
            group.update(momentum=momentum, weight_decay=weight_decay)


@dataclass
class RunningMeans:
    """Averages of the loss terms since the last log. Sums stay tensors until then, so that reading
    them adds no wait for the GPU (the step's one sync is the all-ranks finiteness check)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value.detach().clone()
        self.count += 1

    def pop(self) -> dict[str, float]:
        means = {key: float(total) / max(self.count, 1) for key, total in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


class Trainer:
    def __init__(self, config: Config):
        import deepspeed

        self.config = config
        self.dist = init_distributed(config.distributed.backend)
        try:  # fail now, not at the first forward pass
            tada_kernels.resolve_backend(config.kernels.backend, self.dist.device)
        except RuntimeError as err:
            raise ConfigError(f"kernels.backend={config.kernels.backend}: {err}") from None
        self.output_dir = config.resolved_output_dir()
        self.adapts = method_parts(config.method).adapts  # source_only never reads a target batch
        self.loss_weights = LossWeights(adaptation=config.loss.adaptation_weight, entropy=config.loss.entropy_weight)

        self.source, self.target = resolve_domains(config, self.dist)
        self.num_classes = len(self.source.classes)
        self._build_loaders()

        seed_everything(config.seed)  # identical initial weights on every rank
        model = model_from_config(config, self.num_classes)
        optimizer = create_optimizer(
            model,
            base_lr=config.optim.lr,
            momentum=config.optim.momentum,
            weight_decay=config.optim.weight_decay,
            nesterov=config.optim.nesterov,
            new_layer_mult=config.optim.new_layer_mult,
        )
        scheduler = create_lr_scheduler(
            optimizer, config.train.steps, gamma=config.schedule.lr_gamma, power=config.schedule.lr_power
        )
        self.ds_config = deepspeed_config(config, self.dist.world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.model = self.engine.module
        self.input_dtype = torch.bfloat16 if config.distributed.precision == "bf16" else torch.float32
        if self.input_dtype == torch.bfloat16 and self.dist.device.type == "cpu":
            match_batchnorm_buffers(self.model, torch.bfloat16)
        seed_everything(config.seed + 1000 * self.dist.rank)  # dropout differs between ranks

        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss, over the whole run
        self.nonfinite_streak = 0  # of them, how many in a row up to now
        self.saved_step: int | None = None
        self.stop = StopRequest()
        self.stop_agreed = False
        resumed = checkpoint.load_latest(self.engine, self.output_dir, self.dist) if config.checkpoint.resume else None
        if resumed is not None:
            self.step = self.saved_step = int(resumed["step"])
            self.skipped_steps = int(resumed.get("skipped_steps", 0))
            self.source_loader.load_state_dict(resumed["data"]["source"])
            self.target_loader.load_state_dict(resumed["data"]["target"])
            if self.dist.is_main:
                print(f"resuming from step {self.step} of {self.output_dir}", flush=True)
        self._start_tracking(resumed)
        self.last_accuracy: Accuracy | None = None

    # -- set-up helpers -------------------------------------------------------------------------

    def _build_loaders(self) -> None:
        data = self.config.data
        device = loader_device(self.config, self.dist)
        train_transform = transform_from_config(self.config, ten_crop=False)
        common = dict(rank=self.dist.rank, world_size=self.dist.world_size, backend=data.loader, device=device,
                      num_threads=data.num_threads)
        self.source_loader = create_train_loader(
            self.source, batch_size=data.batch_size, transform=train_transform, seed=self.config.seed, **common
        )
        self.target_loader = create_train_loader(
            self.target, batch_size=data.batch_size, transform=train_transform, seed=self.config.seed + 1, **common
        )
        self.eval_loader = create_eval_loader(
            self.target, batch_size=data.eval_batch_size, transform=transform_from_config(self.config), **common
        )

    def _start_tracking(self, resumed: dict | None) -> None:
        config = self.config
        uri = resolve_tracking_uri(config.tracking.uri, self.output_dir)
        self.tracker = Tracker(active=self.dist.is_main and config.tracking.enabled, uri=uri,
                               experiment=config.tracking.experiment)
        run_id = resumed.get("mlflow_run_id") if resumed else None
        self.tracker.start(
            run_id=run_id,
            run_name=config.tracking.run_name or f"{config.method}-seed{config.seed}",
            system_metrics=config.tracking.system_metrics,
            tags={"world_size": self.dist.world_size, "method": config.method,
                  "source": self.source.name, "target": self.target.name},
        )
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
            (self.output_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
        if run_id is None:
            self.tracker.log_params({**flatten(to_dict(config)), "world_size": self.dist.world_size,
                                     "global_batch": self.global_batch()})
            self.tracker.log_artifact(self.output_dir / "config.yaml")
            self.tracker.log_artifact(self.output_dir / "deepspeed_config.json")

    # -- one step -------------------------------------------------------------------------------

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.dist.device, dtype=self.input_dtype, non_blocking=True)

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step over grad_accum micro-batches. Returns the loss terms, or None when a
        NaN/inf loss on any rank made every rank skip the step: no parameter, optimizer or BatchNorm
        statistic changes, but the batches are consumed and the step counts."""
        config = self.config
        p = progress(self.step, config.train.steps)
        grl_coeff = grl_schedule(p, alpha=config.schedule.grl_alpha)
        self.model.set_grl_coeff(grl_coeff)
        self.engine.train()
        statistics = [buffer.detach().clone() for buffer in self.model.buffers()]
        finite = True
        for _ in range(config.distributed.grad_accum):
            source_images, source_labels = next(self.source_loader)
            target_images = self._to_device(next(self.target_loader)[0]) if self.adapts else None
            outputs = self.engine(self._to_device(source_images), target_images)
            loss, terms = tada_objective(
                outputs, source_labels.to(self.dist.device), self.loss_weights, method=config.method,
                detach_attention=config.model.detach_attention, entropy_unit=config.model.entropy_unit,
                backend=config.kernels.backend,
            )
            # One all-reduce answers both questions every rank must answer alike: skip? stop?
            nonfinite, stop = any_rank([not bool(torch.isfinite(loss)), self.stop.requested], self.dist.device)
            self.stop_agreed = self.stop_agreed or stop
            finite = finite and not nonfinite
            if finite:
                self.engine.backward(loss)
                self.engine.step()
                continue
            self.engine.backward(zero_gradient_loss(self.model))
            if self.engine.is_gradient_accumulation_boundary():
                with frozen_optimizer(self.optimizer):
                    self.engine.step()
            else:
                self.engine.step()
        self.step += 1
        if not finite:
            for buffer, saved in zip(self.model.buffers(), statistics):
                buffer.copy_(saved)
            return None
        terms["lambda_p"] = torch.tensor(self.loss_weights.adaptation * grl_coeff)
        return terms

    def validate(self, loader=None) -> Accuracy:
        average_batchnorm_statistics(self.model)
        self.engine.eval()
        return evaluate_accuracy(self.model, loader or self.eval_loader, self.num_classes,
                                 device=self.dist.device, dtype=self.input_dtype)

    def save(self) -> None:
        """Checkpoint the current step, unless it is saved already or the weights hold NaN/inf (then
        the newest checkpoint stays the last good one). Skipped steps change nothing, so a save
        during a streak of non-finite losses stores the state from before the streak."""
        if self.saved_step == self.step:
            return
        weights_finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        if any_rank([not bool(weights_finite)], self.dist.device)[0]:
            if self.dist.is_main:
                tqdm.write(f"step {self.step}: not saving a checkpoint: the weights hold NaN/inf")
            return
        average_batchnorm_statistics(self.model)
        client_state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "data": {"source": self.source_loader.state_dict(), "target": self.target_loader.state_dict()},
            "mlflow_run_id": self.tracker.run_id,
        }
        checkpoint.save(self.engine, self.output_dir, self.step, client_state, self.dist,
                        keep=self.config.checkpoint.keep)
        self.saved_step = self.step

    # -- the loop -------------------------------------------------------------------------------

    def global_batch(self) -> int:
        """Images per domain in one optimizer step: per-rank batch x ranks x accumulation."""
        return self.config.data.batch_size * self.dist.world_size * self.config.distributed.grad_accum

    def images_per_step(self) -> int:
        return self.global_batch() * (2 if self.adapts else 1)

    def fit(self) -> dict:
        """Train to train.steps (or until SIGTERM) and return the summary; "stopped" is set when a
        stop signal ended the run early, after its checkpoint."""
        try:
            with self.stop:
                summary = self._fit()
        except KeyboardInterrupt:
            self.tracker.finish("KILLED")
            raise
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        self.tracker.finish("KILLED" if summary.get("stopped") else "FINISHED")
        return summary

    def _fit(self) -> dict:
        config = self.config
        total = config.train.steps
        log_every, eval_every, ckpt_every = config.train.log_every, config.train.eval_every, config.checkpoint.every
        if self.dist.is_main:
            print(f"global batch {self.global_batch()} per domain = {config.data.batch_size} per rank x "
                  f"{self.dist.world_size} ranks x {config.distributed.grad_accum} accumulation", flush=True)
        # The bar is closed however the loop ends, so that an error starts on a line of its own.
        with tqdm(total=total, initial=self.step, disable=not self.dist.is_main, desc=config.method,
                  dynamic_ncols=True, unit="step") as bar:
            means = RunningMeans()
            started, window_start, window_steps = time.perf_counter(), time.perf_counter(), 0
            wait_before = self.source_loader.data_wait_seconds + self.target_loader.data_wait_seconds
            while self.step < total:
                terms = self.train_step()
                self._count_nonfinite(terms is None, bar)
                if terms is not None:
                    means.add(terms)
                window_steps += 1
                bar.update(1)
                if self.step % log_every == 0 or self.step == total:
                    elapsed = time.perf_counter() - window_start
                    wait_now = self.source_loader.data_wait_seconds + self.target_loader.data_wait_seconds
                    metrics = means.pop()
                    metrics.update(
                        images_per_sec=self.images_per_step() * window_steps / elapsed,
                        data_wait_sec=(wait_now - wait_before) / window_steps,
                        lr=self.optimizer.param_groups[0]["lr"],
                        skipped_steps=self.skipped_steps,
                    )
                    self.tracker.log_metrics(metrics, step=self.step)
                    bar.set_postfix({k: f"{metrics[k]:.3g}" for k in ("loss", "cls", "images_per_sec") if k in metrics})
                    window_start, window_steps, wait_before = time.perf_counter(), 0, wait_now
                if (eval_every and self.step % eval_every == 0) or self.step == total:
                    self.last_accuracy = self.validate()
                    self.tracker.log_metrics({"target_acc": self.last_accuracy.overall}, step=self.step)
                    bar.write(f"step {self.step}: target accuracy {self.last_accuracy.overall:.2f}%")
                if (ckpt_every and self.step % ckpt_every == 0) or self.step == total:
                    self.save()
                if self.stop_agreed and self.step < total:
                    self.save()
                    return self._stopped_summary()
        if self.last_accuracy is None:  # resumed at the final step: nothing trained, still report
            self.last_accuracy = self.validate()
        return self._write_summary(time.perf_counter() - started)

    def _count_nonfinite(self, skipped: bool, bar: tqdm) -> None:
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.skipped_steps += 1
        self.nonfinite_streak += 1
        bar.write(f"step {self.step}: loss is NaN/inf on some rank; step skipped "
                  f"({self.nonfinite_streak} in a row, {self.skipped_steps} in this run)")
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            last_good = checkpoint.read_latest(checkpoint.checkpoint_dir(self.output_dir))
            where = checkpoint.checkpoint_dir(self.output_dir) / last_good if last_good else "none saved yet"
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {limit} steps in a row (steps {self.step - limit + 1}-{self.step}, "
                f"train.max_nonfinite_steps={limit}); the last good checkpoint is {where}"
            )

    def _stopped_summary(self) -> dict:
        """What a run stopped by a signal reports: where it stopped and where it saved."""
        signal_name = self.stop.received.name if self.stop.received else "a stop signal on another rank"
        return {"stopped": signal_name, "step": self.step, "method": self.config.method,
                "checkpoint": str(checkpoint.checkpoint_dir(self.output_dir) / checkpoint.step_tag(self.step))
                if self.saved_step == self.step else None,
                "mlflow_run_id": self.tracker.run_id}

    def _write_summary(self, wall_seconds: float) -> dict:
        accuracy = self.last_accuracy
        summary = {
            "target_acc": accuracy.overall,
            "per_class_acc": dict(zip(self.target.classes, accuracy.per_class)),
            "step": self.step,
            "method": self.config.method,
            "seed": self.config.seed,
            "wall_seconds": round(wall_seconds, 2),
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri if self.tracker.active else None,
        }
        if self.dist.is_main:
            (self.output_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
        barrier()
        return summary


def report(summary: dict) -> None:
    """What a user needs at the end of a run: the accuracy and how to look at the run in MLflow."""
    if summary.get("stopped"):
        saved = f"checkpoint {summary['checkpoint']}" if summary["checkpoint"] else "no new checkpoint"
        print(f"stopped by {summary['stopped']} at step {summary['step']}; {saved}; "
              "run the same command to resume", flush=True)
        return
    print(f"target accuracy: {summary['target_acc']:.2f}% after {summary['step']} steps ({summary['method']})")
    if summary.get("tracking_uri"):
        print(f"MLflow run {summary['mlflow_run_id']}; open the UI with:\n  {ui_command(summary['tracking_uri'])}")
