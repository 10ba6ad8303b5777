"""TADA's losses, one function per equation of the paper, and the total objective (eq. 9).

Domain labels: 1 = source, 0 = target. Every loss is computed in fp32, whatever the model's dtype.

Sign convention: eq. 9 is C = L_y + gamma L_h - lambda (L_g + L_l), minimised by the features and
maximised by the discriminators. tada_objective returns L_y + gamma L_h + lambda (L_g + L_l) for
every parameter to minimise; the gradient reversal layers in front of the discriminators supply the
minus sign for the layers below them. The GRL coefficient follows schedules.grl_schedule(p) and
lambda appears only here, so lambda is not counted twice (see tada_dist.schedules).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import tada_kernels
from tada_dist.model import method_parts


@dataclass
class LossWeights:
    """Trade-offs of eq. 9; the paper uses lambda = 1 and gamma = 0.1 throughout."""

    adaptation: float = 1.0  # lambda, on L_g + L_l
    entropy: float = 0.1  # gamma, on L_h


def local_adversarial_loss(region_logits: Tensor, domain_labels: Tensor) -> Tensor:
    """Eq. 2: L_l = 1/(K n) sum_k sum_i BCE(G_d^k(f_i^k), d_i); region_logits [n, K], domain_labels [n]."""
    labels = domain_labels.float().unsqueeze(1).expand_as(region_logits)
    return F.binary_cross_entropy_with_logits(region_logits.float(), labels)


def global_adversarial_loss(global_logits: Tensor, domain_labels: Tensor) -> Tensor:
    """Eq. 5: L_g = 1/n sum_i BCE(G_d(G_b(h_i)), d_i); global_logits [n], domain_labels [n]."""
    return F.binary_cross_entropy_with_logits(global_logits.float(), domain_labels.float())


def attentive_entropy_loss(
    class_logits: Tensor, global_logits: Tensor, *, detach: bool = True, unit: str = "nats", backend: str = "auto"
) -> Tensor:
    """Eq. 7: L_h = 1/n sum_i m_i H(p_i) with m_i = 1 + H(d_i) (eq. 6), over source and target images.

    detach stops gradients through m (the default: m conditions the loss, as the thuml code detaches
    its conditioning weights); unit is the unit of H(d_i); backend is the tada_kernels backend.
    """
    return tada_kernels.attentive_entropy(class_logits, global_logits, detach=detach, unit=unit, backend=backend)


def entropy_loss(class_logits: Tensor) -> Tensor:
    """Plain entropy minimisation (Grandvalet & Bengio 2005), eq. 7 with m_i = 1: the entropy module
    of TADA (local), which has no global discriminator to weight it."""
    log_probs = class_logits.float().log_softmax(dim=1)
    return -(log_probs.exp() * log_probs).sum(dim=1).mean()


def classification_loss(class_logits_source: Tensor, labels: Tensor) -> Tensor:
    """Eq. 8: L_y = 1/n_s sum_i CE(G_y(G_b(h_i)), y_i), on the labelled source images only."""
    return F.cross_entropy(class_logits_source.float(), labels)


def tada_objective(
    outputs: dict[str, Tensor],
    source_labels: Tensor,
    weights: LossWeights,
    *,
    method: str,
    detach_attention: bool = True,
    entropy_unit: str = "nats",
    backend: str = "auto",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 9 for `method`, from the outputs of TADA.forward. Returns (total, terms).

    source_only: L_y                          dann: L_y + lambda L_g
    tada_local:  L_y + gamma H + lambda L_l   tada_global: L_y + gamma L_h + lambda L_g
    tada:        L_y + gamma L_h + lambda (L_g + L_l)
    (H: plain entropy, L_h: attentive entropy.) terms holds detached scalars: "loss", "cls", and
    "local", "global", "entropy" where used.
    """
    parts = method_parts(method)
    terms = {"cls": classification_loss(outputs["class_logits_source"], source_labels)}
    if parts.local_attention:
        terms["local"] = local_adversarial_loss(outputs["region_logits"], outputs["domain_labels"])
    if parts.global_discriminator:
        terms["global"] = global_adversarial_loss(outputs["global_logits"], outputs["domain_labels"])
    if parts.entropy and parts.global_discriminator:
        terms["entropy"] = attentive_entropy_loss(
            outputs["class_logits"], outputs["global_logits"], detach=detach_attention, unit=entropy_unit,
            backend=backend,
        )
    elif parts.entropy:
        terms["entropy"] = entropy_loss(outputs["class_logits"])

    total = terms["cls"]
    adversarial = [terms[name] for name in ("local", "global") if name in terms]
    if adversarial:
        total = total + weights.adaptation * torch.stack(adversarial).sum()
    if "entropy" in terms:
        total = total + weights.entropy * terms["entropy"]

    terms = {name: value.detach() for name, value in terms.items()}
    return total, {"loss": total.detach(), **terms}
