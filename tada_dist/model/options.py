"""What a TADA model can be built from, and which parts each method trains; importable without torch.

This is the one place that says which terms of eq. 9 a method has: the model builds its parts from
it, the objective sums its terms from it, the config validates `method` against it.
"""

from __future__ import annotations

from dataclasses import dataclass

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONES = ("lenet", "small_cnn", *RESNETS)
POOLINGS = ("avg", "flatten")


@dataclass(frozen=True)
class MethodParts:
    """Which parts of TADA a method trains (the ablation rows of the paper's Tables 1 and 2)."""

    local_attention: bool  # region discriminators + entropy attention on the map, L_l
    global_discriminator: bool  # image-level discriminator on the bottleneck, L_g
    entropy: bool  # L_h: weighted by the global attention m (eq. 6) with a global discriminator, plain otherwise

    @property
    def adapts(self) -> bool:
        """Whether the method sees target images at all."""
        return self.local_attention or self.global_discriminator


# The paper's ablation: "TADA (local) [is] the combination of classification, local attention and
# entropy modules, and TADA (global) the combination of classification, global attention and
# attentive entropy modules". Without a global discriminator there is no m, so tada_local's entropy is plain.
METHODS: dict[str, MethodParts] = {
    "source_only": MethodParts(local_attention=False, global_discriminator=False, entropy=False),
    "dann": MethodParts(local_attention=False, global_discriminator=True, entropy=False),
    "tada_local": MethodParts(local_attention=True, global_discriminator=False, entropy=True),
    "tada_global": MethodParts(local_attention=False, global_discriminator=True, entropy=True),
    "tada": MethodParts(local_attention=True, global_discriminator=True, entropy=True),
}


def method_parts(method: str) -> MethodParts:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method]
