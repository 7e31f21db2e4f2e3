"""The network: shapes, parameter counts, column structure, LRN against the paper's formula, and init."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from alexnet.model import AlexNet, Figure1CNN, LocalResponseNorm, ModelConfig, build_network

# Sizes of the maps after conv1, pool1, pool2 and pool5 (section 3.5: 55, 27, 13, 6).
MAP_SIDES = {227: [55, 27, 13, 6], 32: [32, 16, 8, 4]}


def map_sides(net: AlexNet, x: torch.Tensor) -> list[int]:
    sides = []
    hooks = [
        getattr(net.features, name).register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
        for name in ("conv1", "pool1", "pool2", "pool5")
    ]
    net(x)
    for h in hooks:
        h.remove()
    return sides


SWITCHES = list(
    itertools.product(
        ["relu", "tanh", "sigmoid"], ["overlapping", "non_overlapping"], ["max", "avg"], [True, False], [1, 2]
    )
)


@pytest.mark.parametrize("input_size,width", [(227, 0.125), (32, 0.25)])
def test_every_switch_combination_gives_the_paper_shapes(input_size: int, width: float):
    x = torch.randn(2, 3, input_size, input_size)
    for activation, pool, pool_type, lrn, columns in SWITCHES:
        net = AlexNet(
            num_classes=7,
            input_size=input_size,
            activation=activation,
            pool=pool,
            pool_type=pool_type,
            lrn=lrn,
            columns=columns,
            width=width,
            dropout=0.3,
        )
        with torch.no_grad():
            out = net(x)
        combo = (activation, pool, pool_type, lrn, columns)
        assert out.shape == (2, 7), combo
        assert torch.isfinite(out).all(), combo
        assert map_sides(net, x) == MAP_SIDES[input_size], combo


def test_full_width_network_shapes_at_227():
    net = AlexNet()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 227, 227)).shape == (1, 1000)
    conv = [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)]
    assert conv == [96, 256, 384, 384, 256]
    assert [m.out_features for m in net.classifier if isinstance(m, nn.Linear)] == [4096, 4096, 1000]
    assert net.classifier.fc6.in_features == 6 * 6 * 256


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_parameter_count_of_the_paper_network():
    assert count(AlexNet(num_classes=1000, columns=2)) == 60_965_224


def test_one_column_net_halves_conv1_to_conv4_only():
    net = AlexNet(num_classes=1000, columns=1)
    assert [m.out_channels for m in net.features if isinstance(m, nn.Conv2d)] == [48, 128, 192, 192, 256]
    assert all(m.groups == 1 for m in net.features if isinstance(m, nn.Conv2d))
    assert net.classifier.fc6.out_features == 4096
    # Worked out by hand from footnote 2's layer sizes.
    assert count(net) == 59_798_312


def test_columns_see_only_their_own_maps_in_conv2_conv4_conv5():
    net = AlexNet(input_size=32, width=0.25, lrn=True).eval()
    f = net.features
    c1 = f.conv1.out_channels
    x = torch.randn(2, c1, 16, 16)
    y = x.clone()
    y[:, c1 // 2 :] += torch.randn_like(y[:, c1 // 2 :])  # change only column B's input maps
    with torch.no_grad():
        a, b = f.conv2(x), f.conv2(y)
    half = f.conv2.out_channels // 2
    assert torch.equal(a[:, :half], b[:, :half])  # column A is untouched
    assert not torch.allclose(a[:, half:], b[:, half:])
    half3 = f.conv3.out_channels // 2
    with torch.no_grad():  # conv3 crosses: column A's outputs now change too
        assert not torch.allclose(f.conv3(a)[:, :half3], f.conv3(b)[:, :half3])
    assert f.conv4.groups == 2 and f.conv5.groups == 2 and f.conv3.groups == 1


def paper_lrn(a: torch.Tensor, n=5, alpha=1e-4, beta=0.75, k=2.0, groups=1) -> torch.Tensor:
    """Section 3.3 written out channel by channel, within each column."""
    out = []
    per_group = a.shape[1] // groups
    for g in range(groups):
        block = a[:, g * per_group : (g + 1) * per_group]
        for i in range(per_group):
            lo, hi = max(0, i - n // 2), min(per_group - 1, i + n // 2)
            denom = (k + alpha * (block[:, lo : hi + 1] ** 2).sum(dim=1)) ** beta
            out.append(block[:, i] / denom)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lrn_forward_and_gradient_equal_the_paper_formula(groups: int, dtype: torch.dtype):
    torch.manual_seed(0)
    # Activations up to ~50 make alpha * sum(a^2) comparable to k, so the normalization really bites.
    a = (torch.rand(3, 16, 5, 5, dtype=dtype) * 50).requires_grad_()
    a_ref = a.detach().clone().requires_grad_()
    grad = torch.randn(3, 16, 5, 5, dtype=dtype)
    ours = LocalResponseNorm(groups=groups)(a)
    ref = paper_lrn(a_ref, groups=groups)
    ours.backward(grad)
    ref.backward(grad)
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (a.grad - a_ref.grad).abs().max().item() <= 1e-5
    assert (ours / a).min() < 0.5  # not a near-identity case


def test_lrn_matches_torch_with_alpha_times_n():
    """torch.nn.LocalResponseNorm divides alpha by n: the paper's 1e-4 is 5e-4 there."""
    x = torch.rand(2, 12, 4, 4) * 40
    theirs = nn.LocalResponseNorm(size=5, alpha=5e-4, beta=0.75, k=2.0)(x)
    assert torch.allclose(LocalResponseNorm()(x), theirs, atol=1e-6)


def test_lrn_keeps_each_column_separate():
    x = torch.rand(1, 8, 2, 2) * 40
    y = x.clone()
    y[:, 4] *= 3  # first map of column B
    lrn = LocalResponseNorm(groups=2)
    assert torch.equal(lrn(x)[:, :4], lrn(y)[:, :4])
    assert not torch.equal(LocalResponseNorm(groups=1)(x)[:, :4], LocalResponseNorm(groups=1)(y)[:, :4])


def test_paper_init():
    torch.manual_seed(0)
    net = AlexNet(init="paper")
    layers = {n.split(".")[-1]: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, layer in layers.items():
        assert abs(layer.weight.std().item() - 0.01) < 1e-3, name
        assert abs(layer.weight.mean().item()) < 1e-3, name
        expected_bias = 1.0 if name in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
        assert torch.all(layer.bias == expected_bias), name


@pytest.mark.parametrize("activation,gain", [("relu", 2**0.5), ("tanh", 5 / 3)])
def test_kaiming_init_uses_the_activation_gain(activation: str, gain: float):
    torch.manual_seed(0)
    net = AlexNet(input_size=32, activation=activation, init="kaiming")
    fc7 = net.classifier.fc7
    expected = gain / fc7.in_features**0.5
    assert abs(fc7.weight.std().item() / expected - 1) < 0.02
    assert torch.all(fc7.bias == 0)
    fc8 = net.classifier.fc8
    assert abs(fc8.weight.std().item() * fc8.in_features**0.5 - 1) < 0.05  # linear gain on the logits


def test_switches_build_the_named_layers():
    net = AlexNet(
        input_size=32, activation="tanh", pool="non_overlapping", pool_type="avg", lrn=False, dropout=0.0
    )
    f, c = net.features, net.classifier
    assert isinstance(f.act1, nn.Tanh) and isinstance(c.act6, nn.Tanh)
    assert isinstance(f.pool1, nn.AvgPool2d) and f.pool1.kernel_size == 2 and f.pool1.stride == 2
    assert isinstance(f.lrn1, nn.Identity) and isinstance(f.lrn2, nn.Identity)
    paper = AlexNet(input_size=32)
    assert isinstance(paper.features.pool5, nn.MaxPool2d) and paper.features.pool5.kernel_size == 3
    assert isinstance(paper.features.lrn1, LocalResponseNorm)
    # dropout=0: two forward passes in training mode agree exactly
    net.train()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(net(x), net(x))
    paper.train()
    assert not torch.equal(paper(x), paper(x))


def test_figure1_net_is_the_four_layer_cifar_net():
    net = build_network(
        ModelConfig(
            arch="figure1_cnn", num_classes=10, input_size=32, activation="tanh", dropout=0.0, columns=1
        )
    )
    assert isinstance(net, Figure1CNN)
    weighted = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in weighted] == [
        32,
        32,
        64,
        10,
    ]
    # 5x5 kernels: 3*32*25+32 + 32*32*25+32 + 32*64*25+64 + 64*4*4*10+10
    assert sum(p.numel() for p in net.parameters()) == 89_578
    assert all(isinstance(m, nn.Tanh) for name, m in net.features.named_children() if name.startswith("act"))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="one-column"):
        Figure1CNN(columns=2)


@pytest.mark.parametrize("input_size", [32, 227])
@pytest.mark.parametrize("columns", [1, 2])
@pytest.mark.parametrize("removed", ["conv3", "conv4", "conv5"])
def test_removing_a_middle_conv_layer_keeps_every_shape_valid(input_size: int, columns: int, removed: str):
    """Section 6's depth claim: the layers after the removed one take the maps of the layer before it, the
    maps keep their sizes, and the network still computes, in both columns, at 32 and at 227."""
    net = AlexNet(num_classes=10, input_size=input_size, columns=columns, removed_conv=removed, width=0.125)
    names = [n for n, m in net.features.named_children() if isinstance(m, nn.Conv2d)]
    assert names == [c for c in ("conv1", "conv2", "conv3", "conv4", "conv5") if c != removed]
    x = torch.randn(2, 3, input_size, input_size)
    with torch.no_grad():
        assert net(x).shape == (2, 10)
    assert map_sides(net, x) == MAP_SIDES[input_size]
    full = AlexNet(num_classes=10, input_size=input_size, columns=columns, width=0.125)
    # The removed layer's weights are gone. (The total can still grow: without conv5, fc6 reads conv4's
    # wider maps.)
    assert not hasattr(net.features, removed)
    assert count(net) != count(full)
    if columns == 2 and removed != "conv3":
        assert net.features.conv3.groups == 1  # the columns still cross at conv3


def test_a_removed_layer_is_refused_for_figure1s_net():
    with pytest.raises(ValueError, match="removed_conv"):
        ModelConfig(arch="figure1_cnn", input_size=32, columns=1, dropout=0.0, removed_conv="conv3")


def test_layers_an_arm_does_not_reshape_start_from_the_same_weights():
    """Common random numbers: with the same seed, a layer keeps its initial weights across arms whenever
    its shape is the same (tanh only rescales the same normal draws by its gain); another seed differs."""
    paper = dict(AlexNet(input_size=32, width=0.25, seed=7).named_parameters())
    no_lrn = dict(AlexNet(input_size=32, width=0.25, lrn=False, seed=7).named_parameters())
    tanh = dict(AlexNet(input_size=32, width=0.25, activation="tanh", seed=7).named_parameters())
    one_column = dict(AlexNet(input_size=32, width=0.25, columns=1, seed=7).named_parameters())
    other_seed = dict(AlexNet(input_size=32, width=0.25, seed=8).named_parameters())
    for name, weight in paper.items():
        assert torch.equal(weight, no_lrn[name]), name
        if weight.dim() > 1 and name != "classifier.fc8.weight":  # fc8's gain is linear in both
            assert torch.allclose(tanh[name] * (2**0.5) / (5 / 3), weight, atol=1e-6), name
        assert not torch.equal(weight, other_seed[name]) or weight.abs().sum() == 0, name
    shared = [n for n in paper if one_column[n].shape == paper[n].shape]
    assert shared == [n for n in paper if n.startswith(("features.conv5", "classifier"))]
    assert all(torch.equal(paper[n], one_column[n]) for n in shared)
