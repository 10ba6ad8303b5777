"""Attentive entropy (paper eq. 6, 7): each image's prediction entropy weighted by m = 1 + H(d).

d = sigmoid(global logit) is the global discriminator's domain prediction for the image. Images the
discriminator cannot tell apart (d near 1/2) get m up to 1 + ln 2, so minimising L_h sharpens the
predictions of the images that already look alike across domains the most.
"""

from torch import Tensor

from .backend import resolve_backend
from .entropy_attention import binary_entropy_with_logits


def attentive_entropy(
    class_logits: Tensor, domain_logits: Tensor, *, detach: bool = True, backend: str = "auto"
) -> Tensor:
    """mean_i (1 + H(sigmoid(domain_logits[i]))) * H(softmax(class_logits[i])), an fp32 scalar.

    class_logits [n, c], domain_logits [n]; entropies in nats. With `detach`, m is cut from the graph
    so this loss trains the classifier and features only, never the global discriminator.
    """
    if class_logits.dim() != 2:
        raise ValueError(f"attentive_entropy: class_logits must be [n, classes], got {list(class_logits.shape)}")
    if tuple(domain_logits.shape) != (class_logits.shape[0],):
        raise ValueError(
            f"attentive_entropy: domain_logits must be [n] = [{class_logits.shape[0]}], got {list(domain_logits.shape)}"
        )
    resolve_backend(backend)  # only the eager implementation exists in this build

    attention = 1.0 + binary_entropy_with_logits(domain_logits.float())
    if detach:
        attention = attention.detach()
    # log_softmax stays finite for saturated logits, and p = 0 there, so p * log p = 0 instead of NaN.
    log_probs = class_logits.float().log_softmax(dim=1)
    prediction_entropy = -(log_probs.exp() * log_probs).sum(dim=1)
    return (attention * prediction_entropy).mean()
