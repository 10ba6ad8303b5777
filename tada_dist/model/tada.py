"""The TADA network (paper Fig. 1) and its ablations as switches on one model.

One training step, top to bottom (DESIGN.md "Data flow of one training step"):

    x = cat(x_source, x_target)          one batch, so BatchNorm sees one set of statistics
    f = G_f(x)                           [B, C, h, w], K = h * w regions
    local attention:  d_k = G_d^k(GRL(f)), h = (1 + w) * f with w = 1 - H(d_k)   (eq. 2-4)
    z = G_b(avgpool(h))                  bottleneck features
    class logits = G_y(z)
    global attention: d = G_d(GRL(z))                                             (eq. 5, 6)

The losses (tada_dist.losses) turn these outputs into eq. 9.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

import tada_kernels

from .backbone import create_backbone
from .discriminators import DomainDiscriminator, RegionDiscriminators
from .grl import GradientReversal


@dataclass(frozen=True)
class MethodParts:
    """Which parts of TADA a method trains (the ablation rows of the paper's Tables 1 and 2)."""

    local_attention: bool  # region discriminators + entropy attention on the map, L_l
    global_discriminator: bool  # image-level discriminator on the bottleneck, L_g
    attentive_entropy: bool  # L_h weighted by the global discriminator

    @property
    def adapts(self) -> bool:
        """Whether the method sees target images at all."""
        return self.local_attention or self.global_discriminator


METHODS: dict[str, MethodParts] = {
    "source_only": MethodParts(local_attention=False, global_discriminator=False, attentive_entropy=False),
    "dann": MethodParts(local_attention=False, global_discriminator=True, attentive_entropy=False),
    "tada_local": MethodParts(local_attention=True, global_discriminator=False, attentive_entropy=False),
    "tada_global": MethodParts(local_attention=False, global_discriminator=True, attentive_entropy=True),
    "tada": MethodParts(local_attention=True, global_discriminator=True, attentive_entropy=True),
}


def method_parts(method: str) -> MethodParts:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method]


class TADA(nn.Module):
    """Backbone, optional local attention, bottleneck, classifier, optional global discriminator."""

    def __init__(
        self,
        *,
        method: str,
        backbone: nn.Module,
        feature_channels: int,
        num_regions: int,
        num_classes: int,
        bottleneck_dim: int,
        region_hidden: int,
        global_hidden: int,
        dropout: float,
        detach_attention: bool,
        kernels_backend: str,
    ):
        super().__init__()
        self.method = method
        self.parts = method_parts(method)
        self.num_regions = num_regions
        self.detach_attention = detach_attention
        self.kernels_backend = kernels_backend

        self.backbone = backbone
        if self.parts.local_attention:
            self.local_grl = GradientReversal()
            self.region_discriminators = RegionDiscriminators(
                num_regions, feature_channels, region_hidden, dropout, backend=kernels_backend
            )
        # Bottleneck as in the thuml code: Linear + BatchNorm + ReLU + Dropout.
        self.bottleneck = nn.Sequential(
            nn.Linear(feature_channels, bottleneck_dim),
            nn.BatchNorm1d(bottleneck_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )
        self.classifier = nn.Linear(bottleneck_dim, num_classes)
        if self.parts.global_discriminator:
            self.global_grl = GradientReversal()
            self.global_discriminator = DomainDiscriminator(bottleneck_dim, global_hidden, dropout)

    def set_grl_coeff(self, coeff: float) -> None:
        """Set the reversal coefficient of every GRL (the trainer calls this each step with grl_schedule(p))."""
        for module in self.modules():
            if isinstance(module, GradientReversal):
                module.coeff = coeff

    def forward(self, x_source: Tensor, x_target: Tensor | None = None) -> dict[str, Tensor]:
        """Training forward. Returns a dict of outputs for tada_dist.losses.tada_objective.

        Always "class_logits_source" [Bs, classes]. Adaptation methods also return, over the
        concatenated batch of Bs + Bt images: "class_logits" [Bs+Bt, classes], "domain_labels"
        [Bs+Bt] (1.0 source, 0.0 target), and "region_logits" [Bs+Bt, K] (local attention) and/or
        "global_logits" [Bs+Bt] (global discriminator). source_only ignores x_target entirely, so
        the baseline's BatchNorm statistics never see a target image.
        """
        if not self.parts.adapts:
            features, _ = self._embed(x_source)
            return {"class_logits_source": self.classifier(features)}
        if x_target is None:
            raise ValueError(f"method {self.method!r} adapts to the target domain: pass x_target")

        num_source = x_source.shape[0]
        features, region_logits = self._embed(torch.cat([x_source, x_target]))
        class_logits = self.classifier(features)
        outputs = {
            "class_logits_source": class_logits[:num_source],
            "class_logits": class_logits,
            "domain_labels": torch.cat([
                torch.ones(num_source, device=class_logits.device),
                torch.zeros(x_target.shape[0], device=class_logits.device),
            ]),
        }
        if region_logits is not None:
            outputs["region_logits"] = region_logits
        if self.parts.global_discriminator:
            outputs["global_logits"] = self.global_discriminator(self.global_grl(features))
        return outputs

    def predict(self, x: Tensor) -> Tensor:
        """Class logits [B, classes] for evaluation; call it under model.eval() (dropout off, BN running stats)."""
        features, _ = self._embed(x)
        return self.classifier(features)

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images -> (bottleneck features G_b(h) [B, bottleneck_dim], region logits [B, K] or None)."""
        feature_map = self.backbone(x)
        region_logits = None
        if self.parts.local_attention:
            feature_map, region_logits = self._local_attention(feature_map)
        return self.bottleneck(feature_map.mean(dim=(2, 3))), region_logits

    def _local_attention(self, feature_map: Tensor) -> tuple[Tensor, Tensor]:
        _, _, height, width = feature_map.shape
        if height * width != self.num_regions:
            raise ValueError(
                f"the backbone map is {height}x{width} = {height * width} regions, but the model was built "
                f"for K = {self.num_regions}; create the model with the image_size you feed it"
            )
        # [B, C, h, w] -> [B, K, C] as a strided view (no copy; contiguous for a channels-last map).
        regions = self.local_grl(feature_map).flatten(2).transpose(1, 2)
        region_logits = self.region_discriminators(regions)
        attended, _ = tada_kernels.entropy_attention(
            feature_map, region_logits, detach=self.detach_attention, backend=self.kernels_backend
        )
        return attended, region_logits


def create_model(
    *,
    method: str,
    backbone: str,
    num_classes: int,
    image_size: int,
    pretrained: str | None = None,
    bottleneck_dim: int = 256,
    region_hidden: int | None = None,
    global_hidden: int = 1024,
    dropout: float = 0.5,
    detach_attention: bool = True,
    kernels_backend: str = "auto",
) -> TADA:
    """Build TADA for `method` on `backbone` (see backbone.BACKBONES).

    image_size: the side of the square training images; it fixes the feature-map size and so the
    number K of region discriminators. region_hidden defaults to 1024 for ResNets (the paper's
    setting) and 64 for small_cnn. dropout applies to the bottleneck and every discriminator layer.
    """
    method_parts(method)  # an unknown method fails before a backbone is built
    feature_extractor, channels = create_backbone(backbone, pretrained=pretrained)
    height, width = _feature_map_size(feature_extractor, image_size)
    if region_hidden is None:
        region_hidden = 64 if backbone == "small_cnn" else 1024
    return TADA(
        method=method,
        backbone=feature_extractor,
        feature_channels=channels,
        num_regions=height * width,
        num_classes=num_classes,
        bottleneck_dim=bottleneck_dim,
        region_hidden=region_hidden,
        global_hidden=global_hidden,
        dropout=dropout,
        detach_attention=detach_attention,
        kernels_backend=kernels_backend,
    )


def _feature_map_size(backbone: nn.Module, image_size: int) -> tuple[int, int]:
    # One dummy image in eval mode: BatchNorm neither updates its running statistics with it nor
    # needs more than one value per channel (a ResNet map can be 1x1).
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        feature_map = backbone(torch.zeros(1, 3, image_size, image_size))
    backbone.train(was_training)
    return feature_map.shape[2], feature_map.shape[3]
