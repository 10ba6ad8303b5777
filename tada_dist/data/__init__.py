"""Data domains, sharded resumable sampling, and DALI / torchvision loaders for training and evaluation."""

from .domain import IMAGE_EXTENSIONS, DataError, Domain, check_same_classes, load_domain
from .loader import BACKENDS, DEVICES, EvalLoader, TrainLoader, create_eval_loader, create_train_loader
from .sampler import ShardedSampler
from .synthetic import ensure_synthetic_dataset
from .transforms import TransformSpec

__all__ = [
    "BACKENDS",
    "DEVICES",
    "IMAGE_EXTENSIONS",
    "DataError",
    "Domain",
    "EvalLoader",
    "ShardedSampler",
    "TrainLoader",
    "TransformSpec",
    "check_same_classes",
    "create_eval_loader",
    "create_train_loader",
    "ensure_synthetic_dataset",
    "load_domain",
]
