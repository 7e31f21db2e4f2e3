"""Typed schemas of the config groups, and the check that runs before any data is read or model built.

Each schema below (and ``ModelConfig`` in model.py) is the one place where a group's keys, their types,
allowed values and defaults are written. ``register_schemas`` puts them in Hydra's ConfigStore as
``<group>/schema``; every YAML file of the group starts from it (``defaults: [schema, _self_]``) and writes
only what differs. So a wrong type or an unknown value fails at composition, naming the key, and
``check_config`` adds the range and combination checks (each dataclass's ``__post_init__``, then the checks
across groups) before anything runs.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.errors import PydanticSchemaGenerationError

from alexnet.errors import ConfigError, require
from alexnet.model import Arch, Choice, ModelConfig


class Dataset(Choice):
    cifar10 = "cifar10"  # torchvision's cifar-10-batches-py/ or an ImageFolder of its 32x32 images
    folder = "folder"  # any ImageFolder of small images, resized to data.image_size and kept in memory
    imagefolder = "imagefolder"  # an ImageNet-style tree of large images, decoded batch by batch
    synthetic = "synthetic"  # class patterns plus noise, for smoke tests


# The data sets decoded once into one uint8 tensor in memory (an epoch never touches a decoder).
IN_MEMORY = (Dataset.cifar10, Dataset.folder, Dataset.synthetic)


@dataclass
class DataConfig:
    """The data and section 4.1's augmentation (config group ``conf/data/``); defaults: CIFAR-10's."""

    dataset: Dataset = Dataset.cifar10
    root: str | None = None
    download: bool = False
    image_size: int = 32  # the network's input side: model.input_size follows it
    resize_size: int = 32  # images are resized to this canvas; crops of image_size are taken from it
    num_classes: int | None = 10  # null: as many as the class folders of data=folder
    test_split: str | None = "test"  # null (data=folder): test/ if the root has one, else val/
    # Held out of the training images to drive the learning-rate schedule; the test split never does.
    # null: a tenth of each class (at least one image), for any size of data set (data=folder's default).
    val_size: int | None = 5000
    train_size: int | None = None  # null = all remaining training images; a number = a seeded subset
    test_size: int | None = None
    synthetic_size: int = 512
    split_seed: int = 0
    batch_size: int = 128  # section 5
    num_workers: int = 2
    # Section 4.1, each piece a switch. At 32x32 the crops are 32x32 windows of the image zero-padded by
    # crop_padding (docs/switches.md says why not 28x28 windows); at 227, windows of the 256 canvas.
    crops: bool = True
    flips: bool = True
    crop_padding: int = 4
    pca_color: bool = True
    pca_sigma: float = 0.1
    ten_crop: bool = True
    # Training images the pixel statistics (mean, std, RGB covariance) are computed from; null = all.
    stats_images: int | None = None
    cache_dir: str | None = None
    # Keep the decoded images on the training device (a GPU): batches are gathered there, no copies per
    # step. For in-memory data sets; a no-op on the CPU.
    on_device: bool = False

    def __post_init__(self) -> None:
        require(self.image_size in (32, 227), "data.image_size", self.image_size, "use 227 or 32")
        require(
            self.dataset is not Dataset.cifar10 or self.image_size == 32,
            "data.image_size",
            self.image_size,
            "CIFAR-10 images are 32x32; use data=cifar10 with the 32 network, or data=folder / "
            "data=imagenet for other images",
        )
        require(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, "0 or more pixels")
        require(
            self.resize_size + 2 * self.crop_padding >= self.image_size,
            "data.resize_size",
            self.resize_size,
            f"the crop size data.image_size={self.image_size} is larger than the resized image "
            f"(plus 2 x data.crop_padding={self.crop_padding}); raise data.resize_size",
        )
        require(self.pca_sigma >= 0, "data.pca_sigma", self.pca_sigma, "a standard deviation >= 0")
        require(
            self.stats_images is None or self.stats_images >= 1,
            "data.stats_images",
            self.stats_images,
            "null (all training images) or a positive count",
        )
        require(self.batch_size >= 1, "data.batch_size", self.batch_size, "a positive integer")
        require(self.num_workers >= 0, "data.num_workers", self.num_workers, "0 or more")
        require(
            self.val_size is None or self.val_size >= 1,
            "data.val_size",
            self.val_size,
            "the LR schedule needs a validation split (null: a tenth of each class)",
        )
        for key in ("train_size", "test_size"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"data.{key}", value, "null (all) or a positive count")
        require(self.synthetic_size >= 1, "data.synthetic_size", self.synthetic_size, "a positive count")
        require(
            self.num_classes is None or self.num_classes >= 2,
            "data.num_classes",
            self.num_classes,
            "at least 2 (or null: counted from the class folders of data=folder)",
        )
        require(
            self.dataset is Dataset.synthetic or bool(self.root),
            "data.root",
            self.root,
            "set the data set's folder, e.g. data=folder data.root=DIR (or the ALEXNET_DATA_DIR environment "
            "variable, the folder that holds cifar10/)",
        )


class Schedule(Choice):
    plateau = "plateau"  # section 5: divide when the validation error stops improving
    milestones = "milestones"  # divide at fixed epochs: the same drops, planned for a fixed budget
    # Not the paper's: a linear warm-up over warmup_epochs, then a linear decay to 0 at the last step, batch
    # by batch. Annealing to ~0 by the end of a fixed budget is what the low-noise CIFAR-10 recipes do.
    linear = "linear"


@dataclass
class OptimizerConfig:
    """Section 5's recipe (config group ``conf/optimizer/``): SGD, momentum 0.9, weight decay 5e-4, lr 0.01
    divided by 10 "when the validation error rate stopped improving", three times (so min_lr = lr / 1000)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Schedule = Schedule.plateau
    drop_factor: float = 0.1
    plateau_patience: int = 2  # epochs without a new best val/top1_err before dividing
    milestones: list[int] = field(default_factory=list)  # epochs after which to divide (schedule=milestones)
    min_lr: float = 1e-5
    warmup_epochs: float = 0.0  # schedule=linear: epochs over which the rate rises from ~0 to lr

    def __post_init__(self) -> None:
        require(self.lr > 0, "optimizer.lr", self.lr, "a positive learning rate")
        require(0.0 <= self.momentum < 1.0, "optimizer.momentum", self.momentum, "a value in [0, 1)")
        require(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "0 or more")
        require(0.0 < self.drop_factor < 1.0, "optimizer.drop_factor", self.drop_factor, "in (0, 1)")
        require(self.plateau_patience >= 0, "optimizer.plateau_patience", self.plateau_patience, "0 or more")
        require(0 <= self.min_lr <= self.lr, "optimizer.min_lr", self.min_lr, "in [0, optimizer.lr]")
        require(self.warmup_epochs >= 0, "optimizer.warmup_epochs", self.warmup_epochs, "0 or more epochs")
        require(
            list(self.milestones) == sorted(set(self.milestones)) and all(m >= 1 for m in self.milestones),
            "optimizer.milestones",
            list(self.milestones),
            "increasing epochs, e.g. [7, 9]",
        )
        require(
            self.schedule is not Schedule.milestones or bool(self.milestones),
            "optimizer.milestones",
            list(self.milestones),
            "optimizer.schedule=milestones needs the epochs to divide at, e.g. optimizer.milestones=[7,9]",
        )


class DeviceMode(Choice):
    one = "one"
    model_parallel = "model_parallel"
    ddp = "ddp"


@dataclass
class DevicesConfig:
    """Where the network runs (config group ``conf/devices/``); never what it computes.

    ``one``: one device. ``model_parallel``: section 3.2's two GPUs, column A on the first device and column
    B on the second (``count`` is 2). ``ddp``: data parallel, ``count`` processes with one device and the
    whole network each; ``data.batch_size`` stays the batch of one step (section 5: 128), split over them.
    ``channels_last``: the memory layout of activations (N, H, W, C), the fastest for oneDNN and cuDNN.
    """

    mode: DeviceMode = DeviceMode.one
    count: int = 1
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.mode is DeviceMode.one:
            require(
                self.count == 1, "devices.count", self.count,
                "devices=one trains on 1 device; for more use devices=ddp devices.count=N, or "
                "devices=model_parallel",
            )  # fmt: skip
        elif self.mode is DeviceMode.model_parallel:
            require(
                self.count == 2, "devices.count", self.count,
                "devices=model_parallel puts one column on each of 2 devices (section 3.2)",
            )  # fmt: skip
        else:
            require(self.count >= 1, "devices.count", self.count, "1 or more processes, one device each")

    @property
    def processes(self) -> int:
        """Training processes: ``count`` for ddp, else 1 (model parallel is one process driving 2 devices)."""
        return self.count if self.mode is DeviceMode.ddp else 1


@dataclass
class DesignConfig:
    """A two-level fractional factorial design over arms (``+ablation=factorial``, alexnet.design): each of
    ``factors`` (an arm of conf/arm/) is on or off in run ``run`` of the design that ``generators`` define."""

    factors: list[str] = field(default_factory=list)
    generators: str = ""
    run: int | None = None


@dataclass
class CheckedConfig:
    """The typed sections of a composed config, after ``check_config``."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    devices: DevicesConfig


SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "devices": DevicesConfig,
}


def register_schemas() -> None:
    """``<group>/schema`` in Hydra's ConfigStore for each schema: the base of every YAML file of the group.
    Called when src/train.py, src/eval.py or a test imports this module's users, before Hydra composes."""
    store = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        store.store(group=group, name="schema", node=schema, provider="alexnet")


register_schemas()


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
    for section in SCHEMAS:
        if section not in resolved:
            raise ConfigError(f"'{section}' is missing from the config; pick one with {section}=<name>.")
    checked = CheckedConfig(
        **{name: _typed(name, schema, resolved[name]) for name, schema in SCHEMAS.items()}
    )
    require(
        checked.model.input_size == checked.data.image_size,
        "model.input_size",
        checked.model.input_size,
        f"the data set gives {checked.data.image_size}x{checked.data.image_size} images (data.image_size)",
    )
    require(
        checked.model.num_classes == checked.data.num_classes,
        "model.num_classes",
        checked.model.num_classes,
        f"the data set has {checked.data.num_classes} classes (data.num_classes)",
    )
    target = cfg.get("target_train_error")
    require(
        isinstance(target, float) and 0.0 < target < 1.0,
        "target_train_error",
        target,
        "a training top-1 error in (0, 1), e.g. 0.25 (Figure 1)",
    )
    require(isinstance(cfg.get("seed"), int), "seed", cfg.get("seed"), "an integer")
    require(cfg.get("resume") in ("auto", "never"), "resume", cfg.get("resume"), "auto or never")
    for key in ("stop_at_target", "test_after_fit"):
        require(isinstance(cfg.get(key), bool), key, cfg.get(key), "true or false")
    check_trainer(resolved.get("trainer", {}))
    _check_devices(checked, resolved.get("trainer", {}), optuna=bool(cfg.get("optuna")))
    return checked


def check_trainer(trainer: dict[str, Any]) -> None:
    """Every ``trainer.*`` key is an argument of Lightning's Trainer, with a value of the type it takes, so
    that ``trainer.max_epochs=abc`` stops here and not inside Lightning after a run was opened."""
    from lightning.pytorch import Trainer

    hints = typing.get_type_hints(Trainer.__init__)
    for key, value in trainer.items():
        if key == "_target_":
            continue
        require(
            key in hints,
            f"trainer.{key}",
            value,
            "not an argument of lightning.pytorch.Trainer; see its documentation for the names",
        )
        if key not in ("devices", "strategy"):  # null here: the devices group sets them (_check_devices)
            require(
                _matches(value, hints[key]),
                f"trainer.{key}",
                value,
                f"Lightning's Trainer takes {_name(hints[key])}",
            )


def _matches(value: Any, hint: Any) -> bool:
    """Whether a plain config value fits a type hint, by pydantic's strict validation (a class such as
    Accelerator or timedelta: a config value cannot be one, so it is left to Lightning)."""
    try:
        TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True)).validate_python(value, strict=True)
    except ValidationError:
        return False
    except PydanticSchemaGenerationError:
        return True
    return True


def _name(hint: Any) -> str:
    """A type hint as a person reads it: ``int or null``, ``one of 'a', 'b'``."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_name(arm) for arm in get_args(hint))
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def _check_devices(checked: CheckedConfig, trainer: dict[str, Any], optuna: bool) -> None:
    """The combinations of ``devices`` with the rest that cannot work."""
    devices, choice = checked.devices, f"devices={checked.devices.mode.value}"
    if devices.mode is DeviceMode.model_parallel:
        alexnet = checked.model.arch is Arch.alexnet
        require(
            alexnet and checked.model.columns == 2,
            "model.columns" if alexnet else "model.arch",
            checked.model.columns if alexnet else checked.model.arch.value,
            f"{choice} splits the two columns of the paper's net over two devices (section 3.2); use "
            "model.arch=alexnet model.columns=2, or devices=one",
        )
    processes = devices.processes
    if processes > 1:
        require(
            checked.data.batch_size % processes == 0,
            "data.batch_size",
            checked.data.batch_size,
            f"the batch of one step is split over devices.count={processes} processes; use a multiple of "
            f"{processes}",
        )
        require(
            checked.data.val_size is None or checked.data.val_size >= processes,
            "data.val_size",
            checked.data.val_size,
            f"each of the devices.count={processes} processes validates a share of the images; use at least "
            f"{processes}",
        )
        require(
            not optuna,
            "devices.count",
            processes,
            "an Optuna trial trains in one process (its pruner decides after each epoch); use devices=one",
        )
    # The devices group decides both; a Trainer value that says otherwise would be silently overruled.
    wanted = {"devices": processes, "strategy": "ddp" if devices.mode is DeviceMode.ddp else "auto"}
    for key, value in wanted.items():
        given = trainer.get(key)
        require(
            given is None or given == value,
            f"trainer.{key}",
            given,
            f"{choice} devices.count={devices.count} sets it to {value!r}; choose where the network runs "
            "with devices=one, devices=model_parallel or devices=ddp devices.count=N, not trainer.devices or "
            "trainer.strategy",
        )
