"""The TADA model: outputs per method, BatchNorm batching, gradient reversal, optimiser groups, backbones."""

import math
import urllib.error

import pytest
import torch
import torchvision

from tada_dist.losses import LossWeights, global_adversarial_loss, local_adversarial_loss, tada_objective
from tada_dist.model import METHODS, ModelError, create_backbone, create_model
from tada_dist.optim import create_optimizer, parameter_groups

UNKNOWN_METHOD = "unknown method 'mada'; allowed: source_only, dann, tada_local, tada_global, tada"

NUM_CLASSES = 6
EXPECTED_KEYS = {
    "source_only": {"class_logits_source"},
    "dann": {"class_logits_source", "class_logits", "domain_labels", "global_logits"},
    "tada_local": {"class_logits_source", "class_logits", "domain_labels", "region_logits"},
    "tada_global": {"class_logits_source", "class_logits", "domain_labels", "global_logits"},
    "tada": {"class_logits_source", "class_logits", "domain_labels", "region_logits", "global_logits"},
}


def small_model(method: str, **kwargs):
    torch.manual_seed(0)
    return create_model(method=method, backbone="small_cnn", num_classes=NUM_CLASSES, image_size=28, **kwargs)


def digit_batches(num_source: int = 4, num_target: int = 4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(num_source, 3, 28, 28, generator=g), torch.randn(num_target, 3, 28, 28, generator=g)


@pytest.mark.parametrize("method", METHODS)
def test_outputs_shapes_and_loss_reaches_every_trained_parameter(method):
    model = small_model(method)
    x_source, x_target = digit_batches()
    outputs = model(x_source, x_target)

    assert set(outputs) == EXPECTED_KEYS[method]
    assert model.method == method and model.num_regions == 49
    assert outputs["class_logits_source"].shape == (4, NUM_CLASSES)
    if method != "source_only":
        assert outputs["class_logits"].shape == (8, NUM_CLASSES)
        assert outputs["domain_labels"].tolist() == [1.0] * 4 + [0.0] * 4
        assert torch.equal(outputs["class_logits"][:4], outputs["class_logits_source"])
    if "region_logits" in outputs:
        assert outputs["region_logits"].shape == (8, 49)
    if "global_logits" in outputs:
        assert outputs["global_logits"].shape == (8,)
    assert all(torch.isfinite(value).all() for value in outputs.values())

    loss, _ = tada_objective(outputs, torch.tensor([0, 1, 2, 5]), LossWeights(), method=method)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_source_only_never_sees_the_target_batch():
    model = small_model("source_only")
    x_source, _ = digit_batches()
    torch.manual_seed(2)
    alone = model(x_source)["class_logits_source"]
    torch.manual_seed(2)
    with_nan_target = model(x_source, torch.full((4, 3, 28, 28), float("nan")))["class_logits_source"]
    assert torch.equal(alone, with_nan_target)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.isfinite(module.running_mean).all() and torch.isfinite(module.running_var).all()


@pytest.mark.parametrize("method", ["dann", "tada"])
def test_adaptation_methods_normalise_source_and_target_as_one_batch(method):
    model = small_model(method, discriminator_dropout=0.0)
    x_source, x_target = digit_batches()
    joint = model(x_source, x_target)["class_logits_source"]
    # Same batch statistics as forwarding the concatenation; a different target batch changes them.
    torch.testing.assert_close(joint, model.predict(torch.cat([x_source, x_target]))[:4])
    assert not torch.allclose(joint, model(x_source, x_target * 3 + 1)["class_logits_source"])


def adversarial_gradients(model, coeff: float) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model.set_grl_coeff(coeff)
    outputs = model(*digit_batches())
    labels = outputs["domain_labels"]
    loss = local_adversarial_loss(outputs["region_logits"], labels)
    loss = loss + global_adversarial_loss(outputs["global_logits"], labels)
    loss.backward()
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def test_gradient_reversal_flips_the_adversarial_gradient_below_the_discriminators():
    model = small_model("tada", discriminator_dropout=0.0)
    plain = adversarial_gradients(model, coeff=-1.0)  # -(-1) * grad: no reversal
    discriminator_names = [n for n in plain if n.startswith(("region_discriminators.", "global_discriminator."))]
    below_names = [n for n in plain if n.startswith(("backbone.", "bottleneck."))]
    assert discriminator_names and any(n.startswith("backbone.") for n in below_names)

    for coeff in (1.0, 0.3):
        reversed_ = adversarial_gradients(model, coeff)
        for name in discriminator_names:  # the discriminators minimise their loss whatever the coefficient
            torch.testing.assert_close(reversed_[name], plain[name], msg=name)
        for name in below_names:  # the features below receive -coeff times the gradient
            torch.testing.assert_close(reversed_[name], -coeff * plain[name], rtol=1e-4, atol=1e-7, msg=name)

    silenced = adversarial_gradients(model, coeff=0.0)
    assert all(silenced[name].abs().max() == 0 for name in below_names if name in silenced)


def test_channels_last_model_matches_contiguous():
    model = small_model("tada", discriminator_dropout=0.0)
    x_source, x_target = digit_batches()
    expected = model(x_source, x_target)
    model = model.to(memory_format=torch.channels_last)
    to_cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    outputs = model(to_cl(x_source), to_cl(x_target))
    for name in expected:
        torch.testing.assert_close(outputs[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_predict_is_deterministic_in_eval_mode():
    model = small_model("tada").eval()
    x = digit_batches()[0]
    with torch.no_grad():
        logits = model.predict(x)
        assert logits.shape == (4, NUM_CLASSES)
        assert torch.equal(logits, model.predict(x))


def test_model_errors():
    with pytest.raises(ValueError, match=UNKNOWN_METHOD):
        small_model("mada")
    x_source, _ = digit_batches()
    with pytest.raises(ValueError, match="method 'tada' adapts to the target domain: pass x_target"):
        small_model("tada")(x_source)
    with pytest.raises(ValueError, match=r"map is 8x8 = 64 regions, but the model was built for a 7x7 map \(K = 49\)"):
        small_model("tada_local")(torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="unknown pooling 'max'; allowed: avg, flatten"):
        small_model("tada", pooling="max")
    with pytest.raises(ValueError, match="unknown attention form 'inverse'; allowed: paper, uncertainty"):
        small_model("tada", attention="inverse")


def test_region_hidden_defaults_per_backbone():
    assert small_model("tada").region_discriminators.hidden == 64
    assert small_model("tada", region_hidden=16).region_discriminators.w2.shape == (49, 16, 16)
    assert lenet_model("tada").region_discriminators.hidden == 100


def lenet_model(method: str, **kwargs):
    """The textbook digits network: LeNet features flattened into FC 100 -> FC 100 -> classes."""
    torch.manual_seed(0)
    settings = dict(pooling="flatten", bottleneck_dim=100, bottleneck_layers=2, bottleneck_batchnorm=False,
                    global_hidden=100)
    return create_model(method=method, backbone="lenet", num_classes=10, image_size=28, **{**settings, **kwargs})


def test_lenet_is_the_textbook_digits_network():
    model = lenet_model("dann")
    assert model.num_regions == 16 and model.map_size == (4, 4)
    convs = [m for m in model.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(3, 32, (5, 5)), (32, 48, (5, 5))]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    linears = [m for m in [*model.bottleneck, model.classifier] if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(768, 100), (100, 100), (100, 10)]
    x = torch.randn(3, 3, 28, 28)
    assert model.backbone(x).shape == (3, 48, 4, 4)
    assert model(x, x)["global_logits"].shape == (6,)


def test_flatten_pooling_keeps_regions_apart_and_avg_mixes_them():
    """Moving the map's regions around changes flattened features but not averaged ones."""
    feature_map = torch.randn(2, 48, 4, 4)
    moved = feature_map.flatten(2).flip(2).view_as(feature_map)
    for pooling, should_change in (("flatten", True), ("avg", False)):
        model = lenet_model("dann", pooling=pooling).eval()
        model.backbone = torch.nn.Identity()  # feed the map itself
        with torch.no_grad():
            changed = not torch.allclose(model.predict(feature_map), model.predict(moved), atol=1e-6)
        assert changed == should_change, pooling
        assert model.bottleneck[0].in_features == (768 if pooling == "flatten" else 48)


def test_bottleneck_options():
    model = small_model("dann", bottleneck_dim=32, bottleneck_layers=2, bottleneck_batchnorm=True,
                        bottleneck_dropout=0.25)
    kinds = [type(m).__name__ for m in model.bottleneck]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Dropout"] * 2
    assert model.bottleneck[3].p == 0.25
    assert [type(m).__name__ for m in small_model("dann").bottleneck] == ["Linear", "BatchNorm1d", "ReLU"]


def test_tada_local_trains_plain_entropy_and_tada_global_attentive_entropy():
    """The paper's ablation: TADA (local) = classification + local attention + entropy; TADA (global)
    = classification + global attention + attentive entropy."""
    x_source, x_target = digit_batches()
    labels = torch.tensor([0, 1, 2, 5])
    weights = LossWeights(adaptation=1.0, entropy=0.1)
    outputs = small_model("tada_local", discriminator_dropout=0.0)(x_source, x_target)
    total, terms = tada_objective(outputs, labels, weights, method="tada_local")
    log_p = outputs["class_logits"].detach().log_softmax(1)
    plain = -(log_p.exp() * log_p).sum(1).mean()
    torch.testing.assert_close(terms["entropy"], plain)
    torch.testing.assert_close(total.detach(), terms["cls"] + terms["local"] + 0.1 * plain)

    outputs = small_model("tada_global", discriminator_dropout=0.0)(x_source, x_target)
    _, terms = tada_objective(outputs, labels, weights, method="tada_global", entropy_unit="bits")
    log_p = outputs["class_logits"].detach().log_softmax(1)
    z = outputs["global_logits"].detach()
    m = 1 + (torch.nn.functional.softplus(z) - z * torch.sigmoid(z)) / math.log(2.0)
    torch.testing.assert_close(terms["entropy"], (m * -(log_p.exp() * log_p).sum(1)).mean())


def test_resnet18_at_64_pixels_has_a_2x2_map():
    torch.manual_seed(0)
    model = create_model(method="tada", backbone="resnet18", num_classes=NUM_CLASSES, image_size=64)
    assert model.num_regions == 4
    assert model.region_discriminators.w1.shape == (4, 512, 1024)
    outputs = model(torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64))
    assert outputs["region_logits"].shape == (4, 4) and outputs["class_logits"].shape == (4, NUM_CLASSES)


# -- optimiser --------------------------------------------------------------------------------


def test_parameter_groups_put_new_layers_at_ten_times_the_backbone_rate():
    model = small_model("tada")
    groups = parameter_groups(model, base_lr=0.01)
    backbone, new_layers = groups
    assert (backbone["name"], backbone["lr"], backbone["lr_mult"]) == ("backbone", 0.01, 1.0)
    assert (new_layers["name"], new_layers["lr"], new_layers["lr_mult"]) == ("new_layers", pytest.approx(0.1), 10.0)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters()}
    everything = [id(p) for group in groups for p in group["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())
    assert {id(model.region_discriminators.w1), id(model.classifier.weight)} <= {id(p) for p in new_layers["params"]}


def test_create_optimizer_uses_the_papers_sgd_settings():
    optimizer = create_optimizer(small_model("dann"), base_lr=0.002, new_layer_mult=5.0)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([0.002, 0.01])
    for group in optimizer.param_groups:
        assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.95, True, 5e-4)


# -- backbones --------------------------------------------------------------------------------


def test_small_cnn_maps_28_pixels_to_128_by_7_by_7():
    backbone, channels = create_backbone("small_cnn")
    assert channels == 128
    assert backbone(torch.randn(2, 3, 28, 28)).shape == (2, 128, 7, 7)


def test_resnet_backbone_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    backbone, channels = create_backbone("resnet18", pretrained=str(path))
    assert channels == 512
    torch.testing.assert_close(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert not hasattr(backbone, "fc") and not hasattr(backbone, "avgpool")


def test_backbone_errors(tmp_path, monkeypatch):
    allowed = "lenet, small_cnn, resnet18, resnet34, resnet50, resnet101"
    with pytest.raises(ValueError, match=f"unknown backbone 'vgg16'; allowed: {allowed}"):
        create_backbone("vgg16")
    missing = tmp_path / "nope.pth"
    with pytest.raises(ModelError, match=f"pretrained weights file not found: {missing}"):
        create_backbone("resnet50", pretrained=str(missing))
    with pytest.raises(ValueError, match="backbone small_cnn has no pretrained weights"):
        create_backbone("small_cnn", pretrained="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="weights 'IMAGENET1K_V9' for resnet18; allowed: IMAGENET1K_V1, DEFAULT"):
        create_backbone("resnet18", pretrained="IMAGENET1K_V9")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match=f"{wrong} is not a resnet18 state dict"):
        create_backbone("resnet18", pretrained=str(wrong))

    def offline(name, weights):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ModelError) as error:
        create_backbone("resnet18", pretrained="IMAGENET1K_V1")
    assert str(error.value) == (
        "could not download torchvision weights 'IMAGENET1K_V1' for resnet18 (Name or service not known); download "
        "https://download.pytorch.org/models/resnet18-f37072fd.pth on a machine with network access and pass the "
        "file: model.pretrained=/path/to/resnet18-f37072fd.pth"
    )
