"""The TADA model: backbones, gradient reversal, domain discriminators and the assembled network."""

from .backbone import BACKBONES, ModelError, create_backbone
from .discriminators import DomainDiscriminator, RegionDiscriminators
from .grl import GradientReversal, GradientReversalFunction
from .tada import METHODS, TADA, MethodParts, create_model, method_parts

__all__ = [
    "BACKBONES",
    "METHODS",
    "TADA",
    "DomainDiscriminator",
    "GradientReversal",
    "GradientReversalFunction",
    "MethodParts",
    "ModelError",
    "RegionDiscriminators",
    "create_backbone",
    "create_model",
    "method_parts",
]
