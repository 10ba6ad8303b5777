"""Data domains, sharded resumable sampling, and DALI / torchvision loaders for training and evaluation."""

from tada_dist.lazy import lazy_exports

from .options import DEVICES, LOADER_BACKENDS as BACKENDS

_EXPORTS = {
    "IMAGE_EXTENSIONS": ".domain",
    "DataError": ".domain",
    "Domain": ".domain",
    "check_same_classes": ".domain",
    "load_domain": ".domain",
    "EvalLoader": ".loader",
    "TrainLoader": ".loader",
    "create_eval_loader": ".factory",
    "create_train_loader": ".factory",
    "ShardedSampler": ".sampler",
    "ensure_synthetic_dataset": ".synthetic",
    "TransformSpec": ".transforms",
}
__all__ = ["BACKENDS", "DEVICES", *_EXPORTS]
__getattr__ = lazy_exports(__name__, _EXPORTS)
