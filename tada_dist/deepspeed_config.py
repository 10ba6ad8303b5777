"""The DeepSpeed config, generated from ours so that batch sizes, precision and ZeRO live in one place."""

from __future__ import annotations

from tada_dist.config import Config

# DeepSpeed prints throughput every `steps_per_print`; our progress bar and MLflow already report it.
_QUIET = 10**9


def deepspeed_config(config: Config, world_size: int) -> dict:
    micro_batch = config.data.batch_size
    accumulation = config.distributed.grad_accum
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": config.optim.grad_clip,
        "bf16": {"enabled": config.distributed.precision == "bf16"},
        "zero_optimization": {"stage": config.distributed.zero_stage},
        # Our SGD with per-group learning rates is not on DeepSpeed's list of ZeRO-tested optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _QUIET,
        "wall_clock_breakdown": False,
    }
