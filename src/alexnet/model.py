"""The network of Krizhevsky, Sutskever & Hinton (NIPS 2012), with the switches an ablation flips.

``ModelConfig`` is the one place where each switch, its allowed values and its default (the paper's) are
written; ``conf/model/*.yaml``, the config check and the networks below all take them from there. Section
numbers refer to the paper. The defaults build the paper's network: 227x227 input, two columns, ReLU, local
response normalization after conv1 and conv2, overlapping 3x3/2 max-pooling, dropout 0.5 in fc6 and fc7.
With ``num_classes=1000`` it has exactly 60,965,224 parameters.

``input_size=32`` builds the CIFAR-sized variant, which differs from the 227 network only in its first layer
and in the size of the maps it produces (see ``AlexNet`` and docs/switches.md).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum

import torch
from torch import nn

from alexnet.errors import require
from alexnet.seeding import generator


class Choice(str, Enum):
    """A switch's allowed values; shown as the value itself (``tanh``), also inside interpolated strings."""

    def __str__(self) -> str:
        return self.value


class Arch(Choice):
    alexnet = "alexnet"
    figure1_cnn = "figure1_cnn"  # Figure 1's four-layer CIFAR-10 net


class Activation(Choice):
    relu = "relu"
    tanh = "tanh"
    sigmoid = "sigmoid"


class Pool(Choice):
    overlapping = "overlapping"  # 3x3, stride 2 (section 3.4)
    non_overlapping = "non_overlapping"  # 2x2, stride 2: "output of equivalent dimensions"


class PoolType(Choice):
    max = "max"
    avg = "avg"  # LeNet-5's choice


class Init(Choice):
    paper = "paper"  # N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7 (section 5)
    kaiming = "kaiming"  # He-normal with the activation's gain, zero biases


class MiddleConv(Choice):
    """Section 6: "removing any of the middle convolutional layers results in a loss of about 2%"."""

    conv3 = "conv3"
    conv4 = "conv4"
    conv5 = "conv5"


@dataclass
class ModelConfig:
    """Every switch of the network (config group ``conf/model/``), with the paper's value as its default."""

    arch: Arch = Arch.alexnet
    num_classes: int = 1000
    input_size: int = 227  # 227: the paper's net (section 3.5); 32: the CIFAR-sized net (5x5/1 conv1)
    activation: Activation = Activation.relu  # after every conv and hidden FC layer (section 3.1)
    pool: Pool = Pool.overlapping  # section 3.4
    pool_type: PoolType = PoolType.max
    lrn: bool = True  # after the activation of conv1 and conv2 (section 3.3)
    dropout: float = 0.5  # the outputs of fc6 and fc7 (section 4.2); 0 turns it off
    columns: int = 2  # 2: the two-column net; 1: the one-GPU net of section 3.2, footnote 2
    removed_conv: MiddleConv | None = None  # section 6's depth claim: the net without one middle layer
    init: Init = Init.kaiming
    width: float = 1.0  # multiplier for every conv and FC width, for nets that fit a laptop

    def __post_init__(self) -> None:
        for key, kind in (("arch", Arch), ("activation", Activation), ("pool", Pool),
                          ("pool_type", PoolType), ("init", Init)):  # fmt: skip
            setattr(self, key, kind(getattr(self, key)))  # plain strings from Python callers
        if self.removed_conv is not None:
            self.removed_conv = MiddleConv(self.removed_conv)
        require(self.num_classes >= 2, "model.num_classes", self.num_classes, "need at least 2 classes")
        require(self.input_size in STEMS, "model.input_size", self.input_size, "use 227 or 32")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a probability in [0, 1)")
        require(
            self.columns in (1, 2), "model.columns", self.columns, "1 (one-GPU net) or 2 (two-column net)"
        )
        require(0.0 < self.width <= 4.0, "model.width", self.width, "a multiplier in (0, 4]")
        if self.arch is Arch.figure1_cnn:
            why = "Figure 1's four-layer net (model.arch=figure1_cnn) is one-column, 32x32, no dropout"
            require(self.input_size == 32, "model.input_size", self.input_size, why)
            require(self.columns == 1, "model.columns", self.columns, why)
            require(self.dropout == 0.0, "model.dropout", self.dropout, why)
            require(self.removed_conv is None, "model.removed_conv", self.removed_conv, why)


# Section 3.3: "k = 2, n = 5, alpha = 1e-4, and beta = 0.75".
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0

# Section 3.5: kernels per layer of the two-column net (both columns together), and the FC widths.
PAPER_CONV_CHANNELS = (96, 256, 384, 384, 256)
PAPER_FC_UNITS = 4096
# Section 3.2, footnote 2: the one-GPU comparison net halves conv1-conv4 but not conv5 or the FC layers.
ONE_COLUMN_CONV_CHANNELS = (48, 128, 192, 192, 256)

# First layer per input size: (kernel, stride, padding). 227: section 3.5 (the paper writes 224, which does
# not give the 55x55 maps it reports; 227 does). 32: cuda-convnet's CIFAR-10 nets use 5x5/1 kernels; a
# stride of 4 on a 32-pixel image would leave 8x8 maps before the first pooling.
STEMS = {227: (11, 4, 0), 32: (5, 1, 2)}

# Elements per temporary in the LRN's CPU passes: 2 MB of fp32, so that a chunk's passes run in cache.
_LRN_CHUNK = 1 << 19


class _LRNFunction(torch.autograd.Function):
    """Cross-channel LRN with a hand-written backward pass, on channels-last rows.

    Why not ``torch.nn.LocalResponseNorm``: it builds the window sum from pad + avg_pool3d and lets autograd
    differentiate every intermediate, which halves the training speed of the 32x32 net on a CPU. Here the
    input is viewed as rows of one pixel's channels of one column (free for a channels_last tensor), the
    window sum over neighbouring channels is one matrix product with a banded 0/1 matrix, and the backward
    is the closed form of the derivative:

        y_i = x_i * d_i^-beta,   d_i = k + alpha * sum_{j in W(i)} x_j^2
        dL/dx_i = g_i * d_i^-beta - 2 * alpha * beta * x_i * sum_{j in W(i)} g_j * y_j / d_j

    (the window W is symmetric, so "i in W(j)" and "j in W(i)" are the same set). On the CPU the rows are
    processed in chunks whose temporaries stay in cache: every pass over a whole 128-image batch would go
    to memory, and those passes, not the arithmetic, are what LRN costs (benchmarks/training_speed.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c // groups)  # a view when x is channels_last
        offsets = torch.arange(c // groups, device=x.device)
        band = ((offsets[:, None] - offsets[None, :]).abs() <= size // 2).to(x.dtype)
        d, scale, y = torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows)
        k_row = rows.new_full((1,), k)
        chunk = max(1, _LRN_CHUNK // rows.shape[1]) if x.device.type == "cpu" else len(rows)
        for s in range(0, len(rows), chunk):
            part = slice(s, s + chunk)
            torch.addmm(k_row, rows[part] * rows[part], band, alpha=alpha, out=d[part])
            if beta == LRN_BETA:  # d^-3/4 as d^-1/2 * d^-1/4: two square roots, far cheaper than pow
                torch.rsqrt(d[part], out=scale[part])
                scale[part].mul_(scale[part].sqrt())
            else:
                torch.pow(d[part], -beta, out=scale[part])
            torch.mul(rows[part], scale[part], out=y[part])
        ctx.save_for_backward(rows, d, scale, y, band)
        ctx.meta = (n, h, w, c, -2.0 * alpha * beta, chunk)
        return y.view(n, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        rows, d, scale, y, band = ctx.saved_tensors
        n, h, w, c, factor, chunk = ctx.meta
        g = grad.permute(0, 2, 3, 1).reshape(rows.shape)
        grad_x = torch.empty_like(rows)
        band = band * factor
        for s in range(0, len(rows), chunk):
            part = slice(s, s + chunk)
            t = (g[part] * y[part]).div_(d[part])  # g_j * y_j / d_j
            torch.mm(t, band, out=grad_x[part])
            grad_x[part].mul_(rows[part]).addcmul_(g[part], scale[part])
        return grad_x.view(n, h, w, c).permute(0, 3, 1, 2), None, None, None, None, None


class LocalResponseNorm(nn.Module):
    """Section 3.3: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta.

    Unlike ``torch.nn.LocalResponseNorm``, ``alpha`` is the paper's alpha (torch divides it by n).
    ``groups`` keeps the sum inside each column: in the paper each GPU normalises its own kernel maps,
    since the columns exchange activations only at conv3 and the FC layers (section 3.2).
    """

    def __init__(self, size=LRN_SIZE, alpha=LRN_ALPHA, beta=LRN_BETA, k=LRN_K, groups: int = 1):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 under fp16/bf16 autocast: x^2 overflows fp16 above 256; bf16 is too coarse for d^-beta.
        a = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return _LRNFunction.apply(a, self.size, self.alpha, self.beta, self.k, self.groups).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


def _activation(name: Activation) -> nn.Module:
    return {Activation.relu: nn.ReLU, Activation.tanh: nn.Tanh, Activation.sigmoid: nn.Sigmoid}[name]()


def _pool(cfg: ModelConfig) -> nn.Module:
    # Section 3.4: overlapping pooling is z=3, s=2; the comparison is z=2, s=2, "which produces output of
    # equivalent dimensions". ceil_mode follows cuda-convnet/Caffe: on the 227 net's odd map sizes
    # (55, 27, 13) it changes nothing, and on the 32 net it makes 3/2 give the same 16/8/4 maps as 2/2.
    kernel, ceil = (3, True) if cfg.pool is Pool.overlapping else (2, False)
    if cfg.pool_type is PoolType.max:
        return nn.MaxPool2d(kernel, stride=2, ceil_mode=ceil)
    # Windows that hang over the edge (ceil_mode) average only the real pixels.
    return nn.AvgPool2d(kernel, stride=2, ceil_mode=ceil, count_include_pad=False)


def _scaled(channels: int, width: float, columns: int) -> int:
    """Channels times the width multiplier, kept divisible by the number of columns."""
    return max(columns, round(channels * width / columns) * columns)


def _config(cfg: ModelConfig | None, switches: dict) -> ModelConfig:
    if cfg is not None and switches:
        raise TypeError("give a ModelConfig or keyword switches, not both")
    return cfg if cfg is not None else ModelConfig(**switches)


class AlexNet(nn.Module):
    """AlexNet, section 3 of the paper: ``AlexNet(ModelConfig(...))`` or ``AlexNet(width=0.5, ...)``.

    Columns: with ``columns=2``, conv2, conv4 and conv5 see only their own column's maps (grouped
    convolutions, channel order column A then column B throughout); conv3 and the FC layers see both.
    ``removed_conv`` drops one middle layer; the layers after it keep their kernels and grouping and take
    the maps of the layer before it (one fewer crossing of the columns when it is conv3).
    ``seed`` fixes the initial weights, layer by layer (alexnet.seeding); without one they are drawn from
    the global generator.
    """

    def __init__(self, cfg: ModelConfig | None = None, *, seed: int | None = None, **switches):
        super().__init__()
        cfg = self.cfg = _config(cfg, switches)
        require(cfg.arch is Arch.alexnet, "model.arch", cfg.arch.value, "AlexNet builds model.arch=alexnet")
        base = PAPER_CONV_CHANNELS if cfg.columns == 2 else ONE_COLUMN_CONV_CHANNELS
        c1, c2, c3, c4, c5 = (_scaled(c, cfg.width, cfg.columns) for c in base)
        fc = _scaled(PAPER_FC_UNITS, cfg.width, cfg.columns)
        kernel, stride, padding = STEMS[cfg.input_size]
        g = cfg.columns
        layers = OrderedDict(
            # Both columns' conv1 kernels see the whole image: one conv with c1 kernels is exactly the two
            # halves side by side.
            conv1=nn.Conv2d(3, c1, kernel, stride=stride, padding=padding),
            act1=_activation(cfg.activation),
            lrn1=LocalResponseNorm(groups=g) if cfg.lrn else nn.Identity(),
            pool1=_pool(cfg),
            conv2=nn.Conv2d(c1, c2, 5, padding=2, groups=g),
            act2=_activation(cfg.activation),
            lrn2=LocalResponseNorm(groups=g) if cfg.lrn else nn.Identity(),
            pool2=_pool(cfg),
        )
        maps = c2
        middle = (("conv3", c3, 1), ("conv4", c4, g), ("conv5", c5, g))  # conv3: the columns cross here
        for index, (name, out, groups) in enumerate(middle, start=3):
            if cfg.removed_conv is not None and name == cfg.removed_conv.value:
                continue
            layers[name] = nn.Conv2d(maps, out, 3, padding=1, groups=groups)
            layers[f"act{index}"] = _activation(cfg.activation)
            maps = out
        layers["pool5"] = _pool(cfg)
        self.features = nn.Sequential(layers)
        side = self.feature_side(cfg.input_size)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(maps * side * side, fc),
                act6=_activation(cfg.activation),
                drop6=nn.Dropout(cfg.dropout),
                fc7=nn.Linear(fc, fc),
                act7=_activation(cfg.activation),
                drop7=nn.Dropout(cfg.dropout),
                fc8=nn.Linear(fc, cfg.num_classes),
            )
        )
        initialize(self, cfg, seed)

    @staticmethod
    def feature_side(input_size: int) -> int:
        """Side of pool5's output maps: 6 for the 227 net, 4 for the 32 net (either pooling)."""
        kernel, stride, padding = STEMS[input_size]
        side = (input_size + 2 * padding - kernel) // stride + 1
        for _ in range(3):
            side //= 2  # ceil((s - 3) / 2) + 1 for 3/2 with ceil_mode, floor(s / 2) for 2/2: both s // 2
        return side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


# Section 5: biases of 1 "in the second, fourth, and fifth convolutional layers, as well as in the
# fully-connected hidden layers", "to accelerate the early stages of learning".
_PAPER_UNIT_BIASES = {"conv2", "conv4", "conv5", "fc6", "fc7"}


def initialize(net: nn.Module, cfg: ModelConfig, seed: int | None = None) -> None:
    """Initial weights layer by layer, each from its own stream of ``seed`` (common random numbers: a layer
    another arm leaves unchanged starts from the same weights there). The last layer has a linear gain."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    layers = [(n.split(".")[-1], m) for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    last = layers[-1][0]
    for name, layer in layers:
        draws = generator(seed, "init", name)
        if cfg.init is Init.paper:
            # Section 5: "zero-mean Gaussian distribution with standard deviation 0.01".
            nn.init.normal_(layer.weight, 0.0, 0.01, generator=draws)
            unit = name in _PAPER_UNIT_BIASES and cfg.arch is Arch.alexnet
            nn.init.constant_(layer.bias, 1.0 if unit else 0.0)
        else:
            gain = "linear" if name == last else cfg.activation.value
            nn.init.kaiming_normal_(layer.weight, nonlinearity=gain, generator=draws)
            nn.init.zeros_(layer.bias)


# Figure 1's network: the paper says only "a four-layer convolutional neural network" on CIFAR-10. Its
# authors' cuda-convnet shipped such a net for CIFAR-10 (layers-18pct: three 5x5 conv layers of 32, 32 and
# 64 kernels, each followed by 3x3/2 pooling, then one fully-connected layer), which is the one built here.
FIGURE1_CONV_CHANNELS = (32, 32, 64)


class Figure1CNN(nn.Module):
    """The four-layer CIFAR-10 net of Figure 1 (ReLU vs tanh training speed), with AlexNet's switches.

    ``activation``, ``pool``, ``pool_type``, ``lrn`` (after pool1 and pool2, where cuda-convnet's CIFAR nets
    normalise), ``init`` and ``width`` apply; it has one column and no dropout ("no regularization of any
    kind", Figure 1).
    """

    def __init__(self, cfg: ModelConfig | None = None, *, seed: int | None = None, **switches):
        super().__init__()
        if cfg is None:
            defaults = {"arch": Arch.figure1_cnn, "input_size": 32, "columns": 1, "dropout": 0.0}
            switches = defaults | {"num_classes": 10} | switches
        cfg = self.cfg = _config(cfg, switches)
        c1, c2, c3 = (_scaled(c, cfg.width, 1) for c in FIGURE1_CONV_CHANNELS)
        layers = OrderedDict()
        for index, (inputs, out) in enumerate(((3, c1), (c1, c2), (c2, c3)), start=1):
            layers[f"conv{index}"] = nn.Conv2d(inputs, out, 5, padding=2)
            layers[f"act{index}"] = _activation(cfg.activation)
            layers[f"pool{index}"] = _pool(cfg)
            if index < 3:
                layers[f"lrn{index}"] = LocalResponseNorm() if cfg.lrn else nn.Identity()
        self.features = nn.Sequential(layers)
        self.classifier = nn.Sequential(OrderedDict(fc4=nn.Linear(c3 * 4 * 4, cfg.num_classes)))
        initialize(self, cfg, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


NETWORKS: dict[Arch, type[nn.Module]] = {Arch.alexnet: AlexNet, Arch.figure1_cnn: Figure1CNN}


def build_network(cfg: ModelConfig, seed: int | None = None) -> nn.Module:
    """The network named by ``model.arch``, its initial weights drawn from ``seed``'s streams."""
    return NETWORKS[cfg.arch](cfg, seed=seed)
