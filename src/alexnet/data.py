"""Data sets, splits and loaders: from files on disk to uint8 batches on the training device.

- ``cifar10``: torchvision's ``cifar-10-batches-py/`` or the ImageFolder layout (``train/<class>/*``,
  ``test/<class>/*``) of its 32x32 images; downloaded by torchvision only when ``data.download=true``.
- ``folder``: any ImageFolder tree of small images (``train/<class>/*``, and ``test/<class>/*`` or
  ``val/<class>/*``), any size, grayscale or RGB, each resized to the ``data.resize_size`` canvas.
- ``imagefolder``: an ImageNet-style tree of large images, decoded in worker processes to the paper's
  256x256 canvas (short side resized to 256, centre square; section 2).
- ``synthetic``: class-dependent patterns plus noise, generated from a seed, for smoke tests.

The first three keep the whole split decoded in one uint8 tensor in memory (150 MB for CIFAR-10's
training images), so an epoch never touches a decoder. The validation split that drives the learning-rate
schedule is held out of the training images (seeded by ``data.split_seed``): ``data.val_size`` of them, or
with null a tenth of each class (``holdout``); the test split is reported but never used to make a training
decision. Evaluating a checkpoint needs the test split only: it is normalised with the training images'
statistics, which every checkpoint carries (``state_dict``). Section 4.1's augmentation is in
``alexnet.presets``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import datasets

from alexnet.config import IN_MEMORY, DataConfig
from alexnet.config import Dataset as Kind
from alexnet.errors import DataError
from alexnet.images import (
    canvas_transform,
    decode_files,
    how_to_get,
    list_image_folder,
    read_rgb,
    test_split_of,
)
from alexnet.presets import Draws, PixelStats, Preset
from alexnet.seeding import generator
from alexnet.splits import VAL_FRACTION, holdout, split_indices, subset

log = logging.getLogger(__name__)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DataNotFoundError = DataError  # the name earlier versions raised


class InMemoryImages(Dataset):
    """Decoded uint8 images (N, 3, H, W) and their labels, served without copying."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: tuple[str, ...]):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The DataLoader asks for a whole batch at once: one gather instead of 128 lookups and a stack
        # (about 10x the images/s; see benchmarks/loader_speed.py).
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def _already_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


class EpochShuffle(Sampler[int]):
    """A new order of the training images each epoch, drawn from the run seed's ``order/<epoch>`` stream:
    every arm of a seed sees the same order, and a resumed run the order of an uninterrupted one."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before every epoch
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.size, generator=generator(self.seed, "order", self.epoch)).tolist())

    def __len__(self) -> int:
        return self.size


def synthetic_images(n: int, cfg: DataConfig, seed: int) -> InMemoryImages:
    """A fixed coarse colour pattern per class (4x4 blocks) under pixel noise: learnable in a few epochs."""
    gen = torch.Generator().manual_seed(cfg.split_seed)
    size, classes = cfg.image_size, cfg.num_classes or 10
    coarse = torch.rand(classes, 3, 4, 4, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    gen.manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=gen)
    noise = torch.rand(n, 3, size, size, generator=gen)
    images = ((0.6 * patterns[labels] + 0.4 * noise) * 255).round().to(torch.uint8)
    return InMemoryImages(images, labels, tuple(f"class_{i}" for i in range(classes)))


def cached_stats(key: str, cache_dir: str | None, compute) -> PixelStats:
    """``compute()`` once per key; the file name holds the key, so other images can never reuse it."""
    if not cache_dir:
        return compute()
    path = Path(cache_dir).expanduser() / f"pixel-stats-{key[:32]}.json"
    if path.is_file():
        return PixelStats.from_json(path.read_text())
    stats = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent jobs: whole files only
    tmp.write_text(stats.to_json())
    tmp.replace(path)
    return stats


def tensor_key(images: torch.Tensor) -> str:
    """A digest of the pixels themselves: a different data set, split or subset gives a different key."""
    digest = hashlib.sha256(str(tuple(images.shape)).encode())
    digest.update(memoryview(images.contiguous().numpy()).cast("B"))
    return digest.hexdigest()


class AlexNetDataModule(L.LightningDataModule):
    """``seed``: the run's seed, whose streams order the training images and draw their augmentation.
    ``stats``: the pixel statistics of the images a checkpoint was trained on; with them, ``setup("test")``
    reads the test split alone (evaluation)."""

    def __init__(self, cfg: DataConfig, seed: int = 0, stats: PixelStats | None = None):
        super().__init__()
        self.cfg, self.seed, self.given_stats = cfg, seed, stats
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.classes: tuple[str, ...] = ()
        self.stats: PixelStats | None = None
        self.preset: Preset | None = None
        self._draws: tuple[int, torch.Generator] | None = None  # (epoch, its augmentation stream)

    def prepare_data(self) -> None:
        if self.cfg.dataset is Kind.cifar10 and self.cfg.download:
            for train in (True, False):
                datasets.CIFAR10(str(Path(self.cfg.root).expanduser()), train=train, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None or (stage == "test" and self.test_set is not None):
            return
        cfg = self.cfg
        if stage == "test" and self.given_stats is not None:
            self._setup_test()
        elif cfg.dataset is Kind.synthetic:
            n_val = self._synthetic_val()
            full = synthetic_images(cfg.synthetic_size + n_val, cfg, seed=1)
            test = synthetic_images(cfg.test_size or n_val, cfg, seed=2)
            val_idx, train_idx = split_indices(len(full), n_val, cfg.train_size, cfg.split_seed)
            self._in_memory(full, val_idx, train_idx, test)
        elif cfg.dataset in IN_MEMORY:
            self._setup_in_memory()
        else:
            self._setup_imagefolder()
        if cfg.num_classes is not None and len(self.classes) != cfg.num_classes:
            raise DataError(
                f"data.num_classes={cfg.num_classes} but {cfg.root} has {len(self.classes)} classes: "
                f"set data.num_classes={len(self.classes)} (or null, to count the class folders)."
            )
        sizes = [len(split or ()) for split in (self.train_set, self.val_set, self.test_set)]
        log.info(
            "data: %s, %d train / %d val / %d test images, %d classes; pixel mean %s std %s",
            cfg.dataset.value, *sizes, len(self.classes),
            [round(v, 4) for v in self.stats.mean.tolist()], [round(v, 4) for v in self.stats.std.tolist()],
        )  # fmt: skip

    def _synthetic_val(self) -> int:
        cfg = self.cfg
        return cfg.val_size if cfg.val_size is not None else max(1, round(VAL_FRACTION * cfg.synthetic_size))

    def _setup_test(self) -> None:
        """The test split alone, normalised with the statistics it was given (a checkpoint's)."""
        cfg = self.cfg
        if cfg.dataset is Kind.synthetic:
            self.test_set = synthetic_images(cfg.test_size or self._synthetic_val(), cfg, seed=2)
        elif cfg.dataset in IN_MEMORY:
            source, labels, classes = self._split(train=False)
            keep = subset(len(labels), cfg.test_size, cfg.split_seed)
            self.test_set = InMemoryImages(self._decode(source, keep), labels[keep], classes)
        else:
            root = Path(cfg.root).expanduser() / test_split_of(cfg)
            list_image_folder(root, cfg.dataset)  # a clear error before torchvision's
            test = datasets.ImageFolder(str(root), canvas_transform(cfg.resize_size), loader=read_rgb)
            self.test_set = Subset(test, subset(len(test), cfg.test_size, cfg.split_seed).tolist())
        self.classes = tuple(getattr(self.test_set, "classes", None) or self.test_set.dataset.classes)
        if isinstance(self.test_set, InMemoryImages):
            self._on_device(self.test_set)
        self.stats = self.given_stats
        self.preset = Preset(cfg, self.stats)

    def _on_device(self, *splits: InMemoryImages) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        if self.cfg.on_device and device.type != "cpu":  # CIFAR-10: 180 MB of uint8 on the GPU
            for split in splits:
                split.images, split.labels = split.images.to(device), split.labels.to(device)

    def state_dict(self) -> dict[str, Any]:
        """What every checkpoint keeps of its data (Lightning saves it under the class's name): the training
        images' pixel statistics, which evaluation normalises with on any data, and the class names."""
        if self.stats is None:
            return {}
        return {"pixel_stats": self.stats.to_json(), "classes": list(self.classes)}

    def _split(self, train: bool) -> tuple[list[Path] | torch.Tensor, torch.Tensor, tuple[str, ...]]:
        """A split of cifar10 or folder data, not decoded yet: (its files, or torchvision's image array;
        its labels; its classes)."""
        cfg = self.cfg
        root = Path(cfg.root).expanduser()
        split = "train" if train else test_split_of(cfg)
        if cfg.dataset is Kind.cifar10 and not (root / "train").is_dir():  # torchvision's arrays
            if not ((root / "cifar-10-batches-py").is_dir() or cfg.download):
                raise DataError(f"CIFAR-10 not found under {root}. {how_to_get(cfg.dataset)}")
            ds = datasets.CIFAR10(str(root), train=train, download=cfg.download)
            images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
            return images, torch.tensor(ds.targets), tuple(ds.classes)
        files, labels, classes = list_image_folder(root / split, cfg.dataset)
        return files, torch.tensor(labels), classes

    def _decode(self, source: list[Path] | torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The images ``keep`` of a split, decoded (and for data=folder resized to the canvas)."""
        if torch.is_tensor(source):
            return source[keep]
        cfg = self.cfg
        resize = cfg.resize_size if cfg.dataset is Kind.folder else None
        images = decode_files([source[i] for i in keep.tolist()], resize)
        if images.shape[-1] != cfg.resize_size:
            raise DataError(
                f"{source[0].parent.parent} holds {images.shape[-2]}x{images.shape[-1]} images, but "
                f"data=cifar10 takes CIFAR-10's 32x32 images. Use data=folder data.root={cfg.root}: it "
                "resizes every image to data.image_size."
            )
        return images

    def _setup_in_memory(self) -> None:
        cfg = self.cfg
        source, labels, classes = self._split(train=True)
        val_idx, train_idx = holdout(labels, cfg.val_size, cfg.train_size, cfg.split_seed)
        keep = torch.cat([val_idx, train_idx])  # decode only the images a subset uses
        full = InMemoryImages(self._decode(source, keep), labels[keep], classes)
        source, labels, test_classes = self._split(train=False)
        if test_classes != classes:
            raise DataError(f"Train and test classes differ under {cfg.root}: {classes} vs {test_classes}")
        keep = subset(len(labels), cfg.test_size, cfg.split_seed)
        test = InMemoryImages(self._decode(source, keep), labels[keep], classes)
        n_val = len(val_idx)
        self._in_memory(full, torch.arange(n_val), torch.arange(n_val, len(full)), test)

    def _in_memory(
        self, full: InMemoryImages, val_idx: torch.Tensor, train_idx: torch.Tensor, test: InMemoryImages
    ) -> None:
        self.classes = full.classes
        self.train_set = InMemoryImages(full.images[train_idx], full.labels[train_idx], full.classes)
        self.val_set = InMemoryImages(full.images[val_idx], full.labels[val_idx], full.classes)
        self.test_set = test
        images = self.train_set.images
        self._on_device(self.train_set, self.val_set, self.test_set)
        if self.cfg.stats_images is not None:
            images = images[subset(len(images), self.cfg.stats_images, self.cfg.split_seed)]
        self.stats = cached_stats(tensor_key(images), self.cfg.cache_dir, lambda: PixelStats.of(images))
        self.preset = Preset(self.cfg, self.stats)

    def _setup_imagefolder(self) -> None:
        cfg = self.cfg
        root = Path(cfg.root).expanduser()
        split = test_split_of(cfg)
        for folder in ("train", split):  # a clear error before torchvision's
            list_image_folder(root / folder, cfg.dataset)
        canvas = canvas_transform(cfg.resize_size)
        train = datasets.ImageFolder(str(root / "train"), canvas, loader=read_rgb)
        test = datasets.ImageFolder(str(root / split), canvas, loader=read_rgb)
        targets = torch.tensor(train.targets)
        val_idx, train_idx = holdout(targets, cfg.val_size, cfg.train_size, cfg.split_seed)
        self.classes = tuple(train.classes)
        self.train_set = Subset(train, train_idx.tolist())
        self.val_set = Subset(train, val_idx.tolist())
        self.test_set = Subset(test, subset(len(test), cfg.test_size, cfg.split_seed).tolist())
        picked = subset(len(self.train_set), cfg.stats_images, cfg.split_seed).tolist()
        sample = Subset(self.train_set, picked)
        # The key names the files (with sizes and times) and the canvas: a changed file means new statistics.
        digest = hashlib.sha256(f"{cfg.resize_size}".encode())
        for i in picked:
            path = Path(train.samples[train_idx[i]][0])
            info = path.stat()
            digest.update(f"{path}:{info.st_size}:{info.st_mtime_ns}".encode())

        def compute() -> PixelStats:
            loader = DataLoader(sample, batch_size=64, num_workers=cfg.num_workers)
            return PixelStats.of(torch.cat([images for images, _ in loader]))

        self.stats = cached_stats(digest.hexdigest(), cfg.cache_dir, compute)
        self.preset = Preset(cfg, self.stats)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        # In-memory tensors are indexed faster than worker processes could ship them; files need workers.
        workers = self.cfg.num_workers if self.cfg.dataset is Kind.imagefolder else 0
        # Data parallel (devices=ddp): data.batch_size is the batch of one step (section 5: 128), so each of
        # the processes takes its share; Lightning gives each process its own images of the training split.
        trainer = self.trainer
        processes = trainer.world_size if trainer is not None else 1
        sampler = EpochShuffle(len(dataset), self.seed) if train else None
        if processes > 1 and not train:
            # Evaluation must count each image once. Lightning's DistributedSampler would repeat up to
            # processes - 1 images so that every process gets as many, and those would count twice in the
            # validation and test errors; its unrepeated sampler gives the processes shares that differ by
            # at most one image instead (evaluation has no step-by-step collective: unequal shares are safe).
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=processes, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=self.cfg.batch_size // processes,
            sampler=sampler,
            collate_fn=_already_batched if isinstance(dataset, InMemoryImages) else None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available() and not self.cfg.on_device,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def test_set_labels(self) -> np.ndarray:
        """The test images' labels, in the order the test loader serves them."""
        test = self.test_set
        if isinstance(test, InMemoryImages):
            return test.labels.cpu().numpy()
        return np.asarray([test.dataset.targets[i] for i in test.indices])

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        trainer = self.trainer
        if trainer.training:
            return self.preset.train(images, self._next_draws(len(images))), labels
        return (self.preset.test(images) if trainer.testing else self.preset.eval(images)), labels

    def _next_draws(self, batch: int) -> Draws:
        """The next batch's draws from the current epoch's ``augment`` stream (one per process under DDP)."""
        epoch = self.trainer.current_epoch
        if self._draws is None or self._draws[0] != epoch:
            self._draws = (epoch, generator(self.seed, "augment", epoch, self.trainer.global_rank))
        return Draws.new(batch, self.preset.offsets, self._draws[1])

    def augment(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        """``stage``: ``train`` (draws from the global RNG), ``eval`` or ``test``; see alexnet.presets."""
        return {"train": self.preset.train, "eval": self.preset.eval, "test": self.preset.test}[stage](images)
