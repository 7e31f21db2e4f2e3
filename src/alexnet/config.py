"""Typed schemas for the config groups, and the check that runs before any data is read or model built.

The YAML files under ``conf/`` stay plain; ``check_config`` merges each section into its dataclass, so a wrong
type, an unknown key or a value outside its enum fails with the section's full key, and each dataclass's
``__post_init__`` adds the range and combination checks that types alone cannot express.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


class ConfigError(ValueError):
    """A config value that cannot work. The message names the key, the value and what is allowed."""


class Arch(str, Enum):
    alexnet = "alexnet"
    figure1_cnn = "figure1_cnn"


class Activation(str, Enum):
    relu = "relu"
    tanh = "tanh"
    sigmoid = "sigmoid"


class Pool(str, Enum):
    overlapping = "overlapping"
    non_overlapping = "non_overlapping"


class PoolType(str, Enum):
    max = "max"
    avg = "avg"


class Init(str, Enum):
    paper = "paper"
    kaiming = "kaiming"


class Dataset(str, Enum):
    cifar10 = "cifar10"
    imagefolder = "imagefolder"
    synthetic = "synthetic"


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}.")


@dataclass
class ModelConfig:
    arch: Arch = Arch.alexnet
    num_classes: int = 1000
    input_size: int = 227
    activation: Activation = Activation.relu
    pool: Pool = Pool.overlapping
    pool_type: PoolType = PoolType.max
    lrn: bool = True
    dropout: float = 0.5
    columns: int = 2
    init: Init = Init.kaiming
    width: float = 1.0

    def __post_init__(self) -> None:
        _require(self.num_classes >= 2, "model.num_classes", self.num_classes, "need at least 2 classes")
        _require(self.input_size in (32, 227), "model.input_size", self.input_size, "use 227 or 32")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "a probability in [0, 1)")
        _require(
            self.columns in (1, 2), "model.columns", self.columns, "1 (one-GPU net) or 2 (two-column net)"
        )
        _require(0.0 < self.width <= 4.0, "model.width", self.width, "a multiplier in (0, 4]")
        if self.arch is Arch.figure1_cnn:
            why = "Figure 1's four-layer net (model.arch=figure1_cnn) is one-column, 32x32, no dropout"
            _require(self.input_size == 32, "model.input_size", self.input_size, why)
            _require(self.columns == 1, "model.columns", self.columns, why)
            _require(self.dropout == 0.0, "model.dropout", self.dropout, why)


@dataclass
class DataConfig:
    dataset: Dataset = Dataset.cifar10
    root: str | None = None
    download: bool = False
    image_size: int = 32
    resize_size: int = 32
    num_classes: int = 10
    test_split: str = "test"
    val_size: int = 5000
    train_size: int | None = None
    test_size: int | None = None
    synthetic_size: int = 512
    split_seed: int = 0
    batch_size: int = 128
    num_workers: int = 2
    # Section 4.1's augmentation, each piece a switch.
    crops: bool = True
    flips: bool = True
    crop_padding: int = 0
    pca_color: bool = True
    pca_sigma: float = 0.1
    ten_crop: bool = True
    # Training images the pixel statistics (mean, std, RGB covariance) are computed from; null = all.
    stats_images: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _require(self.image_size in (32, 227), "data.image_size", self.image_size, "use 227 or 32")
        _require(
            self.dataset is not Dataset.cifar10 or self.image_size == 32,
            "data.image_size",
            self.image_size,
            "CIFAR-10 images are 32x32; use data=cifar10 with the 32 network or data=imagefolder for 227",
        )
        _require(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, "0 or more pixels")
        _require(
            self.resize_size + 2 * self.crop_padding >= self.image_size,
            "data.resize_size",
            self.resize_size,
            f"the crop size data.image_size={self.image_size} is larger than the resized image "
            f"(plus 2 x data.crop_padding={self.crop_padding}); raise data.resize_size",
        )
        _require(self.pca_sigma >= 0, "data.pca_sigma", self.pca_sigma, "a standard deviation >= 0")
        _require(
            self.stats_images is None or self.stats_images >= 1,
            "data.stats_images",
            self.stats_images,
            "null (all training images) or a positive count",
        )
        _require(self.batch_size >= 1, "data.batch_size", self.batch_size, "a positive integer")
        _require(self.num_workers >= 0, "data.num_workers", self.num_workers, "0 or more")
        _require(
            self.val_size >= 1, "data.val_size", self.val_size, "the LR schedule needs a validation split"
        )
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            _require(value is None or value >= 1, f"data.{key}", value, "null (all) or a positive count")
        _require(self.synthetic_size >= 1, "data.synthetic_size", self.synthetic_size, "a positive count")
        _require(
            self.dataset is Dataset.synthetic or bool(self.root),
            "data.root",
            self.root,
            "set the data set's folder (or the ALEXNET_DATA_DIR environment variable)",
        )


@dataclass
class OptimizerConfig:
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optimizer.lr", self.lr, "a positive learning rate")
        _require(0.0 <= self.momentum < 1.0, "optimizer.momentum", self.momentum, "a value in [0, 1)")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "0 or more")
        _require(
            0.0 < self.plateau_factor < 1.0, "optimizer.plateau_factor", self.plateau_factor, "in (0, 1)"
        )
        _require(self.plateau_patience >= 0, "optimizer.plateau_patience", self.plateau_patience, "0 or more")
        _require(0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, "in [0, optimizer.lr]")


class DeviceMode(str, Enum):
    one = "one"
    model_parallel = "model_parallel"
    ddp = "ddp"


@dataclass
class DevicesConfig:
    """Where the network runs (config group ``conf/devices/``); never what it computes.

    ``one``: one device. ``model_parallel``: section 3.2's two GPUs, column A on the first device and column
    B on the second (``count`` is 2). ``ddp``: data parallel, ``count`` processes with one device and the
    whole network each; ``data.batch_size`` stays the batch of one step (section 5: 128), split over them.
    """

    mode: DeviceMode = DeviceMode.one
    count: int = 1

    def __post_init__(self) -> None:
        if self.mode is DeviceMode.one:
            _require(
                self.count == 1, "devices.count", self.count,
                "devices=one trains on 1 device; for more use devices=ddp devices.count=N, or "
                "devices=model_parallel",
            )  # fmt: skip
        elif self.mode is DeviceMode.model_parallel:
            _require(
                self.count == 2, "devices.count", self.count,
                "devices=model_parallel puts one column on each of 2 devices (section 3.2)",
            )  # fmt: skip
        else:
            _require(self.count >= 1, "devices.count", self.count, "1 or more processes, one device each")

    @property
    def processes(self) -> int:
        """Training processes: ``count`` for ddp, else 1 (model parallel is one process driving 2 devices)."""
        return self.count if self.mode is DeviceMode.ddp else 1


@dataclass
class CheckedConfig:
    """The typed sections of a composed config, after ``check_config``."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    devices: DevicesConfig


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "devices": DevicesConfig,
}


def _typed(section: str, schema: type, values: Any) -> Any:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        return OmegaConf.to_object(merged)  # runs __post_init__
    except OmegaConfBaseException as err:
        key = f"{section}.{err.key}" if getattr(err, "key", None) else section
        reason = str(err).split("\n")[0]
        if isinstance(err, ConfigKeyError):  # most likely a typo: list what exists
            reason += f". The keys of '{section}' are: {', '.join(f.name for f in fields(schema))}"
        raise ConfigError(f"{key}: {reason}.") from None


def check_config(cfg: DictConfig) -> CheckedConfig:
    """Validate every switch of a composed config; raise ``ConfigError`` naming the first bad key."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{err.full_key or 'config'}: {str(err).splitlines()[0]}") from None
    for section in SECTIONS:
        if section not in resolved:
            raise ConfigError(f"'{section}' is missing from the config; pick one with {section}=<name>.")
    checked = CheckedConfig(
        **{name: _typed(name, schema, resolved[name]) for name, schema in SECTIONS.items()}
    )
    _require(
        checked.model.input_size == checked.data.image_size,
        "model.input_size",
        checked.model.input_size,
        f"the data set gives {checked.data.image_size}x{checked.data.image_size} images (data.image_size)",
    )
    _require(
        checked.model.num_classes == checked.data.num_classes,
        "model.num_classes",
        checked.model.num_classes,
        f"the data set has {checked.data.num_classes} classes (data.num_classes)",
    )
    target = cfg.get("target_train_error")
    _require(
        isinstance(target, float) and 0.0 < target < 1.0,
        "target_train_error",
        target,
        "a training top-1 error in (0, 1), e.g. 0.25 (Figure 1)",
    )
    _require(isinstance(cfg.get("seed"), int), "seed", cfg.get("seed"), "an integer")
    trainer_args = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    for key in resolved.get("trainer", {}):
        _require(
            key == "_target_" or key in trainer_args,
            f"trainer.{key}",
            resolved["trainer"][key],
            "not an argument of lightning.pytorch.Trainer; see its documentation for the names",
        )
    _require(cfg.get("resume") in ("auto", "never"), "resume", cfg.get("resume"), "auto or never")
    _require(
        isinstance(cfg.get("stop_at_target"), bool),
        "stop_at_target",
        cfg.get("stop_at_target"),
        "true or false",
    )
    _check_devices(checked, resolved.get("trainer", {}), optuna=bool(cfg.get("optuna")))
    return checked


def _check_devices(checked: CheckedConfig, trainer: dict[str, Any], optuna: bool) -> None:
    """The combinations of ``devices`` with the rest that cannot work."""
    devices, choice = checked.devices, f"devices={checked.devices.mode.value}"
    if devices.mode is DeviceMode.model_parallel:
        _require(
            checked.model.arch is Arch.alexnet and checked.model.columns == 2,
            "model.columns" if checked.model.arch is Arch.alexnet else "model.arch",
            checked.model.columns if checked.model.arch is Arch.alexnet else checked.model.arch.value,
            f"{choice} splits the two columns of the paper's net over two devices (section 3.2); use "
            "model.arch=alexnet model.columns=2, or devices=one",
        )
    processes = devices.processes
    if processes > 1:
        _require(
            checked.data.batch_size % processes == 0,
            "data.batch_size",
            checked.data.batch_size,
            f"the batch of one step is split over devices.count={processes} processes; use a multiple of "
            f"{processes}",
        )
        _require(
            checked.data.val_size >= processes,
            "data.val_size",
            checked.data.val_size,
            f"each of the devices.count={processes} processes validates a share of the images; use at least "
            f"{processes}",
        )
        _require(
            not optuna,
            "devices.count",
            processes,
            "an Optuna trial trains in one process (its pruner decides after each epoch); use devices=one",
        )
    # The devices group decides both; a Trainer value that says otherwise would be silently overruled.
    wanted = {"devices": processes, "strategy": "ddp" if devices.mode is DeviceMode.ddp else "auto"}
    for key, value in wanted.items():
        given = trainer.get(key)
        _require(
            given is None or given == value,
            f"trainer.{key}",
            given,
            f"{choice} devices.count={devices.count} sets it to {value!r}; choose where the network runs "
            "with devices=one, devices=model_parallel or devices=ddp devices.count=N, not trainer.devices or "
            "trainer.strategy",
        )


def plain(section: Any) -> dict[str, Any]:
    """A checked dataclass as keyword arguments, enums as their string values."""
    return OmegaConf.to_container(OmegaConf.structured(section), enum_to_str=True)
