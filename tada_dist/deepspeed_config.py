"""The DeepSpeed config, generated from ours so that batch sizes, precision and ZeRO live in one place."""

from __future__ import annotations

from tada_dist.config import Config

# DeepSpeed prints throughput every `steps_per_print`; our progress bar and MLflow already report it.
_QUIET = 10**9


def deepspeed_config(config: Config, world_size: int) -> dict:
    micro_batch = config.data.batch_size
    accumulation = config.distributed.grad_accum
    bf16 = config.distributed.precision == "bf16"
    # With ZeRO-1, bf16 weights and fp32 gradient accumulation DeepSpeed selects its flat BF16 optimizer.
    data_types = {"data_types": {"grad_accum_dtype": "fp32"}} if bf16 and config.distributed.zero_stage == 1 else {}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch * accumulation * world_size,
        "gradient_clipping": config.optim.grad_clip,
        "bf16": {"enabled": bf16},
        **data_types,
        "zero_optimization": {"stage": config.distributed.zero_stage},
        # Our SGD with per-group learning rates is not on DeepSpeed's list of ZeRO-tested optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _QUIET,
        "wall_clock_breakdown": False,
    }
