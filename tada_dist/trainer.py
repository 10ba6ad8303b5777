"""The training loop, one step after another; the components around it own their timing.

    Trainer.__init__  the run's parts (build.py), the DeepSpeed engine, the resume, MLflow
    Trainer.fit       until train.steps, or until a stop signal:
        train_step        source + target batch -> TADA -> eq. 9 -> engine.backward/step; a NaN/inf
                          loss on any rank makes every rank skip the step
        metrics           loss means, throughput and progress every train.log_every steps (MetricsLogger)
        evaluator         target accuracy every train.eval_every steps, each image counted once (Evaluator)
        checkpointer      a checkpoint every checkpoint.every steps, written atomically (Checkpointer)
    SIGTERM or Ctrl-C: every rank finishes its step, the run saves and exits; the same command resumes.
    A second Ctrl-C stops at once.

StepHooks is the seam into a step for the tests that inject faults (NaN inputs, weights gone bad).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.profiler import record_function

import tada_kernels
from tada_dist import checkpoint
from tada_dist.analysis import Analyst
from tada_dist.build import (
    channels_last,
    create_evaluation_loader,
    create_train_loaders,
    model_from_config,
    resolve_domains,
    seed_everything,
    split_holdout,
)
from tada_dist.config import Config, ConfigError, flatten, save_config, to_dict
from tada_dist.data import DataError
from tada_dist.deepspeed_config import deepspeed_config
from tada_dist.distributed import barrier, deepspeed_output, init_distributed
from tada_dist.evaluation import Accuracy, Evaluator
from tada_dist.host_memory import retain_freed_memory
from tada_dist.losses import LossWeights, tada_objective
from tada_dist.metrics import MetricsLogger, Progress, RunTotals
from tada_dist.paths import task_name
from tada_dist.model import method_parts
from tada_dist.optim import create_optimizer
from tada_dist.preemption import StopRequest
from tada_dist.preflight import run_record
from tada_dist.schedules import create_lr_scheduler, grl_schedule, progress
from tada_dist.step_verdict import step_verdict
from tada_dist.tracking import Tracker, resolve_tracking_uri, ui_command


class StepHooks:
    """Seams into every training step; the trainer's own hooks do nothing. Tests subclass them to
    inject faults into real runs (NaN inputs on chosen steps, a weight that turns inf)."""

    def before_step(self, trainer: Trainer) -> None:
        """Called before the step's first batch is read; trainer.step is the number of steps done."""

    def on_inputs(self, trainer: Trainer, images: torch.Tensor, micro_step: int) -> torch.Tensor:
        """The images of micro-step `micro_step` (1-based) on the device, source and target alike."""
        return images

    def after_step(self, trainer: Trainer) -> None:
        """Called when the step is done, before it is logged, evaluated or saved."""


class BufferSnapshot:
    """A copy of the model's buffers (BatchNorm statistics), taken before each step so that a skipped step
    can put them back. The copy is allocated once and refreshed in place: no allocation per step."""

    def __init__(self, model: torch.nn.Module):
        self.buffers = list(model.buffers())
        self.copies = [buffer.detach().clone() for buffer in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.copies, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.copies)


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


class Trainer:
    def __init__(self, config: Config, hooks: StepHooks | None = None):
        self.config = config
        self.hooks = hooks or StepHooks()
        if config.train.retain_host_memory:
            retain_freed_memory()
        self.dist = init_distributed(config.distributed.backend)
        try:  # fail now, not at the first forward pass
            tada_kernels.resolve_backend(config.kernels.backend, self.dist.device)
        except RuntimeError as err:
            raise ConfigError(f"kernels.backend={config.kernels.backend}: {err}") from None
        self.output_dir = Path(config.output_dir)
        self.adapts = method_parts(config.method).adapts  # source_only never reads a target batch
        self.loss_weights = LossWeights(adaptation=config.loss.adaptation_weight, entropy=config.loss.entropy_weight)

        self.source, self.target = resolve_domains(config, self.dist)
        self.source, self.source_holdout = split_holdout(self.source, config.data.source_holdout)
        self.num_classes = len(self.source.classes)
        self.source_loader, self.target_loader = create_train_loaders(config, self.source, self.target, self.dist)

        seed_everything(config.seed)  # identical initial weights on every rank
        model = model_from_config(config, self.num_classes)
        self.memory_format = torch.channels_last if channels_last(self.dist) else torch.contiguous_format
        # Channels-last inputs make every convolution, pooling and BatchNorm output channels-last, so the
        # feature map reaches the region discriminators with its [B, K, C] view contiguous in C. The
        # parameters keep the default layout: DeepSpeed broadcasts them as bytes (which needs a last
        # stride of 1) and flattens them into its optimizer buffers; convolutions take the weight in
        # either layout. cuDNN picks the fastest convolution for the fixed input size.
        torch.backends.cudnn.benchmark = self.dist.device.type == "cuda"
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
        with deepspeed_output():
            import deepspeed

            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
            )
        self.model = self.engine.module
        if self.dist.world_size == 1 and self.engine.zero_optimization_stage() == 0 and self.engine.optimizer is optimizer:
            # One rank has nothing to average, but DeepSpeed's plain (unwrapped optimizer, ZeRO-0) path would
            # still flatten every gradient, all-reduce it with itself and copy it back, every step.
            self.engine.enable_backward_allreduce = False
        self.verdict = step_verdict(self.engine, optimizer, self.dist.world_size, self.dist.device)
        self.buffer_snapshot = BufferSnapshot(self.model)
        self.input_dtype = torch.bfloat16 if config.distributed.precision == "bf16" else torch.float32
        if self.input_dtype == torch.bfloat16 and self.dist.device.type == "cpu":
            match_batchnorm_buffers(self.model, torch.bfloat16)
        seed_everything(config.seed + 1000 * self.dist.rank)  # dropout differs between ranks

        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss, over the whole run
        self.nonfinite_streak = 0  # of them, how many in a row up to now
        self.totals = RunTotals()
        self.stop = StopRequest()
        self.stop_agreed = False
        self.checkpointer = checkpoint.Checkpointer(
            self.output_dir, every=config.checkpoint.every, keep=config.checkpoint.keep,
            total_steps=config.train.steps, dist_info=self.dist, run=run_record(config, self.dist.world_size),
        )
        resumed = self.checkpointer.resume(self.engine) if config.checkpoint.resume else None
        if resumed is not None:
            self._restore(resumed)
        self.evaluator = Evaluator(
            create_evaluation_loader(config, self.target, self.dist), every=config.train.eval_every,
            total_steps=config.train.steps, num_classes=self.num_classes, device=self.dist.device,
            dtype=self.input_dtype, keep_predictions=config.analysis.selection or config.analysis.features,
        )
        self._start_tracking(resumed)
        self.analyst = Analyst(config, self.source, self.target, self.dist, output_dir=self.output_dir,
                               tracker=self.tracker, device=self.dist.device, dtype=self.input_dtype,
                               source_holdout=self.source_holdout)
        self.analyst.history = list(resumed.get("evaluations", [])) if resumed else []
        self.last_accuracy: Accuracy | None = None
        self.last_predictions = None

    # -- set-up helpers -------------------------------------------------------------------------

    def _restore(self, state: dict) -> None:
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.totals.load_state_dict(state.get("totals", {}))
        try:
            self.source_loader.load_state_dict(state["data"]["source"])
            self.target_loader.load_state_dict(state["data"]["target"])
        except DataError as err:
            raise ConfigError(f"{self.output_dir} holds a checkpoint that cannot resume this run ({err}); "
                              "train elsewhere with output_dir=..., or start over in this folder with "
                              "checkpoint.resume=false") from None
        if self.dist.is_main:
            print(f"resuming from step {self.step} of {self.output_dir}", flush=True)

    def _start_tracking(self, resumed: dict | None) -> None:
        config = self.config
        uri = resolve_tracking_uri(config.tracking.uri, self.output_dir)
        self.tracker = Tracker(active=self.dist.is_main and config.tracking.enabled, uri=uri,
                               experiment=config.tracking.experiment)
        run_id = resumed.get("mlflow_run_id") if resumed else None
        self.tracker.start(
            run_id=run_id,
            run_name=config.tracking.run_name or self.output_dir.name,
            system_metrics=config.tracking.system_metrics,
            tags={"world_size": self.dist.world_size, "method": config.method, "seed": config.seed,
                  "source": self.source.name, "target": self.target.name, "output_dir": str(self.output_dir),
                  "task": config.tracking.task or task_name(config.data.source, config.data.target),
                  "variant": config.tracking.variant or config.method},
        )
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / "config.yaml")
            (self.output_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
        if run_id is None:
            self.tracker.log_params({**flatten(to_dict(config)), "world_size": self.dist.world_size,
                                     "global_batch": self.global_batch(),
                                     "deepspeed_optimizer": type(self.optimizer).__name__})
            self.tracker.log_artifact(self.output_dir / "config.yaml")
            self.tracker.log_artifact(self.output_dir / "deepspeed_config.json")

    # -- one step -------------------------------------------------------------------------------

    def _inputs(self, images: torch.Tensor, micro_step: int) -> torch.Tensor:
        images = images.to(self.dist.device, dtype=self.input_dtype, non_blocking=True,
                           memory_format=self.memory_format)
        return self.hooks.on_inputs(self, images, micro_step)

    def train_step(self) -> dict[str, torch.Tensor] | None:
        """One optimizer step over grad_accum micro-batches. Returns the loss terms, or None when a
        NaN/inf loss on any rank made every rank skip the step: no parameter, optimizer or BatchNorm
        statistic changes, but the batches are consumed and the step counts."""
        config = self.config
        self.hooks.before_step(self)
        p = progress(self.step, config.train.steps)
        grl_coeff = grl_schedule(p, alpha=config.schedule.grl_alpha)
        self.model.set_grl_coeff(grl_coeff)
        self.engine.train()
        self.buffer_snapshot.save()
        finite = True
        for micro_step in range(1, config.distributed.grad_accum + 1):
            with record_function("data"):
                source_images, source_labels = next(self.source_loader)
                target_images = self._inputs(next(self.target_loader)[0], micro_step) if self.adapts else None
                source_images = self._inputs(source_images, micro_step)
            with record_function("forward"):
                outputs = self.engine(source_images, target_images)
                loss, terms = tada_objective(
                    outputs, source_labels.to(self.dist.device), self.loss_weights, method=config.method,
                    detach_attention=config.model.detach_attention, entropy_unit=config.model.entropy_unit,
                    backend=config.kernels.backend,
                )
            with record_function("agree"):
                # This rank's own verdict picks its backward; the all-ranks verdict (step_verdict.py)
                # travels while the backward runs, or inside its gradient all-reduce, and decides
                # whether the step is applied.
                finite_here = bool(torch.isfinite(loss.detach()))
                boundary = self.engine.is_gradient_accumulation_boundary()
                self.verdict.before_backward(nonfinite=not finite_here, stop=self.stop.requested)
            with record_function("backward"):
                # A non-finite loss never reaches the gradients: its rank backpropagates exact zeros,
                # so that DeepSpeed's reduction still sees every rank's backward.
                self.engine.backward(loss if finite and finite_here else zero_gradient_loss(self.model))
            with record_function("agree"):
                nonfinite, stop = self.verdict.after_backward(boundary=boundary)
            self.stop_agreed = self.stop_agreed or stop
            finite = finite and not nonfinite
            with record_function("optimizer"):
                if finite or not boundary:
                    self.engine.step()
                else:  # some rank's loss was NaN/inf in this step: every rank skips the update alike
                    with frozen_optimizer(self.optimizer):
                        self.engine.step()
        self.step += 1
        if not finite:
            self.buffer_snapshot.restore()
        self.hooks.after_step(self)
        if not finite:
            return None
        terms["lambda_p"] = torch.tensor(self.loss_weights.adaptation * grl_coeff)
        return terms

    def validate(self) -> Accuracy:
        """Target accuracy, the label-free selection scores and the attention maps of this step."""
        self.last_accuracy, self.last_predictions = self.evaluator(self.model)
        self.tracker.log_metrics({"target_acc": self.last_accuracy.overall}, step=self.step)
        self.analyst.at_evaluation(self.model, self.step, self.last_accuracy.overall, self.last_predictions)
        return self.last_accuracy

    def save(self) -> bool:
        """Checkpoint the current step (see Checkpointer.save); whether one exists afterwards."""
        client_state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "totals": self.totals.state_dict(),
            "data": {"source": self.source_loader.state_dict(), "target": self.target_loader.state_dict()},
            "mlflow_run_id": self.tracker.run_id,
            "evaluations": self.analyst.history,  # the selection summary spans every session of the run
        }
        self.tracker.flush()  # every step up to this checkpoint is in the store (or on its way) before it exists
        return self.checkpointer.save(self.engine, self.model, self.step, client_state)

    # -- the loop -------------------------------------------------------------------------------

    def global_batch(self) -> int:
        """Images per domain in one optimizer step: per-rank batch x ranks x accumulation."""
        return self.config.data.batch_size * self.dist.world_size * self.config.distributed.grad_accum

    def images_per_step(self) -> int:
        return self.global_batch() * (2 if self.adapts else 1)

    def fit(self) -> dict:
        """Train to train.steps (or until SIGTERM / Ctrl-C) and return the summary; "stopped" is set when
        a stop signal ended the run early, after its checkpoint."""
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
        show = self.dist.is_main
        if show:
            print(f"global batch {self.global_batch()} per domain = {config.data.batch_size} per rank x "
                  f"{self.dist.world_size} ranks x {config.distributed.grad_accum} accumulation", flush=True)
        if self.step == total and show:
            print(f"{self.output_dir} already finished its {total} steps; evaluating its last checkpoint "
                  "(raise train.steps to train on)", flush=True)
        progress_display = Progress(total=total, initial=self.step, desc=config.method, enabled=show)
        metrics = MetricsLogger(self.tracker, progress_display, log_every=config.train.log_every, total_steps=total,
                                images_per_step=self.images_per_step(), totals=self.totals)
        try:
            while self.step < total:
                started, waited = time.perf_counter(), self._data_wait()
                terms = self.train_step()
                self._count_nonfinite(terms is None, progress_display)
                metrics.after_step(self.step, terms, started=started,
                                   data_wait=self._data_wait() - waited,
                                   extra={"lr": self.optimizer.param_groups[0]["lr"],
                                          "skipped_steps": self.skipped_steps})
                if self.evaluator.due(self.step):
                    progress_display.write(f"step {self.step}: target accuracy {self.validate().overall:.2f}%")
                if self.checkpointer.due(self.step) or self.stop_agreed:
                    self.save()
                if self.stop_agreed and self.step < total:
                    return self._stopped_summary()
        finally:
            progress_display.close()
        if self.last_accuracy is None:  # resumed at the final step: nothing trained, still report
            self.validate()
        return self._write_summary()

    def _data_wait(self) -> float:
        return self.source_loader.data_wait_seconds + self.target_loader.data_wait_seconds

    def _count_nonfinite(self, skipped: bool, progress_display: Progress) -> None:
        if not skipped:
            self.nonfinite_streak = 0
            return
        self.skipped_steps += 1
        self.nonfinite_streak += 1
        progress_display.write(f"step {self.step}: loss is NaN/inf on some rank; step skipped "
                               f"({self.nonfinite_streak} in a row, {self.skipped_steps} in this run)")
        limit = self.config.train.max_nonfinite_steps
        if self.nonfinite_streak >= limit:
            last_good = self.checkpointer.last_good()
            raise NonFiniteLossError(
                f"the loss was NaN/inf for {limit} steps in a row (steps {self.step - limit + 1}-{self.step}, "
                f"train.max_nonfinite_steps={limit}); the last good checkpoint is {last_good or 'none saved yet'}"
            )

    def _stopped_summary(self) -> dict:
        """What a run stopped by a signal reports: where it stopped and where it saved."""
        signal_name = self.stop.received.name if self.stop.received else "a stop signal on another rank"
        saved = self.checkpointer.saved_step == self.step
        return {"stopped": signal_name, "step": self.step, "method": self.config.method,
                "checkpoint": str(checkpoint.checkpoint_dir(self.output_dir) / checkpoint.step_tag(self.step))
                if saved else None,
                "mlflow_run_id": self.tracker.run_id}

    def plain_model(self) -> torch.nn.Module:
        """A copy of the trained model outside DeepSpeed (fp32, on the CPU, in eval mode): what is logged
        to MLflow, loadable anywhere without the engine or a process group."""
        model = model_from_config(self.config, self.num_classes, load_pretrained=False)
        model.load_state_dict({name: value.detach().float().cpu() if value.is_floating_point() else value.cpu()
                               for name, value in self.model.state_dict().items()})
        return model.eval()

    def _write_summary(self) -> dict:
        """metrics.json and the run's closing MLflow metrics; training time and images/s are totals over
        every session of the run, resumes included."""
        accuracy = self.last_accuracy
        analysis = self.analyst.at_end(self.model, self.step, self.last_predictions)
        summary = {
            "target_acc": accuracy.overall,
            "per_class_acc": dict(zip(self.target.classes, accuracy.per_class)),
            "step": self.step,
            "method": self.config.method,
            "seed": self.config.seed,
            "world_size": self.dist.world_size,
            "train_seconds": round(self.totals.train_seconds, 2),
            "images_per_sec": round(self.totals.images_per_sec, 1),
            "mlflow_run_id": self.tracker.run_id,
            "tracking_uri": self.tracker.uri if self.tracker.active else None,
            **analysis,
        }
        self.tracker.log_metrics({"train_seconds": self.totals.train_seconds,
                                  "mean_images_per_sec": self.totals.images_per_sec}, step=self.step)
        if self.config.tracking.log_model and self.tracker.active:
            self.tracker.log_model(self.plain_model(), self.output_dir / "config.yaml", self.target.classes,
                                   register_as=self.config.tracking.register_model)
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
    print(f"target accuracy: {summary['target_acc']:.2f}% after {summary['step']} steps ({summary['method']}; "
          f"{summary['train_seconds']:.0f} s of training, {summary['images_per_sec']:.0f} images/s)")
    if summary.get("tracking_uri"):
        print(f"MLflow run {summary['mlflow_run_id']}; open the UI with:\n  {ui_command(summary['tracking_uri'])}")
