"""tada_kernels eager backend against explicit references: values, every gradient, dropout, dtypes, errors;
backend selection. The Triton backend has its own tests in test_kernels_triton.py."""

import math

import pytest
import torch

import tada_kernels
from tada_kernels import attentive_entropy, entropy_attention, grouped_mlp

LN2 = math.log(2.0)


# -- grouped_mlp ------------------------------------------------------------------------------


def loop_reference(x, w1, b1, w2, b2, w3, b3):
    """The definition, one region at a time."""
    logits = []
    for k in range(x.shape[1]):
        hidden = torch.relu(x[:, k] @ w1[k] + b1[k])
        hidden = torch.relu(hidden @ w2[k] + b2[k])
        logits.append(hidden @ w3[k] + b3[k])
    return torch.stack(logits, dim=1)


def make_weights(K, C, H, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(K, C, H, generator=g) / math.sqrt(C),
        torch.randn(K, H, generator=g) * 0.1,
        torch.randn(K, H, H, generator=g) / math.sqrt(H),
        torch.randn(K, H, generator=g) * 0.1,
        torch.randn(K, H, generator=g) / math.sqrt(H),
        torch.randn(K, generator=g) * 0.1,
    ]


def make_input(B, K, C, layout, seed=1):
    """Returns (leaf, x) where x [B, K, C] is built from leaf according to layout."""
    g = torch.Generator().manual_seed(seed)
    height, width = {1: (1, 1), 3: (1, 3), 49: (7, 7)}[K]
    if layout == "contiguous":
        leaf = torch.randn(B, K, C, generator=g)
        return leaf, leaf
    leaf = torch.randn(B, C, height, width, generator=g)
    if layout == "channels_last_view":
        leaf = leaf.contiguous(memory_format=torch.channels_last)
    return leaf, leaf.flatten(2).transpose(1, 2)


@pytest.mark.parametrize("K", [1, 3, 49])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last_view", "nchw_view"])
def test_grouped_mlp_matches_loop_reference_forward_and_backward(K, layout):
    B, C, H = 7, 96, 40
    leaf, _ = make_input(B, K, C, layout)
    weights = [w.requires_grad_() for w in make_weights(K, C, H)]
    leaf.requires_grad_()
    x = leaf.flatten(2).transpose(1, 2) if layout != "contiguous" else leaf
    assert x.shape == (B, K, C)

    leaf64 = leaf.detach().double().requires_grad_()
    x64 = leaf64.flatten(2).transpose(1, 2) if layout != "contiguous" else leaf64
    weights64 = [w.detach().double().requires_grad_() for w in weights]

    logits = grouped_mlp(x, *weights)
    expected = loop_reference(x64, *weights64)
    assert logits.dtype == torch.float32 and logits.shape == (B, K)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-5)

    upstream = torch.randn(B, K, dtype=torch.float64)
    logits.backward(upstream.float())
    expected.backward(upstream)
    for name, ours, theirs in zip(["x", "w1", "b1", "w2", "b2", "w3", "b3"], [leaf, *weights], [leaf64, *weights64]):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, rtol=1e-4, atol=1e-5, msg=f"grad of {name}")


def test_grouped_mlp_dropout_zero_in_training_equals_eval():
    x = make_input(5, 3, 8, "contiguous")[0]
    weights = make_weights(3, 8, 16)
    assert torch.equal(grouped_mlp(x, *weights, dropout=0.0, training=True), grouped_mlp(x, *weights))


def test_grouped_mlp_dropout_seeded_masks_are_reproducible_and_ignored_in_eval():
    x = make_input(5, 3, 8, "contiguous")[0]
    weights = make_weights(3, 8, 16)
    first = grouped_mlp(x, *weights, dropout=0.3, training=True, seed=123)
    assert torch.equal(first, grouped_mlp(x, *weights, dropout=0.3, training=True, seed=123))
    assert not torch.equal(first, grouped_mlp(x, *weights, dropout=0.3, training=True, seed=124))
    assert torch.equal(grouped_mlp(x, *weights, dropout=0.3, training=False, seed=123), grouped_mlp(x, *weights))


def test_grouped_mlp_dropout_keeps_fraction_one_minus_p_per_layer():
    # Constant hidden units (w = 0, b = 1) make the logit the mean of the dropout masks times the
    # inverted-dropout scale, so the kept fraction can be read off the output.
    B, K, C, H, p = 64, 49, 4, 40, 0.3
    x = torch.randn(B, K, C)
    w1, b1 = torch.zeros(K, C, H), torch.ones(K, H)
    w3, b3 = torch.full((K, H), 1.0 / H), torch.zeros(K)

    # w2 = 0, b2 = 1: the first layer's mask is forgotten, only the second one counts.
    logits = grouped_mlp(x, w1, b1, torch.zeros(K, H, H), torch.ones(K, H), w3, b3, dropout=p, training=True, seed=0)
    assert abs((logits * (1 - p)).mean().item() - (1 - p)) < 0.01
    # w2 = identity, b2 = 0: a unit survives only if both masks keep it.
    identity = torch.eye(H).expand(K, H, H)
    logits = grouped_mlp(x, w1, b1, identity, torch.zeros(K, H), w3, b3, dropout=p, training=True, seed=0)
    assert abs((logits * (1 - p) ** 2).mean().item() - (1 - p) ** 2) < 0.01
    assert abs(logits.mean().item() - 1.0) < 0.03  # inverted dropout keeps the expectation


def test_grouped_mlp_bf16_inputs_return_fp32_close_to_fp32():
    x = make_input(7, 3, 32, "channels_last_view")[0].flatten(2).transpose(1, 2)
    weights = make_weights(3, 32, 24)
    x16, weights16 = x.bfloat16(), [w.bfloat16() for w in weights]
    logits = grouped_mlp(x16, *weights16)
    assert logits.dtype == torch.float32
    # bf16 operands and activations, as in the fused kernels: within bf16 rounding of the fp32 result.
    torch.testing.assert_close(logits, grouped_mlp(x16.float(), *[w.float() for w in weights16]), rtol=3e-2,
                               atol=3e-2)
    torch.testing.assert_close(logits, grouped_mlp(x, *weights), rtol=5e-2, atol=5e-2)
    # The weights' gradients come back in their own dtype, computed without an fp32 copy of them.
    weights16 = [w.requires_grad_() for w in weights16]
    grouped_mlp(x16, *weights16).sum().backward()
    assert all(w.grad.dtype == torch.bfloat16 for w in weights16)


def test_grouped_mlp_shape_and_dropout_errors():
    x = torch.randn(5, 3, 8)
    w1, b1, w2, b2, w3, b3 = make_weights(3, 8, 4)
    with pytest.raises(ValueError, match=r"x must be \[B, K, C\], got \[5, 24\]"):
        grouped_mlp(x.flatten(1), w1, b1, w2, b2, w3, b3)
    with pytest.raises(ValueError, match=r"w1 must be \[K, C, H\] = \[3, 8, H\], got \[3, 8\]"):
        grouped_mlp(x, w1[..., 0], b1, w2, b2, w3, b3)
    with pytest.raises(ValueError, match=r"w2 must be \[K, H, H\] = \[3, 4, 4\], got \[3, 4, 5\]"):
        grouped_mlp(x, w1, b1, torch.randn(3, 4, 5), b2, w3, b3)
    with pytest.raises(ValueError, match=r"b3 must be \[K\] = \[3\], got \[2\]"):
        grouped_mlp(x, w1, b1, w2, b2, w3, b3[:2])
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        grouped_mlp(x, w1, b1, w2, b2, w3, b3, dropout=1.0, training=True)


# -- entropy_attention ------------------------------------------------------------------------


def binary_entropy(p: float) -> float:
    return -p * math.log(p) - (1 - p) * math.log(1 - p)


def test_entropy_attention_weights_match_hand_values():
    f = torch.ones(1, 1, 1, 5)
    logits = torch.tensor([[0.0, 2.0, -3.0, 100.0, -100.0]], requires_grad=True)
    h, w = entropy_attention(f, logits, detach=False)
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [1 - LN2, 1 - binary_entropy(sigmoid(2.0)), 1 - binary_entropy(sigmoid(-3.0)), 1.0, 1.0]
    torch.testing.assert_close(w, torch.tensor([expected]), rtol=0, atol=1e-6)
    h.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_entropy_attention_weights_stay_in_range():
    logits = torch.cat([torch.randn(4, 49) * 10, torch.tensor([[0.0, 100.0, -100.0] * 16 + [50.0]])])
    _, w = entropy_attention(torch.randn(5, 8, 7, 7), logits)
    assert w.shape == (5, 49) and w.dtype == torch.float32
    assert (w >= 1 - LN2 - 1e-6).all() and (w <= 1).all()


def test_entropy_attention_scales_channels_last_features_region_by_region():
    B, C, H, W = 2, 5, 3, 4
    f = torch.randn(B, C, H, W).contiguous(memory_format=torch.channels_last)
    logits = torch.randn(B, H * W) * 3
    h, w = entropy_attention(f, logits)
    expected = torch.empty(B, C, H, W)
    for y in range(H):
        for x in range(W):
            expected[:, :, y, x] = (1 + w[:, y * W + x, None]) * f[:, :, y, x]
    torch.testing.assert_close(h, expected)
    assert h.shape == f.shape and h.dtype == f.dtype


def test_entropy_attention_detach_blocks_gradient_to_logits():
    f = torch.randn(2, 3, 2, 2, requires_grad=True)
    logits = torch.randn(2, 4, requires_grad=True)
    h, w = entropy_attention(f, logits, detach=True)
    assert not w.requires_grad
    h.sum().backward()
    assert logits.grad is None
    torch.testing.assert_close(f.grad, (1 + w).view(2, 1, 2, 2).expand(2, 3, 2, 2))


def test_entropy_attention_undetached_gradient_is_analytic():
    # dw/dz = z * s * (1 - s) with s = sigmoid(z), so dL/dz[b, k] = sum_c g f * z s (1 - s).
    f = torch.randn(3, 4, 2, 3)
    logits = (torch.randn(3, 6) * 3).requires_grad_()
    upstream = torch.randn(3, 4, 2, 3)
    h, _ = entropy_attention(f, logits, detach=False)
    (h * upstream).sum().backward()
    z = logits.detach()
    s = torch.sigmoid(z)
    expected = (upstream * f).flatten(2).sum(1) * z * s * (1 - s)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_entropy_attention_keeps_bf16_features_bf16():
    f = torch.randn(2, 3, 2, 2, dtype=torch.bfloat16)
    h, w = entropy_attention(f, torch.zeros(2, 4))
    assert h.dtype == torch.bfloat16 and w.dtype == torch.float32
    torch.testing.assert_close(h, ((2 - LN2) * f.float()).bfloat16())


@pytest.mark.parametrize(
    "form, unit, expected",
    [
        # w at d = 1/2 (undecided), d = sigmoid(2), d = 1 (certain), from the definitions with H in nats.
        ("paper", "nats", lambda h: 1 - h),
        ("paper", "bits", lambda h: 1 - h / LN2),
        ("uncertainty", "nats", lambda h: h / LN2),
        ("uncertainty", "bits", lambda h: h / LN2),
    ],
)
def test_entropy_attention_forms_and_units_match_hand_values(form, unit, expected):
    logits = torch.tensor([[0.0, 2.0, 100.0]])
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    entropies = [LN2, binary_entropy(sigmoid(2.0)), 0.0]
    _, w = entropy_attention(torch.ones(1, 1, 1, 3), logits, form=form, unit=unit)
    torch.testing.assert_close(w, torch.tensor([[expected(h) for h in entropies]]), rtol=0, atol=1e-6)


def test_entropy_attention_uncertainty_form_weights_undecided_regions_most():
    logits = torch.tensor([[0.0, 0.5, 3.0, -8.0, 100.0]])
    _, paper = entropy_attention(torch.ones(1, 1, 1, 5), logits, form="paper", unit="bits")
    _, uncertainty = entropy_attention(torch.ones(1, 1, 1, 5), logits, form="uncertainty")
    assert uncertainty[0, 0] == pytest.approx(1.0) and uncertainty[0, 4] == pytest.approx(0.0, abs=1e-6)
    assert (uncertainty[0, :-1] > uncertainty[0, 1:]).all()  # |logit| grows along the row: d grows more certain
    torch.testing.assert_close(paper + uncertainty, torch.ones_like(paper))  # in bits the forms mirror each other


@pytest.mark.parametrize("form, unit", [("paper", "bits"), ("uncertainty", "nats")])
def test_entropy_attention_undetached_gradient_of_other_forms_is_analytic(form, unit):
    # w = offset + slope * H with dH/dz = -z s (1 - s), so dL/dz[b, k] = sum_c g f * slope * -z s (1 - s).
    slope = {"paper": -1 / LN2, "uncertainty": 1 / LN2}[form]
    f = torch.randn(3, 4, 2, 3)
    logits = (torch.randn(3, 6) * 3).requires_grad_()
    upstream = torch.randn(3, 4, 2, 3)
    h, _ = entropy_attention(f, logits, detach=False, form=form, unit=unit)
    (h * upstream).sum().backward()
    z = logits.detach()
    s = torch.sigmoid(z)
    expected = (upstream * f).flatten(2).sum(1) * slope * -z * s * (1 - s)
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_entropy_attention_rejects_unknown_form_and_unit():
    f, logits = torch.randn(1, 2, 1, 2), torch.randn(1, 2)
    with pytest.raises(ValueError, match="unknown attention form 'inverse'; allowed: paper, uncertainty"):
        entropy_attention(f, logits, form="inverse")
    with pytest.raises(ValueError, match="unknown entropy unit 'dits'; allowed: nats, bits"):
        entropy_attention(f, logits, unit="dits")


# -- attention_pool ---------------------------------------------------------------------------


@pytest.mark.parametrize("detach", [True, False], ids=["detach", "attached"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("form, unit", [("paper", "nats"), ("uncertainty", "bits")])
def test_attention_pool_is_the_mean_of_the_attended_map_with_its_gradients(form, unit, memory_format, detach):
    f = torch.randn(3, 6, 4, 5).contiguous(memory_format=memory_format).requires_grad_()
    logits = (torch.randn(3, 20) * 3).requires_grad_()
    f2, logits2 = f.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
    pooled, w = tada_kernels.attention_pool(f, logits, detach=detach, form=form, unit=unit)
    h, w2 = entropy_attention(f2, logits2, detach=detach, form=form, unit=unit)
    torch.testing.assert_close(pooled, h.mean(dim=(2, 3)))
    torch.testing.assert_close(w, w2)
    upstream = torch.randn(3, 6)
    (pooled * upstream).sum().backward()
    (h.mean(dim=(2, 3)) * upstream).sum().backward()
    torch.testing.assert_close(f.grad, f2.grad)
    assert (logits.grad is None) == detach
    if not detach:
        torch.testing.assert_close(logits.grad, logits2.grad)


def test_attention_pool_keeps_bf16_features_bf16():
    f = torch.randn(2, 3, 2, 2, dtype=torch.bfloat16)
    pooled, w = tada_kernels.attention_pool(f, torch.zeros(2, 4))
    assert pooled.dtype == torch.bfloat16 and w.dtype == torch.float32
    torch.testing.assert_close(pooled, ((2 - LN2) * f.float()).mean(dim=(2, 3)).bfloat16())


def test_attention_pool_rejects_a_map_and_logits_that_do_not_match():
    with pytest.raises(ValueError, match=r"attention_pool: logits must be \[B, H\*W\] = \[2, 6\], got \[2, 5\]"):
        tada_kernels.attention_pool(torch.randn(2, 3, 2, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"attention_pool: f must be \[B, C, H, W\], got \[2, 3, 6\]"):
        tada_kernels.attention_pool(torch.randn(2, 3, 6), torch.randn(2, 6))


def test_entropy_attention_shape_errors():
    with pytest.raises(ValueError, match=r"f must be \[B, C, H, W\], got \[2, 3, 4\]"):
        entropy_attention(torch.randn(2, 3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"logits must be \[B, H\*W\] = \[2, 6\], got \[2, 5\]"):
        entropy_attention(torch.randn(2, 3, 2, 3), torch.randn(2, 5))


# -- attentive_entropy ------------------------------------------------------------------------


def test_attentive_entropy_matches_hand_computation():
    # Image 1: uniform over 2 classes (H = ln 2), domain logit 0 (m = 1 + ln 2).
    # Image 2: p = (3/4, 1/4) from logits (ln 3, 0), domain logit ln 3 (d = 3/4, same entropy).
    class_logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    domain_logits = torch.tensor([0.0, math.log(3.0)])
    h_quarter = binary_entropy(0.75)
    expected = ((1 + LN2) * LN2 + (1 + h_quarter) * h_quarter) / 2
    assert attentive_entropy(class_logits, domain_logits).item() == pytest.approx(expected, rel=1e-6)


def test_attentive_entropy_in_bits_weights_by_one_plus_entropy_in_bits():
    # Image 1: H(p) = ln 2 and d = 1/2, so m = 1 + 1 bit = 2. Image 2: certain domain, m = 1.
    class_logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    domain_logits = torch.tensor([0.0, 100.0])
    expected = (2 * LN2 + 1 * binary_entropy(0.75)) / 2
    assert attentive_entropy(class_logits, domain_logits, unit="bits").item() == pytest.approx(expected, rel=1e-6)


def test_attentive_entropy_is_finite_at_saturated_logits():
    class_logits = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 100.0]], requires_grad=True)
    domain_logits = torch.tensor([100.0, -100.0], requires_grad=True)
    loss = attentive_entropy(class_logits, domain_logits, detach=False)
    loss.backward()
    # Image 1 is certain (H = 0); image 2 splits evenly over two classes (H = ln 2), m = 1.
    assert loss.item() == pytest.approx(LN2 / 2, rel=1e-5)
    assert torch.isfinite(class_logits.grad).all() and torch.isfinite(domain_logits.grad).all()


def test_attentive_entropy_detach_controls_gradient_to_domain_logits():
    class_logits = torch.randn(4, 5, requires_grad=True)
    domain_logits = torch.randn(4, requires_grad=True)
    attentive_entropy(class_logits, domain_logits, detach=True).backward()
    assert domain_logits.grad is None and class_logits.grad is not None

    attentive_entropy(class_logits, domain_logits, detach=False).backward()
    log_p = class_logits.detach().log_softmax(1)
    entropy = -(log_p.exp() * log_p).sum(1)
    z = domain_logits.detach()
    s = torch.sigmoid(z)
    torch.testing.assert_close(domain_logits.grad, entropy / 4 * (-z * s * (1 - s)))


def test_attentive_entropy_shape_errors():
    with pytest.raises(ValueError, match=r"domain_logits must be \[n\] = \[4\], got \[4, 1\]"):
        attentive_entropy(torch.randn(4, 3), torch.randn(4, 1))
    with pytest.raises(ValueError, match=r"class_logits must be \[n, classes\], got \[4\]"):
        attentive_entropy(torch.randn(4), torch.randn(4))


# -- backends ---------------------------------------------------------------------------------

OPS = {
    "grouped_mlp": lambda backend: grouped_mlp(torch.randn(2, 3, 4), *make_weights(3, 4, 5), backend=backend),
    "entropy_attention": lambda backend: entropy_attention(torch.randn(2, 3, 2, 2), torch.randn(2, 4), backend=backend),
    "attentive_entropy": lambda backend: attentive_entropy(torch.randn(2, 3), torch.randn(2), backend=backend),
}


@pytest.mark.parametrize("op", OPS)
def test_backends_auto_and_eager_agree(op):
    torch.manual_seed(0)
    auto = OPS[op]("auto")
    torch.manual_seed(0)
    eager = OPS[op]("eager")
    torch.testing.assert_close(auto, eager)


@pytest.mark.parametrize("op", OPS)
def test_backend_triton_on_cpu_tensors_needs_the_interpreter(op, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="use CUDA tensors, or set TRITON_INTERPRET=1 before triton is imported"):
        OPS[op]("triton")


@pytest.mark.parametrize("op", OPS)
def test_unknown_backend_lists_allowed_values(op):
    with pytest.raises(ValueError, match="unknown tada_kernels backend 'cuda'; allowed: 'auto', 'eager', 'triton'"):
        OPS[op]("cuda")


def test_resolve_backend():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tada_kernels.resolve_backend("auto", cpu) == "eager"
    assert tada_kernels.resolve_backend("auto", cuda) == "triton"
    assert tada_kernels.resolve_backend("eager", cuda) == "eager"
    assert tada_kernels.resolve_backend("triton", cuda) == "triton"
