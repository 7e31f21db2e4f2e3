"""The network of Krizhevsky, Sutskever & Hinton (NIPS 2012), with the switches an ablation flips.

Section numbers below refer to the paper. The default arguments build the paper's network: 227x227 input,
two columns, ReLU, local response normalization after conv1 and conv2, overlapping 3x3/2 max-pooling,
dropout 0.5 in fc6 and fc7. With ``num_classes=1000`` it has exactly 60,965,224 parameters.

``input_size=32`` builds the CIFAR-sized variant, which differs from the 227 network only in its first
layer and in the size of the maps it produces (see ``AlexNet`` and the README's table).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Literal

import torch
from torch import nn

Arch = Literal["alexnet", "figure1_cnn"]
Activation = Literal["relu", "tanh", "sigmoid"]
Pool = Literal["overlapping", "non_overlapping"]
PoolType = Literal["max", "avg"]
Init = Literal["paper", "kaiming"]

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


class _LRNFunction(torch.autograd.Function):
    """Cross-channel LRN with a hand-written backward pass.

    Why not ``torch.nn.LocalResponseNorm``: it builds the window sum from pad + avg_pool3d and lets autograd
    differentiate every intermediate, which halves the training speed of the 32x32 net on a 2-core CPU
    (benchmarks/lrn_speed.py). Here the forward saves the input and two maps and the backward is the
    closed form of the derivative:

        y_i = x_i * d_i^-beta,   d_i = k + alpha * sum_{j in W(i)} x_j^2
        dL/dx_i = g_i * d_i^-beta - 2 * alpha * beta * x_i * sum_{j in W(i)} g_j * y_j / d_j

    (the window W is symmetric, so "i in W(j)" and "j in W(i)" are the same set).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
        d = _window_sum(x * x, size, groups).mul_(alpha).add_(k)
        # d^-beta as exp(-beta * log d): same value, about 3x faster than Tensor.pow on the CPU.
        scale = d.log().mul_(-beta).exp_()
        ctx.save_for_backward(x, d, scale)
        ctx.hyper = (size, alpha, beta, groups)
        return x * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, d, scale = ctx.saved_tensors
        size, alpha, beta, groups = ctx.hyper
        t = (grad * x).mul_(scale).div_(d)  # g_j * y_j / d_j, with y = x * scale
        grad_x = _window_sum(t, size, groups).mul_(x).mul_(-2.0 * alpha * beta).addcmul_(grad, scale)
        return grad_x, None, None, None, None, None


def _window_sum(x: torch.Tensor, size: int, groups: int) -> torch.Tensor:
    """Sum over the ``size`` channels centred on each channel, clipped at the edges of each group."""
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    out = xg.clone()
    for shift in range(1, size // 2 + 1):
        out[:, :, shift:] += xg[:, :, :-shift]
        out[:, :, :-shift] += xg[:, :, shift:]
    return out.view(n, c, h, w)


class LocalResponseNorm(nn.Module):
    """Section 3.3: b_i = a_i / (k + alpha * sum_{j=max(0,i-n/2)}^{min(N-1,i+n/2)} a_j^2)^beta.

    Unlike ``torch.nn.LocalResponseNorm``, ``alpha`` is the paper's alpha (torch divides it by n).
    ``groups`` keeps the sum inside each column: in the paper each GPU normalises its own kernel maps,
    since the columns exchange activations only at conv3 and the FC layers (section 3.2).
    """

    def __init__(
        self,
        size: int = LRN_SIZE,
        alpha: float = LRN_ALPHA,
        beta: float = LRN_BETA,
        k: float = LRN_K,
        groups: int = 1,
    ):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32 under fp16/bf16 autocast: x^2 overflows fp16 above 256; bf16 is too coarse for log/exp.
        a = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return _LRNFunction.apply(a, self.size, self.alpha, self.beta, self.k, self.groups).to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


def _activation(name: Activation) -> nn.Module:
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}[name]()


def _pool(pool: Pool, pool_type: PoolType) -> nn.Module:
    # Section 3.4: overlapping pooling is z=3, s=2; the comparison is z=2, s=2, "which produces output of
    # equivalent dimensions". ceil_mode follows cuda-convnet/Caffe: on the 227 net's odd map sizes
    # (55, 27, 13) it changes nothing, and on the 32 net it makes 3/2 give the same 16/8/4 maps as 2/2.
    kernel, ceil = (3, True) if pool == "overlapping" else (2, False)
    if pool_type == "max":
        return nn.MaxPool2d(kernel, stride=2, ceil_mode=ceil)
    # LeNet-5's choice. Windows that hang over the edge (ceil_mode) average only the real pixels.
    return nn.AvgPool2d(kernel, stride=2, ceil_mode=ceil, count_include_pad=False)


def _scaled(channels: int, width: float, columns: int) -> int:
    """Channels times the width multiplier, kept divisible by the number of columns."""
    return max(columns, round(channels * width / columns) * columns)


class AlexNet(nn.Module):
    """AlexNet, section 3 of the paper.

    Args:
        num_classes: outputs of fc8.
        input_size: 227 (the paper's network) or 32 (CIFAR-sized: conv1 is 5x5 stride 1 instead of 11x11
            stride 4, so the maps are 32/16/8/4 instead of 55/27/13/6; every other layer is the same).
        activation: non-linearity after every conv and hidden FC layer (section 3.1).
        pool: ``overlapping`` 3x3 stride 2, or ``non_overlapping`` 2x2 stride 2 (section 3.4).
        pool_type: ``max`` (the paper) or ``avg``.
        lrn: local response normalization after the activation of conv1 and conv2 (section 3.3).
        dropout: drop probability for the outputs of fc6 and fc7 (section 4.2); 0 turns it off.
        columns: 2 = the two-column net (conv2, conv4, conv5 see only their own column's maps; conv3 and
            the FC layers see both); 1 = the paper's one-GPU comparison net (section 3.2, footnote 2).
        init: ``paper`` = N(0, 0.01) weights, biases 1 in conv2, conv4, conv5, fc6, fc7 and 0 elsewhere
            (section 5); ``kaiming`` = He-normal weights with the activation's gain, zero biases.
        width: multiplier for every conv and FC width (1.0 = the paper's), for nets that fit a laptop.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        input_size: int = 227,
        activation: Activation = "relu",
        pool: Pool = "overlapping",
        pool_type: PoolType = "max",
        lrn: bool = True,
        dropout: float = 0.5,
        columns: int = 2,
        init: Init = "kaiming",
        width: float = 1.0,
    ):
        super().__init__()
        if input_size not in STEMS:
            raise ValueError(f"input_size={input_size} is not supported; use one of {sorted(STEMS)}")
        if columns not in (1, 2):
            raise ValueError(f"columns={columns} is not supported; use 1 or 2")
        self.activation, self.init = activation, init
        base = PAPER_CONV_CHANNELS if columns == 2 else ONE_COLUMN_CONV_CHANNELS
        c1, c2, c3, c4, c5 = (_scaled(c, width, columns) for c in base)
        fc = _scaled(PAPER_FC_UNITS, width, columns)
        kernel, stride, padding = STEMS[input_size]
        # Both columns' conv1 kernels see the whole image, so one conv with c1 kernels is exactly the
        # two 48-kernel halves side by side; channel order is column A then column B throughout.
        g = columns
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, c1, kernel, stride=stride, padding=padding),
                act1=_activation(activation),
                lrn1=LocalResponseNorm(groups=g) if lrn else nn.Identity(),
                pool1=_pool(pool, pool_type),
                conv2=nn.Conv2d(c1, c2, 5, padding=2, groups=g),
                act2=_activation(activation),
                lrn2=LocalResponseNorm(groups=g) if lrn else nn.Identity(),
                pool2=_pool(pool, pool_type),
                conv3=nn.Conv2d(c2, c3, 3, padding=1),  # the columns cross here
                act3=_activation(activation),
                conv4=nn.Conv2d(c3, c4, 3, padding=1, groups=g),
                act4=_activation(activation),
                conv5=nn.Conv2d(c4, c5, 3, padding=1, groups=g),
                act5=_activation(activation),
                pool5=_pool(pool, pool_type),
            )
        )
        side = self.feature_side(input_size)
        self.classifier = nn.Sequential(
            OrderedDict(
                fc6=nn.Linear(c5 * side * side, fc),
                act6=_activation(activation),
                drop6=nn.Dropout(dropout),
                fc7=nn.Linear(fc, fc),
                act7=_activation(activation),
                drop7=nn.Dropout(dropout),
                fc8=nn.Linear(fc, num_classes),
            )
        )
        self.reset_parameters()

    @staticmethod
    def feature_side(input_size: int) -> int:
        """Side of pool5's output maps: 6 for the 227 net, 4 for the 32 net (either pooling)."""
        kernel, stride, padding = STEMS[input_size]
        side = (input_size + 2 * padding - kernel) // stride + 1
        for _ in range(3):
            side //= 2  # ceil((s - 3) / 2) + 1 for 3/2 with ceil_mode, floor(s / 2) for 2/2: both s // 2
        return side

    def reset_parameters(self) -> None:
        layers = {name: m for name, m in self.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        for name, layer in layers.items():
            short = name.split(".")[-1]
            if self.init == "paper":
                # Section 5: "zero-mean Gaussian distribution with standard deviation 0.01", neuron biases
                # of conv2, conv4, conv5 and the hidden FC layers set to 1 "to accelerate the early stages".
                nn.init.normal_(layer.weight, 0.0, 0.01)
                nn.init.constant_(
                    layer.bias, 1.0 if short in {"conv2", "conv4", "conv5", "fc6", "fc7"} else 0.0
                )
            else:
                nonlinearity = "linear" if short == "fc8" else self.activation
                nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _column_slice(tensor: torch.Tensor, column: int) -> torch.Tensor:
    """Column ``column``'s half of a weight or bias along its output axis (``AlexNet`` orders A, then B)."""
    half = tensor.shape[0] // 2
    return tensor[column * half : (column + 1) * half]


def _column_conv(conv: nn.Conv2d, column: int) -> nn.Conv2d:
    """One column's kernels of ``conv``. A grouped conv (conv2, conv4, conv5) keeps only its own column's
    input maps; an ungrouped one (conv1 on the image, conv3 where the columns cross) keeps all of them."""
    if conv.groups not in (1, 2):
        raise ValueError(f"{conv} has {conv.groups} groups; a two-column net has 1 or 2")
    inputs = conv.in_channels // conv.groups
    half = nn.Conv2d(
        inputs, conv.out_channels // 2, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        half.weight.copy_(_column_slice(conv.weight, column))
        half.bias.copy_(_column_slice(conv.bias, column))
    return half


def _column_linear(fc: nn.Linear, column: int) -> nn.Linear:
    """One column's neurons of a fully-connected layer: half the outputs, from all inputs (section 3.5)."""
    half = nn.Linear(fc.in_features, fc.out_features // 2, device=fc.weight.device, dtype=fc.weight.dtype)
    with torch.no_grad():
        half.weight.copy_(_column_slice(fc.weight, column))
        half.bias.copy_(_column_slice(fc.bias, column))
    return half


def _column_lrn(lrn: nn.Module) -> nn.Module:
    """LRN over one column's maps: the grouped layer's sum, which never crosses columns, on one column."""
    if isinstance(lrn, LocalResponseNorm):
        return LocalResponseNorm(lrn.size, lrn.alpha, lrn.beta, lrn.k, groups=1)
    return nn.Identity()


class _Column(nn.Module):
    """One GPU's half of the two-column net: its kernels in every conv layer, its neurons in fc6 and fc7."""

    def __init__(self, net: AlexNet, column: int):
        super().__init__()
        f, c = net.features, net.classifier
        self.conv1, self.act1 = _column_conv(f.conv1, column), copy.deepcopy(f.act1)
        self.lrn1, self.pool1 = _column_lrn(f.lrn1), copy.deepcopy(f.pool1)
        self.conv2, self.act2 = _column_conv(f.conv2, column), copy.deepcopy(f.act2)
        self.lrn2, self.pool2 = _column_lrn(f.lrn2), copy.deepcopy(f.pool2)
        self.conv3, self.act3 = _column_conv(f.conv3, column), copy.deepcopy(f.act3)
        self.conv4, self.act4 = _column_conv(f.conv4, column), copy.deepcopy(f.act4)
        self.conv5, self.act5 = _column_conv(f.conv5, column), copy.deepcopy(f.act5)
        self.pool5 = copy.deepcopy(f.pool5)
        self.fc6, self.act6 = _column_linear(c.fc6, column), copy.deepcopy(c.act6)
        self.drop6 = copy.deepcopy(c.drop6)
        self.fc7, self.act7 = _column_linear(c.fc7, column), copy.deepcopy(c.act7)
        self.drop7 = copy.deepcopy(c.drop7)

    def below_conv3(self, image: torch.Tensor) -> torch.Tensor:
        """conv1 to pool2, on this column's maps only."""
        x = self.pool1(self.lrn1(self.act1(self.conv1(image))))
        return self.pool2(self.lrn2(self.act2(self.conv2(x))))

    def conv3_to_pool5(self, both: torch.Tensor) -> torch.Tensor:
        """conv3 (from both columns' maps), then conv4 and conv5 on this column's maps only."""
        x = self.act4(self.conv4(self.act3(self.conv3(both))))
        return torch.flatten(self.pool5(self.act5(self.conv5(x))), 1)

    def layer6(self, both: torch.Tensor) -> torch.Tensor:
        return self.drop6(self.act6(self.fc6(both)))

    def layer7(self, both: torch.Tensor) -> torch.Tensor:
        return self.drop7(self.act7(self.fc7(both)))


def _exchange(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both columns' activations, [A, B] along the channel axis, on A's device and on B's device: one copy
    each way between the devices (none when they are the same device)."""
    return torch.cat([a, b.to(a.device)], dim=1), torch.cat([a.to(b.device), b], dim=1)


class TwoDeviceAlexNet(nn.Module):
    """Section 3.2's two-GPU network: the two columns of a grouped ``AlexNet`` on two devices.

    "The parallelization scheme that we employ essentially puts half of the kernels (or neurons) on each GPU,
    with one additional trick: the GPUs communicate only in certain layers." Column A (the first half of every
    layer's kernels and neurons in ``AlexNet``'s channel order) lives on ``devices[0]``, column B on
    ``devices[1]``. conv1, conv2, conv4, conv5 and LRN work within a column; conv3, fc6 and fc7 take both
    columns' outputs, so at each of them the columns copy their activations to each other (each column then
    computes its own half of the outputs); fc8 gathers both columns' fc7 outputs on ``devices[0]``, where the
    logits, and so the labels and the loss, are.

    Built from a grouped ``AlexNet`` (``columns=2``) by splitting its parameters: with the same weights both
    compute the same function, forward and backward; only where it runs differs. ``grouped_state_dict()``
    gives the weights back in ``AlexNet``'s layout. Both devices may be the same (e.g. ``"cpu"``): the copies
    between columns are then no-ops, and everything else runs as on two devices.

    Lightning moves a whole module to one device; ``place()`` puts the columns back on their own devices
    (``alexnet.devices.ColumnParallelStrategy`` calls it whenever Lightning has moved the module).
    """

    def __init__(self, net: AlexNet, devices: tuple[torch.device | str, torch.device | str] = ("cpu", "cpu")):
        super().__init__()
        if not isinstance(net, AlexNet) or net.features.conv2.groups != 2:
            raise ValueError(
                "TwoDeviceAlexNet splits the two columns of AlexNet(columns=2); got "
                f"{type(net).__name__} with {getattr(getattr(net, 'features', None), 'conv2', None)}"
            )
        if len(devices) != 2:
            raise ValueError(f"devices={devices!r}: give two devices, one per column (section 3.2)")
        self.devices = (torch.device(devices[0]), torch.device(devices[1]))
        self.column_a, self.column_b = _Column(net, 0), _Column(net, 1)
        self.fc8 = copy.deepcopy(net.classifier.fc8)
        self.place()

    def place(self) -> TwoDeviceAlexNet:
        """Column A and fc8 on ``devices[0]``, column B on ``devices[1]``."""
        self.column_a.to(self.devices[0])
        self.fc8.to(self.devices[0])
        self.column_b.to(self.devices[1])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.column_a, self.column_b
        # Each GPU gets the whole image batch (both columns' conv1 kernels see all three colour channels).
        xa, xb = a.below_conv3(x.to(self.devices[0])), b.below_conv3(x.to(self.devices[1]))
        # Section 3.5: "the kernels of the third convolutional layer are connected to all kernel maps in the
        # second layer", and "the neurons in the fully-connected layers are connected to all neurons in the
        # previous layer": the columns exchange activations before conv3, fc6, fc7 and fc8.
        both_a, both_b = _exchange(xa, xb)
        xa, xb = a.conv3_to_pool5(both_a), b.conv3_to_pool5(both_b)
        both_a, both_b = _exchange(xa, xb)
        xa, xb = a.layer6(both_a), b.layer6(both_b)
        both_a, both_b = _exchange(xa, xb)
        xa, xb = a.layer7(both_a), b.layer7(both_b)
        return self.fc8(torch.cat([xa, xb.to(self.devices[0])], dim=1))

    def grouped_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in ``AlexNet``'s layout (on the CPU): ``AlexNet(columns=2, ...).load_state_dict`` takes
        them, e.g. to evaluate a model-parallel checkpoint on one device."""
        layers = {
            "conv1": "features", "conv2": "features", "conv3": "features", "conv4": "features",
            "conv5": "features", "fc6": "classifier", "fc7": "classifier",
        }  # fmt: skip
        state: dict[str, torch.Tensor] = {}
        for layer, block in layers.items():
            for kind in ("weight", "bias"):
                halves = [
                    getattr(getattr(col, layer), kind).detach().cpu()
                    for col in (self.column_a, self.column_b)
                ]
                state[f"{block}.{layer}.{kind}"] = torch.cat(halves)
        state["classifier.fc8.weight"] = self.fc8.weight.detach().cpu().clone()
        state["classifier.fc8.bias"] = self.fc8.bias.detach().cpu().clone()
        return state


# Figure 1's network: the paper says only "a four-layer convolutional neural network" on CIFAR-10. Its
# authors' cuda-convnet shipped such a net for CIFAR-10 (layers-18pct: three 5x5 conv layers of 32, 32 and
# 64 kernels, each followed by 3x3/2 pooling, then one fully-connected layer), which is the one built here.
FIGURE1_CONV_CHANNELS = (32, 32, 64)


class Figure1CNN(nn.Module):
    """The four-layer CIFAR-10 net of Figure 1 (ReLU vs tanh training speed), with AlexNet's switches.

    Takes the same arguments as ``AlexNet`` so one config group builds either. ``activation``, ``pool``,
    ``pool_type``, ``lrn`` (after pool1 and pool2, where cuda-convnet's CIFAR nets normalise), ``init`` and
    ``width`` apply; it has one column and no dropout layer ("no regularization of any kind", Figure 1).
    """

    def __init__(
        self,
        num_classes: int = 10,
        input_size: int = 32,
        activation: Activation = "relu",
        pool: Pool = "overlapping",
        pool_type: PoolType = "max",
        lrn: bool = False,
        dropout: float = 0.0,
        columns: int = 1,
        init: Init = "kaiming",
        width: float = 1.0,
    ):
        super().__init__()
        if input_size != 32 or columns != 1 or dropout != 0.0:
            raise ValueError(
                f"Figure1CNN is a 32x32, one-column net without dropout; got input_size={input_size}, "
                f"columns={columns}, dropout={dropout}"
            )
        self.activation, self.init = activation, init
        c1, c2, c3 = (_scaled(c, width, 1) for c in FIGURE1_CONV_CHANNELS)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, c1, 5, padding=2),
                act1=_activation(activation),
                pool1=_pool(pool, pool_type),
                lrn1=LocalResponseNorm() if lrn else nn.Identity(),
                conv2=nn.Conv2d(c1, c2, 5, padding=2),
                act2=_activation(activation),
                pool2=_pool(pool, pool_type),
                lrn2=LocalResponseNorm() if lrn else nn.Identity(),
                conv3=nn.Conv2d(c2, c3, 5, padding=2),
                act3=_activation(activation),
                pool3=_pool(pool, pool_type),
            )
        )
        self.classifier = nn.Sequential(OrderedDict(fc4=nn.Linear(c3 * 4 * 4, num_classes)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, layer in self.named_modules():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                if self.init == "paper":
                    nn.init.normal_(layer.weight, 0.0, 0.01)
                else:
                    nonlinearity = "linear" if name.endswith("fc4") else self.activation
                    nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


NETWORKS: dict[str, type[nn.Module]] = {"alexnet": AlexNet, "figure1_cnn": Figure1CNN}


def build_network(arch: Arch = "alexnet", **switches) -> nn.Module:
    """The network named by ``model.arch``, built with the model config's other keys."""
    return NETWORKS[arch](**switches)
