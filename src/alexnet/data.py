"""Data sets, splits and the transforms between them and the network.

Three sources, one ``AlexNetDataModule``:

- ``cifar10``: read from a local folder in either torchvision's format (``cifar-10-batches-py/``) or the
  ImageFolder layout (``train/<class>/*``, ``test/<class>/*``); downloaded by torchvision only when
  ``data.download=true``. The whole split is decoded once into one uint8 tensor (150 MB for the 50,000
  training images), so an epoch never touches a JPEG decoder.
- ``imagefolder``: an ImageNet-style tree (``train/<class>/*``, ``val/<class>/*``) of large images, decoded
  per sample in worker processes: resize the short side to 256, crop 227 (random in training, centre in
  evaluation), random horizontal flips in training.
- ``synthetic``: class-dependent patterns plus noise, generated from a seed, for smoke tests.

The validation split that drives the learning-rate schedule is held out from the training images (seeded by
``data.split_seed``); the test split is reported but never used to make a training decision.

Batches leave the loaders as uint8 and are normalised by ``on_after_batch_transfer``, on the training device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

from alexnet.config import DataConfig
from alexnet.config import Dataset as DatasetName

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataNotFoundError(FileNotFoundError):
    """The data set is not where the config says. The message names the path and how to get the data."""


def _how_to_get(dataset: DatasetName) -> str:
    if dataset is DatasetName.cifar10:
        return (
            "Point data.root (or the ALEXNET_DATA_DIR environment variable, which holds cifar10/) "
            "at a folder with either train/<class>/*.jpg and test/<class>/*.jpg or torchvision's "
            "cifar-10-batches-py/, "
            "or add data.download=true to let torchvision download it (needs internet)."
        )
    return (
        "Point data.root at a folder with train/<class>/* and val/<class>/* image files "
        "(the ImageNet layout after the usual validation-set preparation)."
    )


class InMemoryImages(Dataset):
    """Decoded uint8 images (N, 3, H, W) and their labels, served without copying."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


def list_image_folder(split_dir: Path, dataset: DatasetName) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of ``split_dir/<class>/*``, classes in sorted order (torchvision's convention)."""
    if not split_dir.is_dir():
        raise DataNotFoundError(f"No folder {split_dir}. {_how_to_get(dataset)}")
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataNotFoundError(
            f"No images in {split_dir} (expected {split_dir}/<class>/*.jpg). {_how_to_get(dataset)}"
        )
    return files, labels, classes


def decode_files(files: list[Path]) -> torch.Tensor:
    """Decode equally sized image files into one uint8 tensor (N, 3, H, W).

    JPEGs go through torchvision's batched decoder (about 10x faster than one PIL call per file); anything
    it cannot take is decoded one by one, so an unreadable file is reported by name.
    """
    raw = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    try:
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB)
    except RuntimeError:
        decoded = []
        for f, data in zip(files, raw, strict=False):
            try:
                decoded.append(decode_image(data, mode=ImageReadMode.RGB))
            except RuntimeError as err:
                raise RuntimeError(f"Cannot decode image {f}: {err}") from None
    shapes = {tuple(img.shape) for img in decoded}
    if len(shapes) > 1:
        raise ValueError(f"Images under {files[0].parent.parent} differ in size ({sorted(shapes)[:3]}...).")
    return torch.stack(decoded)


def _split_indices(n: int, first: int, second: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into [first] and [the next `second`, or all the rest]."""
    if first >= n:
        raise ValueError(f"data.val_size={first} leaves no training images out of {n}; lower it.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:first], order[first : None if second is None else first + second]


def _subset(n: int, size: int | None, seed: int) -> torch.Tensor:
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def load_cifar10_split(
    cfg: DataConfig, train: bool
) -> tuple[list[Path] | None, torch.Tensor, tuple[str, ...], object]:
    """Find CIFAR-10 under ``cfg.root``: ImageFolder files, or torchvision's arrays. Returns
    (files or None, labels, classes, arrays or None)."""
    root = Path(cfg.root).expanduser()
    split_dir = root / ("train" if train else cfg.test_split)
    if split_dir.is_dir():
        files, labels, classes = list_image_folder(split_dir, cfg.dataset)
        return files, torch.tensor(labels), classes, None
    if (root / "cifar-10-batches-py").is_dir() or cfg.download:
        ds = datasets.CIFAR10(str(root), train=train, download=cfg.download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return None, torch.tensor(ds.targets), tuple(ds.classes), images
    raise DataNotFoundError(f"CIFAR-10 not found under {root}. {_how_to_get(cfg.dataset)}")


def synthetic_images(n: int, cfg: DataConfig, seed: int) -> InMemoryImages:
    """A fixed coarse colour pattern per class (4x4 blocks) under pixel noise: learnable in a few epochs."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    size = cfg.image_size
    coarse = torch.rand(cfg.num_classes, 3, 4, 4, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    gen.manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes, (n,), generator=gen)
    noise = torch.rand(n, 3, size, size, generator=gen)
    images = ((0.6 * patterns[labels] + 0.4 * noise) * 255).round().to(torch.uint8)
    return InMemoryImages(images, labels, tuple(f"class_{i}" for i in range(cfg.num_classes)))


def imagefolder_transforms(cfg: DataConfig, train: bool) -> v2.Compose:
    # Section 4.1: images rescaled so the short side is 256, then 224 (here 227) patches; random patches
    # and their mirrors for training, the centre patch for evaluation.
    steps: list[v2.Transform] = [v2.Resize(cfg.resize_size, antialias=True)]
    steps += (
        [v2.RandomCrop(cfg.image_size), v2.RandomHorizontalFlip()]
        if train
        else [v2.CenterCrop(cfg.image_size)]
    )
    return v2.Compose(steps)


def read_rgb(path: str) -> torch.Tensor:
    """Image file to a uint8 RGB tensor; grayscale and RGBA files are converted to RGB."""
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise RuntimeError(f"Cannot decode image {path}: {err}") from None


class AlexNetDataModule(L.LightningDataModule):
    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.classes: tuple[str, ...] = ()
        self.mean = torch.zeros(3)
        self.std = torch.ones(3)

    def prepare_data(self) -> None:
        if self.cfg.dataset is DatasetName.cifar10 and self.cfg.download:
            for train in (True, False):
                datasets.CIFAR10(str(Path(self.cfg.root).expanduser()), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        cfg = self.cfg
        if cfg.dataset is DatasetName.synthetic:
            full = synthetic_images(cfg.synthetic_size + cfg.val_size, cfg, seed=1)
            test = synthetic_images(cfg.test_size or cfg.val_size, cfg, seed=2)
            val_idx, train_idx = _split_indices(len(full), cfg.val_size, cfg.train_size, cfg.split_seed)
            self._in_memory(full, val_idx, train_idx, test)
        elif cfg.dataset is DatasetName.cifar10:
            self._setup_cifar10()
        else:
            self._setup_imagefolder()
        log.info(
            "data: %s, %d train / %d val / %d test images, %d classes",
            cfg.dataset.value,
            len(self.train_set),
            len(self.val_set),
            len(self.test_set),
            len(self.classes),
        )

    def _setup_cifar10(self) -> None:
        cfg = self.cfg
        files, labels, classes, arrays = load_cifar10_split(cfg, train=True)
        val_idx, train_idx = _split_indices(len(labels), cfg.val_size, cfg.train_size, cfg.split_seed)
        keep = torch.cat([val_idx, train_idx])
        images = arrays[keep] if files is None else decode_files([files[i] for i in keep.tolist()])
        full = InMemoryImages(images, labels[keep], classes)
        n_val = len(val_idx)
        self._in_memory(full, torch.arange(n_val), torch.arange(n_val, len(keep)), None)
        files, labels, classes, arrays = load_cifar10_split(cfg, train=False)
        idx = _subset(len(labels), cfg.test_size, cfg.split_seed)
        images = arrays[idx] if files is None else decode_files([files[i] for i in idx.tolist()])
        self.test_set = InMemoryImages(images, labels[idx], classes)
        if self.test_set.classes != self.classes:
            raise ValueError(
                f"Train and test classes differ under {cfg.root}: {self.classes} vs {self.test_set.classes}"
            )

    def _in_memory(
        self,
        full: InMemoryImages,
        val_idx: torch.Tensor,
        train_idx: torch.Tensor,
        test: InMemoryImages | None,
    ) -> None:
        self.classes = full.classes
        self.train_set = InMemoryImages(full.images[train_idx], full.labels[train_idx], full.classes)
        self.val_set = InMemoryImages(full.images[val_idx], full.labels[val_idx], full.classes)
        self.test_set = test
        self.mean, self.std = channel_stats(self.train_set.images)

    def _setup_imagefolder(self) -> None:
        cfg = self.cfg
        root = Path(cfg.root).expanduser()
        list_image_folder(root / "train", cfg.dataset)  # a clear error before torchvision's
        list_image_folder(root / cfg.test_split, cfg.dataset)
        train_aug = datasets.ImageFolder(
            str(root / "train"), imagefolder_transforms(cfg, True), loader=read_rgb
        )
        train_eval = datasets.ImageFolder(
            str(root / "train"), imagefolder_transforms(cfg, False), loader=read_rgb
        )
        test = datasets.ImageFolder(
            str(root / cfg.test_split), imagefolder_transforms(cfg, False), loader=read_rgb
        )
        val_idx, train_idx = _split_indices(len(train_aug), cfg.val_size, cfg.train_size, cfg.split_seed)
        self.classes = tuple(train_aug.classes)
        self.train_set = Subset(train_aug, train_idx.tolist())
        self.val_set = Subset(train_eval, val_idx.tolist())
        self.test_set = Subset(test, _subset(len(test), cfg.test_size, cfg.split_seed).tolist())
        # Statistics from a fixed sample of centre crops: a full pass over ImageNet would take hours.
        sample = Subset(train_eval, train_idx[:256].tolist())
        images = next(iter(DataLoader(sample, batch_size=len(sample), num_workers=cfg.num_workers)))[0]
        self.mean, self.std = channel_stats(images)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # In-memory tensors are indexed faster than worker processes could ship them.
        workers = self.cfg.num_workers if self.cfg.dataset is DatasetName.imagefolder else 0
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        mean = self.mean.to(images.device).view(1, 3, 1, 1)
        std = self.std.to(images.device).view(1, 3, 1, 1)
        return (images.float().div_(255.0) - mean) / std, labels


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of uint8 images (N, 3, H, W), on the [0, 1] scale."""
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float(), std.float()
