"""SGD for TADA with the paper's learning-rate split.

"Whatever module trained from scratch, its learning rate was set to be 10 times that of the lower
layers": the (pretrained) backbone trains at base_lr; the bottleneck, classifier and discriminators
at base_lr * new_layer_mult.
"""

import torch
from torch import nn


def parameter_groups(
    model: nn.Module, base_lr: float, new_layer_mult: float = 10.0, weight_decay: float = 5e-4
) -> list[dict]:
    """Two SGD parameter groups, "backbone" and "new_layers", each with its lr and an "lr_mult" key.

    model must have a `backbone` submodule (TADA does). "lr_mult" records the ratio to base_lr for
    schedulers that set learning rates themselves.
    """
    backbone_ids = {id(param) for param in model.backbone.parameters()}
    backbone, new_layers = [], []
    for param in model.parameters():
        if param.requires_grad:
            (backbone if id(param) in backbone_ids else new_layers).append(param)
    return [
        {"name": "backbone", "params": backbone, "lr": base_lr, "lr_mult": 1.0, "weight_decay": weight_decay},
        {
            "name": "new_layers",
            "params": new_layers,
            "lr": base_lr * new_layer_mult,
            "lr_mult": new_layer_mult,
            "weight_decay": weight_decay,
        },
    ]


def create_optimizer(
    model: nn.Module,
    base_lr: float,
    momentum: float = 0.95,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    new_layer_mult: float = 10.0,
) -> torch.optim.SGD:
    """SGD with momentum 0.95 (the paper), Nesterov and weight decay 5e-4 (the thuml code), over parameter_groups."""
    groups = parameter_groups(model, base_lr, new_layer_mult, weight_decay)
    return torch.optim.SGD(groups, lr=base_lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
