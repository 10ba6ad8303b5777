"""The TADA network (paper Fig. 1) and its ablations as switches on one model.

One training step, top to bottom:

    x = cat(x_source, x_target)          one batch, so BatchNorm sees one set of statistics
    f = G_f(x)                           [B, C, h, w], K = h * w regions
    local attention:  d_k = G_d^k(GRL(f)), h = (1 + w) * f with w = 1 - H(d_k)   (eq. 2-4)
    z = G_b(pool(h))                     bottleneck features; pool averages the map (ResNets) or
                                         flattens it (the digits LeNet, whose head reads all 768 values)
    class logits = G_y(z)
    global attention: d = G_d(GRL(z))                                             (eq. 5, 6)

The losses (tada_dist.losses) turn these outputs into eq. 9.
"""

import torch
from torch import Tensor, nn

import tada_kernels

from .backbone import create_backbone
from .discriminators import DomainDiscriminator, RegionDiscriminators, mlp
from .grl import GradientReversal
from .options import POOLINGS, method_parts


def bottleneck(in_features: int, width: int, *, layers: int, batchnorm: bool, dropout: float) -> nn.Module:
    """G_b: `layers` times Linear (+ BatchNorm) + ReLU (+ Dropout). One layer with BatchNorm and no
    dropout is the thuml ResNet bottleneck. Zero layers is no bottleneck (the textbook digits network,
    whose domain classifier reads the flattened features themselves)."""
    if layers == 0:
        return nn.Identity()
    modules: list[nn.Module] = []
    for index in range(layers):
        modules.append(nn.Linear(in_features if index == 0 else width, width))
        if batchnorm:
            modules.append(nn.BatchNorm1d(width))
        modules.append(nn.ReLU(inplace=True))
        if dropout > 0:
            modules.append(nn.Dropout(dropout))
    return nn.Sequential(*modules)


class TADA(nn.Module):
    """Backbone, optional local attention, bottleneck, classifier, optional global discriminator."""

    def __init__(
        self,
        *,
        method: str,
        backbone: nn.Module,
        feature_channels: int,
        map_size: tuple[int, int],
        num_classes: int,
        pooling: str,
        bottleneck: nn.Module,
        feature_dim: int,
        classifier_hidden: int,
        classifier_layers: int,
        region_hidden: int,
        global_hidden: int,
        global_layers: int,
        discriminator_dropout: float,
        attention: str,
        entropy_unit: str,
        detach_attention: bool,
        kernels_backend: str,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; allowed: {', '.join(POOLINGS)}")
        self.method = method
        self.parts = method_parts(method)
        self.map_size = tuple(map_size)
        self.num_regions = map_size[0] * map_size[1]
        self.pooling = pooling
        self.attention = attention
        self.entropy_unit = entropy_unit
        self.detach_attention = detach_attention
        self.kernels_backend = kernels_backend
        tada_kernels.attention_coefficients(attention, entropy_unit)  # reject an unknown form or unit now

        self.backbone = backbone
        if self.parts.local_attention:
            self.local_grl = GradientReversal()
            self.region_discriminators = RegionDiscriminators(
                self.num_regions, feature_channels, region_hidden, discriminator_dropout, backend=kernels_backend
            )
        self.bottleneck = bottleneck
        # G_y: a Linear on the bottleneck (thuml), or the textbook digits head FC 100 -> FC 100 -> classes.
        if classifier_layers == 0:
            self.classifier = nn.Linear(feature_dim, num_classes)
        else:
            self.classifier = nn.Sequential(*mlp(feature_dim, classifier_hidden, classifier_layers, num_classes))
        if self.parts.global_discriminator:
            self.global_grl = GradientReversal()
            self.global_discriminator = DomainDiscriminator(
                feature_dim, global_hidden, discriminator_dropout, layers=global_layers
            )

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

    def inspect(self, x: Tensor) -> dict[str, Tensor]:
        """What the analysis looks at, for evaluation (model.eval()): "logits" [B, classes], "features"
        G_b(h) [B, dim], and with local attention "region_logits" [B, K], "attention" w [B, K] and
        "region_entropy" H(d_k) [B, K] in nats."""
        features, region_logits = self._embed(x)
        outputs = {"logits": self.classifier(features), "features": features}
        if region_logits is not None:
            entropy = tada_kernels.binary_entropy_with_logits(region_logits.float())
            offset, slope = tada_kernels.attention_coefficients(self.attention, self.entropy_unit)
            outputs.update(region_logits=region_logits, attention=offset + slope * entropy, region_entropy=entropy)
        return outputs

    def _embed(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Images -> (bottleneck features G_b(h) [B, bottleneck_dim], region logits [B, K] or None)."""
        feature_map = self.backbone(x)
        height, width = feature_map.shape[2:]
        if (height, width) != self.map_size:
            raise ValueError(
                f"the backbone map is {height}x{width} = {height * width} regions, but the model was built "
                f"for a {self.map_size[0]}x{self.map_size[1]} map (K = {self.num_regions}); create the model "
                "with the image_size you feed it"
            )
        if not self.parts.local_attention:
            pooled = feature_map.mean(dim=(2, 3)) if self.pooling == "avg" else feature_map.flatten(1)
            return self.bottleneck(pooled), None
        # [B, C, h, w] -> [B, K, C] as a strided view (no copy; contiguous for a channels-last map).
        regions = self.local_grl(feature_map).flatten(2).transpose(1, 2)
        region_logits = self.region_discriminators(regions)
        attention = dict(detach=self.detach_attention, form=self.attention, unit=self.entropy_unit,
                         backend=self.kernels_backend)
        if self.pooling == "avg":  # h = (1 + w) * f is only averaged: pool it without writing it
            pooled, _ = tada_kernels.attention_pool(feature_map, region_logits, **attention)
        else:
            attended, _ = tada_kernels.entropy_attention(feature_map, region_logits, **attention)
            pooled = attended.flatten(1)
        return self.bottleneck(pooled), region_logits


# Region discriminator width when none is given: the paper's 1024 for ResNets, smaller for the
# digits networks whose regions have 48 or 128 channels.
DEFAULT_REGION_HIDDEN = {"lenet": 100, "small_cnn": 64}


def create_model(
    *,
    method: str,
    backbone: str,
    num_classes: int,
    image_size: int,
    pretrained: str | None = None,
    pooling: str = "avg",
    bottleneck_dim: int = 256,
    bottleneck_layers: int = 1,
    bottleneck_batchnorm: bool = True,
    bottleneck_dropout: float = 0.0,
    classifier_hidden: int = 0,
    classifier_layers: int = 0,
    region_hidden: int | None = None,
    global_hidden: int = 1024,
    global_layers: int = 2,
    discriminator_dropout: float = 0.5,
    attention: str = "paper",
    entropy_unit: str = "nats",
    detach_attention: bool = True,
    kernels_backend: str = "auto",
) -> TADA:
    """Build TADA for `method` on `backbone` (see backbone.BACKBONES).

    image_size: the side of the square training images; it fixes the feature-map size and so the
    number K of region discriminators (and, with pooling "flatten", the bottleneck's input width).
    region_hidden defaults to 1024 for ResNets (the paper's setting), 100 for lenet and 64 for small_cnn.
    """
    method_parts(method)  # an unknown method fails before a backbone is built
    feature_extractor, channels = create_backbone(backbone, pretrained=pretrained)
    height, width = _feature_map_size(feature_extractor, image_size)
    if region_hidden is None:
        region_hidden = DEFAULT_REGION_HIDDEN.get(backbone, 1024)
    pooled_features = channels * height * width if pooling == "flatten" else channels
    feature_dim = bottleneck_dim if bottleneck_layers > 0 else pooled_features
    return TADA(
        method=method,
        backbone=feature_extractor,
        feature_channels=channels,
        map_size=(height, width),
        num_classes=num_classes,
        pooling=pooling,
        bottleneck=bottleneck(pooled_features, bottleneck_dim, layers=bottleneck_layers,
                              batchnorm=bottleneck_batchnorm, dropout=bottleneck_dropout),
        feature_dim=feature_dim,
        classifier_hidden=classifier_hidden,
        classifier_layers=classifier_layers,
        region_hidden=region_hidden,
        global_hidden=global_hidden,
        global_layers=global_layers,
        discriminator_dropout=discriminator_dropout,
        attention=attention,
        entropy_unit=entropy_unit,
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
