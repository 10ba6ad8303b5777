"""tada_kernels Triton backend against float64 references: values and every gradient, odd shapes,
both x layouts, fp32 and bf16, dropout masks, saturated logits, the model behind its GRLs, a training run.

Without a GPU, tests/conftest.py switches the Triton interpreter on, and the tensors live on the CPU;
with one, `pytest tests/test_kernels_triton.py` runs the same checks on the compiled kernels.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from tada_dist.data.synthetic import ensure_synthetic_dataset
from tada_dist.losses import LossWeights, tada_objective
from tada_dist.model import GradientReversal, create_model
from tada_kernels import attention_pool, attentive_entropy, entropy_attention, grouped_mlp

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# The largest error allowed, relative to the largest magnitude of the float64 reference.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def assert_matches(actual, expected, dtype, what):
    tol = TOLERANCE[dtype]
    actual, expected = actual.detach().double().cpu(), expected.detach().cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


# -- grouped_mlp ------------------------------------------------------------------------------


def make_weights(K, C, H, dtype=torch.float32, seed=0, *, margin=False):
    """nn.Linear-like random weights. With `margin`, every pre-activation stays near a bias of +-1:
    rounding to bf16 then cannot move one across the ReLU (which would rightly switch that unit on or
    off entirely and defeat an elementwise comparison), yet half the units are still gated off."""
    g = torch.Generator().manual_seed(seed)
    gain = 0.1 if margin else 1.0

    def bias(*shape):
        values = torch.randn(*shape, generator=g)
        return values.sign() if margin else values * 0.1

    weights = [
        torch.randn(K, C, H, generator=g) * gain / math.sqrt(C),
        bias(K, H),
        torch.randn(K, H, H, generator=g) * gain / math.sqrt(H),
        bias(K, H),
        torch.randn(K, H, generator=g) / math.sqrt(H),
        torch.randn(K, generator=g) * 0.1,
    ]
    return [w.to(DEVICE, dtype).requires_grad_() for w in weights]


def make_regions(B, K, C, layout, dtype, seed=1):
    """(leaf, x): x [B, K, C] is the leaf itself or the channels-last view of a [B, C, h, w] map."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        leaf = torch.randn(B, K, C, generator=g).to(DEVICE, dtype).requires_grad_()
        return leaf, leaf
    height = int(math.isqrt(K))
    height = height if height * height == K else 1
    leaf = torch.randn(B, C, height, K // height, generator=g).to(DEVICE, dtype)
    leaf = leaf.contiguous(memory_format=torch.channels_last).requires_grad_()
    return leaf, leaf.flatten(2).transpose(1, 2)


def reference_mlp(x, w1, b1, w2, b2, w3, b3, masks=(None, None), p=0.0):
    """The definition in float64 on x [B, K, C]; masks [B, K, H] stand in for each layer's dropout."""
    hidden = x
    for (w, b), mask in zip(((w1, b1), (w2, b2)), masks):
        hidden = torch.relu(torch.einsum("bkc,kch->bkh", hidden, w) + b)
        if mask is not None:
            hidden = hidden * mask / (1.0 - p)
    return torch.einsum("bkh,kh->bk", hidden, w3) + b3


def float64_copies(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def check_grouped_mlp(B, K, C, H, layout, dtype, weight_dtype, dropout=0.0, seed=None):
    leaf, x = make_regions(B, K, C, layout, dtype)
    weights = make_weights(K, C, H, weight_dtype, margin=dtype != torch.float32)
    leaf64, *weights64 = float64_copies([leaf, *weights])
    x64 = leaf64 if layout == "contiguous" else leaf64.flatten(2).transpose(1, 2)

    logits = grouped_mlp(x, *weights, dropout=dropout, training=dropout > 0, seed=seed, backend="triton")
    masks = dropout_masks(seed, dropout, B, K, H) if dropout > 0 else (None, None)
    expected = reference_mlp(x64, *weights64, masks=masks, p=dropout)
    assert logits.dtype == torch.float32 and logits.shape == (B, K)
    assert_matches(logits, expected, dtype, "logits")

    upstream = torch.randn(B, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    logits.backward(upstream.to(DEVICE, torch.float32))
    expected.backward(upstream)
    for name, ours, theirs in zip(["x", "w1", "b1", "w2", "b2", "w3", "b3"], [leaf, *weights], [leaf64, *weights64]):
        assert ours.grad.dtype == ours.dtype, name
        assert_matches(ours.grad, theirs.grad, dtype, f"grad of {name}")
    if layout == "channels_last_view":  # the gradient of a channels-last map comes back channels-last
        assert leaf.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_view"])
@pytest.mark.parametrize(("B", "K"), [(7, 1), (7, 3), (7, 49), (37, 3)])
def test_grouped_mlp_matches_float64_reference(B, K, layout, dtype):
    # bf16 activations with fp32 master weights: the mixed-precision training setup.
    check_grouped_mlp(B, K, 96, 40, layout, dtype, weight_dtype=torch.float32)


def test_grouped_mlp_bf16_weights_give_bf16_gradients():
    check_grouped_mlp(7, 3, 96, 40, "channels_last_view", torch.bfloat16, weight_dtype=torch.bfloat16)


@triton.jit
def _keep_mask_kernel(out_ptr, seed, p, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, (tl.rand(seed, offsets) >= p).to(tl.int8), mask=offsets < n)


def dropout_masks(seed, p, B, K, H):
    """The documented masks: layer l keeps unit (k, b, n) when tl.rand(2 seed + l - 1, (k B + b) H + n) >= p."""
    masks = []
    for layer_seed in (2 * seed, 2 * seed + 1):
        keep = torch.empty(K * B * H, dtype=torch.int8, device=DEVICE)
        _keep_mask_kernel[(triton.cdiv(keep.numel(), 1024),)](keep, layer_seed, p, keep.numel(), BLOCK=1024)
        masks.append(keep.view(K, B, H).transpose(0, 1).double().cpu())
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_mlp_dropout_gradients_use_the_forward_masks(dtype):
    check_grouped_mlp(37, 3, 96, 40, "channels_last_view", dtype, torch.float32, dropout=0.3, seed=11)


def test_grouped_mlp_dropout_zero_in_training_equals_eval_and_eager():
    _, x = make_regions(7, 3, 96, "contiguous", torch.float32)
    weights = make_weights(3, 96, 40)
    trained = grouped_mlp(x, *weights, dropout=0.0, training=True, backend="triton")
    assert torch.equal(trained, grouped_mlp(x, *weights, dropout=0.5, training=False, backend="triton"))
    torch.testing.assert_close(trained, grouped_mlp(x, *weights, backend="eager"), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts compiled kernels: needs a CUDA device")
def test_new_dropout_seeds_do_not_compile_new_kernels():
    from tada_kernels.ops import grouped_mlp as op

    x = torch.randn(16, 3, 64, device=DEVICE, requires_grad=True)
    weights = [w.to(DEVICE).requires_grad_() for w in make_weights(3, 64, 32)]
    for seed in (1, 16, 2**20 + 7, 2**30 - 1, 123456789):
        grouped_mlp(x, *weights, dropout=0.3, training=True, seed=seed, backend="triton").sum().backward()
    for kernel in (op._layer_forward_kernel, op._projection_backward_kernel):
        compiled = sum(len(kernel_cache) for kernel_cache, *_ in kernel.device_caches.values())
        assert compiled <= 2, f"{kernel.fn.__name__} compiled {compiled} variants for 5 seeds"  # the two layers


def test_grouped_mlp_dropout_is_reproducible_from_its_seed():
    _, x = make_regions(7, 3, 96, "contiguous", torch.float32)
    weights = make_weights(3, 96, 40)

    def run(**kwargs):
        return grouped_mlp(x, *weights, dropout=0.3, training=True, backend="triton", **kwargs)

    first = run(seed=123)
    assert torch.equal(first, run(seed=123))
    assert not torch.equal(first, run(seed=124))
    # Without a seed it comes from the global torch RNG, so a restored RNG state redraws the same masks.
    torch.manual_seed(5)
    unseeded = run()
    torch.manual_seed(5)
    assert torch.equal(unseeded, run())


def test_grouped_mlp_dropout_keeps_fraction_one_minus_p_per_layer():
    # Constant hidden units (w = 0, b = 1) make the logit the mean of the dropout masks times the
    # inverted-dropout scale, so the kept fraction can be read off the output.
    B, K, C, H, p = 64, 9, 4, 40, 0.3
    x = torch.randn(B, K, C, device=DEVICE)
    w1, b1 = torch.zeros(K, C, H, device=DEVICE), torch.ones(K, H, device=DEVICE)
    w3, b3 = torch.full((K, H), 1.0 / H, device=DEVICE), torch.zeros(K, device=DEVICE)

    def run(w2, b2):
        return grouped_mlp(x, w1, b1, w2, b2, w3, b3, dropout=p, training=True, seed=0, backend="triton")

    # w2 = 0, b2 = 1: the first layer's mask is forgotten, only the second one counts.
    logits = run(torch.zeros(K, H, H, device=DEVICE), torch.ones(K, H, device=DEVICE))
    assert abs((logits * (1 - p)).mean().item() - (1 - p)) < 0.01
    # w2 = identity, b2 = 0: a unit survives only if both masks keep it, which independent masks do
    # with probability (1 - p)^2.
    logits = run(torch.eye(H, device=DEVICE).expand(K, H, H), torch.zeros(K, H, device=DEVICE))
    assert abs((logits * (1 - p) ** 2).mean().item() - (1 - p) ** 2) < 0.01


def test_grouped_mlp_behind_gradient_reversal_reverses_the_feature_gradient():
    leaf, _ = make_regions(7, 3, 96, "channels_last_view", torch.float32)
    weights = make_weights(3, 96, 40)
    upstream = torch.randn(7, 3, device=DEVICE)

    def feature_grad(coeff):
        regions = leaf if coeff is None else GradientReversal(coeff)(leaf)
        logits = grouped_mlp(regions.flatten(2).transpose(1, 2), *weights, backend="triton")
        return torch.autograd.grad(logits, [leaf, weights[0]], upstream)

    plain_x, plain_w1 = feature_grad(None)
    reversed_x, reversed_w1 = feature_grad(0.25)
    torch.testing.assert_close(reversed_x, -0.25 * plain_x)
    torch.testing.assert_close(reversed_w1, plain_w1)  # the discriminator itself still descends


# -- entropy_attention ------------------------------------------------------------------------


def reference_binary_entropy(logits):
    """-p log p - (1 - p) log(1 - p) with p = sigmoid(z), the textbook form (fine in float64 for |z| < 30)."""
    probs = torch.sigmoid(logits)
    return -probs * torch.log(probs) - (1 - probs) * torch.log1p(-probs)


def reference_attention(f, logits, form="paper", unit="nats"):
    """Eq. 3 and 4 from the definitions: w = 1 - H (paper) or H normalised to [0, 1] (uncertainty)."""
    entropy = reference_binary_entropy(logits)
    if form == "paper":
        weights = 1.0 - (entropy / math.log(2.0) if unit == "bits" else entropy)
    else:
        weights = entropy / math.log(2.0)
    return (1.0 + weights).view(f.shape[0], 1, *f.shape[2:]) * f, weights


def assert_gradient_unless_detached(leaf, leaf64, detach, dtype, what):
    if detach:
        assert leaf.grad is None, f"{what} should be cut from the graph"
    else:
        assert_matches(leaf.grad, leaf64.grad, dtype, what)


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "attached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_entropy_attention_matches_float64_reference(memory_format, dtype, detach):
    B, C, H, W = 3, 37, 5, 7
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype).contiguous(memory_format=memory_format)
    logits = (torch.randn(B, H * W, generator=g) * 4).to(DEVICE).requires_grad_()
    f.requires_grad_()
    f64, logits64 = float64_copies([f, logits])

    h, w = entropy_attention(f, logits, detach=detach, backend="triton")
    h64, w64 = reference_attention(f64, logits64 if not detach else logits64.detach())
    assert h.dtype == dtype and h.is_contiguous(memory_format=memory_format) and w.dtype == torch.float32
    assert w.requires_grad == (not detach)
    assert_matches(h, h64, dtype, "h")
    assert_matches(w, w64, torch.float32, "w")

    grad_h = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    grad_w = torch.randn(B, H * W, generator=g, dtype=torch.float64)
    outputs, outputs64 = ([h], [h64]) if detach else ([h, w], [h64, w64])
    upstream = [grad_h, grad_w][: len(outputs)]
    torch.autograd.backward(outputs, [u.to(DEVICE, o.dtype) for u, o in zip(upstream, outputs)])
    torch.autograd.backward(outputs64, [u.to(o.dtype) for u, o in zip(upstream, outputs64)])
    assert_matches(f.grad, f64.grad, dtype, "grad of f")
    assert_gradient_unless_detached(logits, logits64, detach, dtype, "grad of logits")


@pytest.mark.parametrize(("form", "unit"), [("paper", "bits"), ("uncertainty", "nats"), ("uncertainty", "bits")])
def test_entropy_attention_forms_and_units_match_float64_reference(form, unit):
    B, C, H, W = 3, 37, 5, 7
    g = torch.Generator().manual_seed(1)
    f = torch.randn(B, C, H, W, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    logits = (torch.randn(B, H * W, generator=g) * 4).to(DEVICE).requires_grad_()
    f.requires_grad_()
    f64, logits64 = float64_copies([f, logits])

    h, w = entropy_attention(f, logits, detach=False, form=form, unit=unit, backend="triton")
    h64, w64 = reference_attention(f64, logits64, form, unit)
    assert_matches(h, h64, torch.float32, "h")
    assert_matches(w, w64, torch.float32, "w")
    grad_h = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    grad_w = torch.randn(B, H * W, generator=g, dtype=torch.float64)
    torch.autograd.backward([h, w], [grad_h.to(DEVICE, torch.float32), grad_w.to(DEVICE, torch.float32)])
    torch.autograd.backward([h64, w64], [grad_h, grad_w])
    assert_matches(f.grad, f64.grad, torch.float32, "grad of f")
    assert_matches(logits.grad, logits64.grad, torch.float32, "grad of logits")


def test_entropy_attention_saturated_logits_are_finite():
    f = torch.randn(2, 3, 2, 3, device=DEVICE, requires_grad=True)
    logits = torch.tensor([[100.0, -100.0, 0.0, 50.0, -50.0, 1.0]] * 2, device=DEVICE, requires_grad=True)
    h, w = entropy_attention(f, logits, detach=False, backend="triton")
    (h.sum() + w.sum()).backward()
    assert torch.isfinite(h).all() and torch.isfinite(f.grad).all() and torch.isfinite(logits.grad).all()
    assert w[0, 0].item() == 1.0 and w[0, 1].item() == 1.0
    assert w[0, 2].item() == pytest.approx(1 - math.log(2), abs=1e-6)
    assert logits.grad[0, :2].abs().max().item() < 1e-30  # dw/dz = z s (1 - s) vanishes at saturation


# -- attention_pool ---------------------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "attached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_attention_pool_matches_the_mean_of_the_float64_attended_map(memory_format, dtype, detach):
    # 37 channels over two channel tiles and 35 regions over three region tiles, none of them full.
    B, C, H, W = 3, 37, 5, 7
    g = torch.Generator().manual_seed(2)
    f = torch.randn(B, C, H, W, generator=g).to(DEVICE, dtype).contiguous(memory_format=memory_format)
    logits = (torch.randn(B, H * W, generator=g) * 4).to(DEVICE).requires_grad_()
    f.requires_grad_()
    f64, logits64 = float64_copies([f, logits])

    pooled, w = attention_pool(f, logits, detach=detach, backend="triton")
    h64, w64 = reference_attention(f64, logits64 if not detach else logits64.detach())
    pooled64 = h64.mean(dim=(2, 3))
    assert pooled.shape == (B, C) and pooled.dtype == dtype and w.dtype == torch.float32
    assert w.requires_grad == (not detach)
    assert_matches(pooled, pooled64, dtype, "pooled")
    assert_matches(w, w64, torch.float32, "w")

    grad_pooled = torch.randn(B, C, generator=g, dtype=torch.float64)
    grad_w = torch.randn(B, H * W, generator=g, dtype=torch.float64)
    outputs, outputs64 = ([pooled], [pooled64]) if detach else ([pooled, w], [pooled64, w64])
    upstream = [grad_pooled, grad_w][: len(outputs)]
    torch.autograd.backward(outputs, [u.to(DEVICE, o.dtype) for u, o in zip(upstream, outputs)])
    torch.autograd.backward(outputs64, [u.to(o.dtype) for u, o in zip(upstream, outputs64)])
    assert f.grad.is_contiguous(memory_format=memory_format) and f.grad.dtype == dtype
    assert_matches(f.grad, f64.grad, dtype, "grad of f")
    assert_gradient_unless_detached(logits, logits64, detach, dtype, "grad of logits")


@pytest.mark.parametrize(("form", "unit"), [("paper", "bits"), ("uncertainty", "nats")])
def test_attention_pool_forms_and_units_match_float64_reference(form, unit):
    B, C, H, W = 2, 19, 7, 7
    g = torch.Generator().manual_seed(3)
    f = torch.randn(B, C, H, W, generator=g).to(DEVICE).contiguous(memory_format=torch.channels_last)
    logits = (torch.randn(B, H * W, generator=g) * 4).to(DEVICE).requires_grad_()
    f.requires_grad_()
    f64, logits64 = float64_copies([f, logits])

    pooled, w = attention_pool(f, logits, detach=False, form=form, unit=unit, backend="triton")
    h64, w64 = reference_attention(f64, logits64, form, unit)
    pooled64 = h64.mean(dim=(2, 3))
    assert_matches(pooled, pooled64, torch.float32, "pooled")
    assert_matches(w, w64, torch.float32, "w")
    pooled.backward(torch.ones_like(pooled))
    pooled64.backward(torch.ones_like(pooled64))
    assert_matches(f.grad, f64.grad, torch.float32, "grad of f")
    assert_matches(logits.grad, logits64.grad, torch.float32, "grad of logits")


# -- attentive_entropy ------------------------------------------------------------------------


def reference_attentive_entropy(class_logits, domain_logits, unit="nats"):
    attention = 1.0 + reference_binary_entropy(domain_logits) / (math.log(2.0) if unit == "bits" else 1.0)
    log_p = class_logits.log_softmax(dim=1)
    return (attention * -(log_p.exp() * log_p).sum(dim=1)).mean()


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "attached"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "classes"), [(7, 5), (37, 45), (3, 300)])
def test_attentive_entropy_matches_float64_reference(n, classes, dtype, detach):
    g = torch.Generator().manual_seed(0)
    class_logits = (torch.randn(n, classes, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    domain_logits = (torch.randn(n, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    class64, domain64 = float64_copies([class_logits, domain_logits])

    loss = attentive_entropy(class_logits, domain_logits, detach=detach, backend="triton")
    expected = reference_attentive_entropy(class64, domain64.detach() if detach else domain64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_matches(loss, expected, torch.float32, "loss")

    (loss * 3.0).backward()
    (expected * 3.0).backward()
    assert class_logits.grad.dtype == dtype
    assert_matches(class_logits.grad, class64.grad, dtype, "grad of class logits")
    assert_gradient_unless_detached(domain_logits, domain64, detach, dtype, "grad of domain logits")


def test_attentive_entropy_in_bits_matches_float64_reference():
    g = torch.Generator().manual_seed(2)
    class_logits = (torch.randn(37, 45, generator=g) * 3).to(DEVICE).requires_grad_()
    domain_logits = (torch.randn(37, generator=g) * 3).to(DEVICE).requires_grad_()
    class64, domain64 = float64_copies([class_logits, domain_logits])
    loss = attentive_entropy(class_logits, domain_logits, detach=False, unit="bits", backend="triton")
    expected = reference_attentive_entropy(class64, domain64, unit="bits")
    assert_matches(loss, expected, torch.float32, "loss")
    loss.backward()
    expected.backward()
    assert_matches(class_logits.grad, class64.grad, torch.float32, "grad of class logits")
    assert_matches(domain_logits.grad, domain64.grad, torch.float32, "grad of domain logits")


def test_attentive_entropy_saturated_logits_are_finite():
    class_logits = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 100.0]], device=DEVICE, requires_grad=True)
    domain_logits = torch.tensor([100.0, -100.0], device=DEVICE, requires_grad=True)
    loss = attentive_entropy(class_logits, domain_logits, detach=False, backend="triton")
    loss.backward()
    # Image 1 is certain (H = 0); image 2 splits evenly over two classes (H = ln 2), m = 1.
    assert loss.item() == pytest.approx(math.log(2) / 2, rel=1e-5)
    assert torch.isfinite(class_logits.grad).all() and torch.isfinite(domain_logits.grad).all()


# -- the model --------------------------------------------------------------------------------


def test_tada_model_with_triton_kernels_matches_eager_including_grl_signs():
    # Every op of the local and global attention runs, behind both GRLs; dropout 0 so that the
    # two backends see the same network.
    def run(backend):
        torch.manual_seed(0)
        model = create_model(method="tada", backbone="small_cnn", num_classes=3, image_size=12,
                             region_hidden=40, global_hidden=32, bottleneck_dim=32, discriminator_dropout=0.0,
                             kernels_backend=backend).to(DEVICE)
        model.set_grl_coeff(0.7)
        images = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        outputs = model(images[:4], images[4:])
        loss, _ = tada_objective(outputs, torch.tensor([0, 1, 2, 0], device=DEVICE), LossWeights(adaptation=1.0, entropy=0.1),
                                 method="tada", backend=backend)
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}

    eager_loss, eager_grads = run("eager")
    triton_loss, triton_grads = run("triton")
    torch.testing.assert_close(triton_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


# -- training ---------------------------------------------------------------------------------


def test_training_run_with_triton_kernels_follows_the_eager_run(tmp_path):
    data = ensure_synthetic_dataset(tmp_path / "data", images_per_class=3, seed=1)
    # os.environ carries TRITON_INTERPRET=1 from conftest.py on a machine without a GPU.
    env = dict(os.environ, OMP_NUM_THREADS="1", TADA_DIST_CACHE=str(tmp_path / "cache"))
    env.pop("MLFLOW_TRACKING_URI", None)
    losses = {}
    for backend in ("eager", "triton"):
        run_dir, db = tmp_path / backend, tmp_path / f"{backend}.db"
        overrides = [
            f"data.root={data}", f"output_dir={run_dir}", f"tracking.uri=sqlite:///{db}", f"kernels.backend={backend}",
            "train.steps=3", "train.log_every=1", "train.eval_every=0", "checkpoint.every=0",
            "data.loader=torch", "data.num_threads=0", "data.batch_size=4", "data.eval_batch_size=64",
            "model.discriminator_dropout=0", "model.region_hidden=16", "model.global_hidden=32", "model.bottleneck_dim=32",
        ]
        result = subprocess.run([sys.executable, "-m", "tada_dist.train", *overrides], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        run_id = json.loads((run_dir / "metrics.json").read_text())["mlflow_run_id"]
        losses[backend] = metric_history(db, run_id)
    assert [step for step, _ in losses["triton"]] == [1, 2, 3]
    eager = torch.tensor([value for _, value in losses["eager"]])
    triton_losses = torch.tensor([value for _, value in losses["triton"]])
    torch.testing.assert_close(triton_losses, eager, rtol=1e-4, atol=1e-5)


def metric_history(db: Path, run_id: str, key: str = "loss") -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
