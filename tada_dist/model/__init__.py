"""The TADA model: backbones, gradient reversal, domain discriminators and the assembled network."""

from tada_dist.lazy import lazy_exports

from .options import BACKBONES, METHODS, POOLINGS, MethodParts, method_parts

_EXPORTS = {
    "ModelError": ".backbone",
    "create_backbone": ".backbone",
    "DomainDiscriminator": ".discriminators",
    "RegionDiscriminators": ".discriminators",
    "GradientReversal": ".grl",
    "GradientReversalFunction": ".grl",
    "TADA": ".tada",
    "create_model": ".tada",
}
__all__ = ["BACKBONES", "METHODS", "POOLINGS", "MethodParts", "method_parts", *_EXPORTS]
__getattr__ = lazy_exports(__name__, _EXPORTS)
