"""Where the network runs: one device, section 3.2's two-GPU split of the columns, or data parallel (DDP).

The ``devices`` config group (``conf/devices/``) picks one; ``placement`` turns it into the network's form,
its memory layout and the Trainer's ``devices`` and ``strategy``. None of them changes the function the
network computes (that is ``model.columns``, the paper's one-GPU vs two-GPU ablation); only where and how it
is computed.

- ``one``: Lightning's single-device strategy.
- ``model_parallel``: ``TwoDeviceAlexNet``, column A on the first device, column B on the second, trained by
  one process with ``ColumnParallelStrategy``, which keeps each column on its device where Lightning would
  move the whole module to one.
- ``ddp``: Lightning's ``ddp`` strategy; how one MLflow run spans its processes is in ``alexnet.ddp``.

``devices.channels_last`` (default on) stores activations as N, H, W, C: max pooling and the LRN's channel
window then read memory in order (on one CPU thread the whole gain is theirs: benchmarks/training_speed.md).
"""

from __future__ import annotations

import copy
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from alexnet.config import DeviceMode, DevicesConfig
from alexnet.errors import ConfigError, require
from alexnet.model import AlexNet, LocalResponseNorm

log = logging.getLogger(__name__)


# --- Section 3.2's two GPUs ---------------------------------------------------------------------------------


def _half(tensor: torch.Tensor, column: int) -> torch.Tensor:
    """Column ``column``'s half of a weight or bias along its output axis (``AlexNet`` orders A, then B)."""
    half = tensor.shape[0] // 2
    return tensor[column * half : (column + 1) * half]


def _split(layer: nn.Module, column: int) -> nn.Module:
    """One column's part of a layer of the grouped net: half the kernels or neurons of a conv or FC layer
    (a grouped conv keeps only its own column's input maps; an ungrouped one, all of them), the LRN over one
    column's maps, and a copy of anything without weights."""
    if isinstance(layer, LocalResponseNorm):
        return LocalResponseNorm(layer.size, layer.alpha, layer.beta, layer.k, groups=1)
    if isinstance(layer, nn.Conv2d):
        part = nn.Conv2d(
            layer.in_channels // layer.groups, layer.out_channels // 2, layer.kernel_size,
            stride=layer.stride, padding=layer.padding, device=layer.weight.device, dtype=layer.weight.dtype,
        )  # fmt: skip
    elif isinstance(layer, nn.Linear):
        part = nn.Linear(
            layer.in_features, layer.out_features // 2, device=layer.weight.device, dtype=layer.weight.dtype
        )
    else:
        return copy.deepcopy(layer)
    with torch.no_grad():
        part.weight.copy_(_half(layer.weight, column))
        part.bias.copy_(_half(layer.bias, column))
    return part


def _stages(net: AlexNet) -> list[list[str]]:
    """The grouped net's layers (all but fc8) cut where the columns exchange activations: before every
    ungrouped conv but conv1 (conv3, where "the kernels ... are connected to all kernel maps in the second
    layer") and before fc6 and fc7 ("connected to all neurons in the previous layer"), section 3.5."""
    stages: list[list[str]] = [[]]
    for name, layer in net.features.named_children():
        if isinstance(layer, nn.Conv2d) and layer.groups == 1 and name != "conv1":
            stages.append([])
        stages[-1].append(name)
    stages += [["fc6", "act6", "drop6"], ["fc7", "act7", "drop7"]]
    return stages


class _Column(nn.Module):
    """One GPU's half of the two-column net: its kernels in every conv layer, its neurons in fc6 and fc7."""

    def __init__(self, net: AlexNet, column: int):
        super().__init__()
        self.stages = _stages(net)
        parts = {**dict(net.features.named_children()), **dict(net.classifier.named_children())}
        self.layers = nn.ModuleDict(
            OrderedDict((name, _split(parts[name], column)) for stage in self.stages for name in stage)
        )

    def stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        for name in self.stages[index]:
            if name == "fc6":
                x = torch.flatten(x, 1)
            x = self.layers[name](x)
        return x


def _exchange(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both columns' activations, [A, B] along the channel axis, on A's device and on B's device: one copy
    each way between the devices (none when they are the same device)."""
    return torch.cat([a, b.to(a.device)], dim=1), torch.cat([a.to(b.device), b], dim=1)


class TwoDeviceAlexNet(nn.Module):
    """Section 3.2's two-GPU network: the two columns of a grouped ``AlexNet`` on two devices.

    "The parallelization scheme that we employ essentially puts half of the kernels (or neurons) on each GPU,
    with one additional trick: the GPUs communicate only in certain layers." Column A (the first half of every
    layer's kernels and neurons in ``AlexNet``'s channel order) lives on ``devices[0]``, column B on
    ``devices[1]``. At each layer that takes both columns' outputs (conv3, fc6, fc7) the columns copy their
    activations to each other; fc8 gathers both columns' fc7 outputs on ``devices[0]``, where the logits,
    the labels and the loss are.

    Built from a grouped ``AlexNet`` (``columns=2``) by splitting its parameters: with the same weights both
    compute the same function, forward and backward. ``grouped_state_dict()`` gives the weights back in
    ``AlexNet``'s layout. Both devices may be the same (e.g. ``"cpu"``): the copies are then no-ops.
    Lightning moves a whole module to one device; ``place()`` puts the columns back on their own devices
    (``ColumnParallelStrategy`` calls it whenever Lightning has moved the module).
    """

    def __init__(self, net: AlexNet, devices: tuple[torch.device | str, torch.device | str] = ("cpu", "cpu")):
        super().__init__()
        if not isinstance(net, AlexNet) or net.cfg.columns != 2:
            raise ValueError(
                f"TwoDeviceAlexNet splits the two columns of AlexNet(columns=2); got {type(net).__name__} "
                f"with columns={getattr(getattr(net, 'cfg', None), 'columns', None)}"
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
        xa, xb = a.stage(0, x.to(self.devices[0])), b.stage(0, x.to(self.devices[1]))
        for index in range(1, len(a.stages)):
            both_a, both_b = _exchange(xa, xb)
            xa, xb = a.stage(index, both_a), b.stage(index, both_b)
        return self.fc8(torch.cat([xa, xb.to(self.devices[0])], dim=1))

    def grouped_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in ``AlexNet``'s layout (on the CPU): ``AlexNet(columns=2, ...).load_state_dict`` takes
        them, e.g. to evaluate a model-parallel checkpoint on one device."""
        state: dict[str, torch.Tensor] = {}
        for name, layer in self.column_a.layers.items():
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):
                continue
            block = "classifier" if name.startswith("fc") else "features"
            for kind in ("weight", "bias"):
                halves = [
                    getattr(col.layers[name], kind).detach().cpu() for col in (self.column_a, self.column_b)
                ]
                state[f"{block}.{name}.{kind}"] = torch.cat(halves)
        state["classifier.fc8.weight"] = self.fc8.weight.detach().cpu().clone()
        state["classifier.fc8.bias"] = self.fc8.bias.detach().cpu().clone()
        return state


def column_devices(accelerator: str) -> tuple[torch.device, torch.device]:
    """The devices of column A and column B for ``trainer.accelerator``: the CPU twice on ``cpu``; cuda:0 and
    cuda:1 on ``gpu`` (cuda:0 twice, with a warning, on a machine with one GPU: the same code path, no
    speed-up); ``auto`` is ``gpu`` where CUDA is available, else ``cpu``."""
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    if accelerator in ("gpu", "cuda"):
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(
                f"trainer.accelerator={accelerator}: devices=model_parallel found no CUDA device; use "
                "trainer.accelerator=cpu (both columns on the CPU) or run on a GPU machine."
            )
        if count == 1:
            log.warning(
                "devices=model_parallel on a machine with one GPU: both columns on cuda:0 (the "
                "model-parallel code path, without a second device to gain from)."
            )
            return torch.device("cuda", 0), torch.device("cuda", 0)
        return torch.device("cuda", 0), torch.device("cuda", 1)
    raise ConfigError(
        f"trainer.accelerator={accelerator}: devices=model_parallel runs on cpu, gpu or auto; use one."
    )


def keep_state_with_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's optimizer state (momentum) on that parameter's device."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and key != "step":  # Lightning keeps "step" where torch put it
                    state[key] = value.to(param.device)


class ColumnParallelStrategy(SingleDeviceStrategy):
    """Lightning's single-device strategy for one process that drives the two columns on two devices.

    Lightning moves the whole module to the root device before fit, validate and test (``model_to_device``),
    and moves a restored optimizer state there too (``load_optimizer_state_dict``). Here both are followed by
    putting every ``TwoDeviceAlexNet`` column back on its own device, with its momentum. The root device is
    column A's: batches, labels, logits and the loss live there.
    """

    strategy_name = "column_parallel"

    def model_to_device(self) -> None:
        super().model_to_device()
        for net in (m for m in self.model.modules() if isinstance(m, TwoDeviceAlexNet)):
            net.place()

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        for optimizer in self.optimizers:
            keep_state_with_parameters(optimizer)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        super().load_optimizer_state_dict(checkpoint)
        for optimizer in self.optimizers:
            keep_state_with_parameters(optimizer)


# --- The switch ---------------------------------------------------------------------------------------------


@dataclass
class Placement:
    """What the ``devices`` group means for one job: the Trainer's arguments, the devices of the two columns
    when the network is split (``None`` otherwise), and the memory layout."""

    trainer_args: dict[str, Any]
    columns: tuple[torch.device, torch.device] | None = None
    channels_last: bool = False

    def network(self, net: nn.Module) -> nn.Module:
        """``net`` in the form and layout that run here."""
        if self.columns is not None:
            assert isinstance(net, AlexNet)  # check_config allows model_parallel only for two-column AlexNet
            net = TwoDeviceAlexNet(net, self.columns)
        # Convolution weights in channels_last make every conv (and so every map after it) channels_last.
        return net.to(memory_format=torch.channels_last) if self.channels_last else net


def check_machine(devices: DevicesConfig, accelerator: str) -> None:
    """The accelerator and the number of devices a job asks for, against what this machine has (Lightning's
    accelerator registry): a ``ConfigError`` before any run opens, not Lightning's traceback after."""
    from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator

    names = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    require(accelerator in names, "trainer.accelerator", accelerator, f"use one of {', '.join(names)}")
    name = accelerator
    if accelerator in ("auto", "gpu"):  # Lightning's choice: a CUDA GPU, else Apple's, else (auto) the CPU
        gpus = [n for n, cls in (("cuda", CUDAAccelerator), ("mps", MPSAccelerator)) if cls.is_available()]
        name = (gpus or ["cpu" if accelerator == "auto" else "gpu"])[0]
    available = name in AcceleratorRegistry and AcceleratorRegistry[name]["accelerator"].is_available()
    what = {"gpu": "GPU (CUDA or Apple's MPS)", "cuda": "CUDA GPU"}.get(name, f"{name} device")
    require(
        available,
        "trainer.accelerator",
        accelerator,
        f"this machine has no {what} that torch can use; use trainer.accelerator=cpu, or auto (a GPU where "
        "there is one)",
    )
    require(
        devices.mode is not DeviceMode.model_parallel or name in ("cpu", "cuda"),
        "trainer.accelerator",
        accelerator,
        f"devices=model_parallel puts its columns on CUDA GPUs or the CPU, not on {name}; use "
        "trainer.accelerator=cpu",
    )
    if name == "cpu":  # CPU processes (ddp) and model parallel's two columns both fit on any CPU
        return
    have = AcceleratorRegistry[name]["accelerator"].auto_device_count()
    require(
        devices.processes <= have,
        "devices.count",
        devices.count,
        f"devices=ddp starts one process per {name} device and this machine has {have}; lower devices.count, "
        "or trainer.accelerator=cpu",
    )


def placement(devices: DevicesConfig, accelerator: str) -> Placement:
    layout = devices.channels_last
    if devices.mode is DeviceMode.model_parallel:
        columns = column_devices(accelerator)
        return Placement(
            {"devices": 1, "strategy": ColumnParallelStrategy(device=columns[0])}, columns, layout
        )
    if devices.mode is DeviceMode.ddp:
        # Lightning picks the process group's backend from the accelerator: gloo on CPUs, nccl on GPUs.
        return Placement({"devices": devices.count, "strategy": "ddp"}, channels_last=layout)
    return Placement({"devices": 1, "strategy": "auto"}, channels_last=layout)
