"""Feature extractors G_f: images [B, 3, S, S] -> last convolutional feature map [B, C, h, w].

TADA needs the map itself, not a pooled vector: each of its K = h * w positions is a region with its
own discriminator (eq. 2). So the torchvision ResNets are kept up to layer4 and lose avgpool and fc.
"""

from collections import OrderedDict
from pathlib import Path

import torch
import torchvision
from torch import nn

from .options import BACKBONES


class ModelError(ValueError):
    """A backbone or its pretrained weights cannot be built as asked."""


class ResNetTrunk(nn.Sequential):
    """A torchvision ResNet without avgpool and fc.

    The children keep torchvision's names (conv1, bn1, layer1, ...), so ImageNet state dicts load
    into it once their fc.* entries are dropped.
    """

    def __init__(self, resnet: torchvision.models.ResNet):
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        super().__init__(OrderedDict((name, getattr(resnet, name)) for name in names))


def small_cnn() -> nn.Sequential:
    """Three conv blocks for 28x28 digits and the synthetic data: 28x28 -> 128 x 7 x 7.

    K = 49 regions, the same as ResNet-50 at 224 pixels.
    """

    def block(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
        return [
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        ]

    return nn.Sequential(
        *block(3, 32, 5), nn.MaxPool2d(2),
        *block(32, 64, 5), nn.MaxPool2d(2),
        *block(64, 128, 3),
    )


def lenet() -> nn.Sequential:
    """The digits network of the published MNIST -> MNIST-M baselines (Ganin & Lempitsky 2015), up to
    its flattened features: conv 5x5 32 -> maxpool -> conv 5x5 48 -> maxpool, ReLU after each pool,
    no BatchNorm, no padding. 28x28 -> 48 x 4 x 4, so K = 16 regions and 768 flattened features; the
    published network's FC 100 -> FC 100 -> classes head is the model's bottleneck and classifier.
    """
    return nn.Sequential(
        nn.Conv2d(3, 32, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        nn.Conv2d(32, 48, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
    )


def create_backbone(name: str, *, pretrained: str | None = None) -> tuple[nn.Module, int]:
    """Return (module, C): module maps [B, 3, S, S] images to [B, C, h, w] feature maps.

    pretrained: None (random init), a torchvision weights name such as "IMAGENET1K_V1" (downloaded
    by torchvision), or the path of a local .pth state dict of the matching torchvision ResNet.
    """
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; allowed: {', '.join(BACKBONES)}")
    if name in ("lenet", "small_cnn"):
        if pretrained is not None:
            raise ModelError(f"backbone {name} has no pretrained weights, got pretrained={pretrained!r}; use None")
        return (lenet(), 48) if name == "lenet" else (small_cnn(), 128)

    if pretrained is None:
        resnet = torchvision.models.get_model(name, weights=None)
    elif _is_path(pretrained):
        resnet = _resnet_from_file(name, Path(pretrained))
    else:
        resnet = _resnet_from_torchvision(name, pretrained)
    return ResNetTrunk(resnet), resnet.fc.in_features


def _is_path(pretrained: str) -> bool:
    # torchvision weights names are bare identifiers (IMAGENET1K_V2, DEFAULT); anything with a
    # directory part or a file extension is a file.
    return "/" in pretrained or Path(pretrained).suffix != ""


def _resnet_from_torchvision(name: str, weights: str) -> torchvision.models.ResNet:
    available = list(torchvision.models.get_model_weights(name).__members__)
    if weights not in available:
        raise ModelError(
            f"unknown torchvision weights {weights!r} for {name}; allowed: {', '.join(available)} or a .pth path"
        )
    try:
        return torchvision.models.get_model(name, weights=weights)
    except OSError as error:  # urllib's URLError is an OSError: no network, proxy, DNS
        url = torchvision.models.get_model_weights(name)[weights].url
        reason = getattr(error, "reason", error)
        raise ModelError(
            f"could not download torchvision weights {weights!r} for {name} ({reason}); download {url} on a "
            f"machine with network access and pass the file: model.pretrained=/path/to/{Path(url).name}"
        ) from error


def _resnet_from_file(name: str, path: Path) -> torchvision.models.ResNet:
    if not path.is_file():
        raise ModelError(f"pretrained weights file not found: {path}")
    resnet = torchvision.models.get_model(name, weights=None)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds a {type(state).__name__}, expected a {name} state dict")
    # The classifier head is discarded anyway, so checkpoints with or without fc.* both load.
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    try:
        ResNetTrunk(resnet).load_state_dict(state)
    except RuntimeError as error:  # missing, unexpected or mis-shaped keys, one per line
        first_problem = str(error).splitlines()[1].strip()
        if len(first_problem) > 200:
            first_problem = first_problem[:200] + "..."
        raise ModelError(f"{path} is not a {name} state dict: {first_problem}") from error
    return resnet
