"""Data sets, splits and the transforms between them and the network.

Three sources, one ``AlexNetDataModule``:

- ``cifar10``: read from a local folder in either torchvision's format (``cifar-10-batches-py/``) or the
  ImageFolder layout (``train/<class>/*``, ``test/<class>/*``); downloaded by torchvision only when
  ``data.download=true``. The whole split is decoded once into one uint8 tensor (150 MB for the 50,000
  training images), so an epoch never touches a JPEG decoder.
- ``imagefolder``: an ImageNet-style tree (``train/<class>/*``, ``val/<class>/*``) of large images, decoded
  in worker processes to the paper's 256x256 canvas (short side resized to 256, centre square; section 2).
- ``synthetic``: class-dependent patterns plus noise, generated from a seed, for smoke tests.

The validation split that drives the learning-rate schedule is held out from the training images (seeded by
``data.split_seed``); the test split is reported but never used to make a training decision.

Section 4.1's augmentation runs on whole uint8 batches on the training device (``augment``, called from
``on_after_batch_transfer``), not per image in the loader: random crops, mirrors and PCA colour noise in
training; the centre crop for validation; ten views (centre, four corners, and their mirrors) for testing.
Inputs are then normalised with the training split's per-channel mean and standard deviation (cached on disk
with the RGB covariance that the PCA noise needs, keyed by the images themselves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # The DataLoader asks for a whole batch at once: one gather instead of 128 lookups and a stack
        # (about 10x the images/s; see benchmarks/loader_speed.py).
        index = torch.as_tensor(indices)
        return self.images[index], self.labels[index]


def _already_batched(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return batch


def list_image_folder(split_dir: Path, dataset: DatasetName) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of ``split_dir/<class>/*``, classes in sorted order (torchvision's convention)."""
    if not split_dir.is_dir():
        raise DataNotFoundError(f"No folder {split_dir}. {_how_to_get(dataset)}")
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            # An empty class would still take a label and an output unit, silently: refuse it.
            raise DataNotFoundError(
                f"Class folder {split_dir / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                f"add its images or remove the folder."
            )
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
    for f, img in zip(files, decoded, strict=True):
        if img.shape != decoded[0].shape:
            raise ValueError(
                f"Image {f} is {tuple(img.shape)[1:]} but {files[0]} is {tuple(decoded[0].shape)[1:]}: "
                f"an in-memory data set needs images of one size."
            )
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


def read_rgb(path: str) -> torch.Tensor:
    """Image file to a uint8 RGB tensor; grayscale and RGBA files are converted to RGB."""
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        raise RuntimeError(f"Cannot decode image {path}: {err}") from None


def canvas_transform(resize_size: int) -> v2.Compose:
    # Section 2: "rescaled the image such that the shorter side was of length 256, and then cropped out the
    # central 256x256 patch". Crops of that canvas are taken per batch by ``augment``.
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(resize_size)])


# --- Section 4.1 on batches: uint8 (B, 3, H, W) in, uint8 or float out --------------------------------------


def random_crops(images: torch.Tensor, size: int, padding: int = 0) -> torch.Tensor:
    """An independent random ``size`` x ``size`` window of each image (zero-padded by ``padding`` first)."""
    if padding:
        images = torch.nn.functional.pad(images, [padding] * 4)
    b, _, h, w = images.shape
    top = torch.randint(0, h - size + 1, (b, 1, 1), device=images.device)
    left = torch.randint(0, w - size + 1, (b, 1, 1), device=images.device)
    offsets = torch.arange(size, device=images.device)
    rows, cols = top + offsets.view(1, size, 1), left + offsets.view(1, 1, size)
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def random_flips(images: torch.Tensor) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    mirror = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)


def ten_views(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 10, 3, size, size): the centre crop first, then the four corners, then the mirrors of all five."""
    tl, tr, bl, br, centre, *mirrors = TF.ten_crop(images, [size, size])
    mirrors = [mirrors[4], *mirrors[:4]]  # torchvision puts the mirrored centre fifth; keep centre first
    return torch.stack([centre, tl, tr, bl, br, *mirrors], dim=1)


@dataclass
class PixelStats:
    """Per-channel mean and std, and the eigen-decomposition of the 3x3 RGB covariance, on the [0, 1] scale.

    ``eigvecs[:, i]`` is the unit eigenvector of ``eigvals[i]``; eigenvalues in descending order.
    """

    mean: torch.Tensor
    std: torch.Tensor
    eigvals: torch.Tensor
    eigvecs: torch.Tensor
    pixels: int

    @classmethod
    def of(cls, images: torch.Tensor) -> PixelStats:
        """From uint8 images (N, 3, H, W), accumulated in float64 chunks (50,000 CIFAR images: about 1 s)."""
        total = torch.zeros(3, dtype=torch.float64)
        outer = torch.zeros(3, 3, dtype=torch.float64)
        for chunk in images.split(2048):
            x = chunk.to(torch.float64).div_(255.0).permute(1, 0, 2, 3).reshape(3, -1)
            total += x.sum(dim=1)
            outer += x @ x.T
        n = images.shape[0] * images.shape[2] * images.shape[3]
        mean = total / n
        covariance = outer / n - torch.outer(mean, mean)
        eigvals, eigvecs = torch.linalg.eigh(covariance)  # ascending; symmetric matrix, real results
        order = eigvals.argsort(descending=True)
        return cls(
            mean=mean.float(),
            std=covariance.diagonal().clamp_min(1e-12).sqrt().float(),
            eigvals=eigvals[order].clamp_min(0).float(),
            eigvecs=eigvecs[:, order].float(),
            pixels=n,
        )

    def to_json(self) -> str:
        return json.dumps({k: v.tolist() if torch.is_tensor(v) else v for k, v in self.__dict__.items()})

    @classmethod
    def from_json(cls, text: str) -> PixelStats:
        values = json.loads(text)
        return cls(**{k: torch.tensor(v) if isinstance(v, list) else v for k, v in values.items()})


def pca_color_offsets(stats: PixelStats, sigma: float, batch: int, device: torch.device) -> torch.Tensor:
    """Section 4.1: per image, the RGB offset [p1 p2 p3][a1*l1, a2*l2, a3*l3]^T with a_i ~ N(0, sigma).

    Returns (batch, 3), one draw per image per use, on the [0, 1] pixel scale the statistics were taken on.
    """
    alphas = torch.randn(batch, 3, device=device) * sigma
    return (alphas * stats.eigvals.to(device)) @ stats.eigvecs.to(device).T


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
    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.classes: tuple[str, ...] = ()
        self.stats: PixelStats | None = None

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
        if len(self.classes) != cfg.num_classes:
            raise ValueError(
                f"data.num_classes={cfg.num_classes} but {cfg.root} has {len(self.classes)} classes: "
                f"set data.num_classes={len(self.classes)}."
            )
        log.info(
            "data: %s, %d train / %d val / %d test images, %d classes; pixel mean %s std %s",
            cfg.dataset.value,
            len(self.train_set),
            len(self.val_set),
            len(self.test_set),
            len(self.classes),
            [round(v, 4) for v in self.stats.mean.tolist()],
            [round(v, 4) for v in self.stats.std.tolist()],
        )

    def _setup_cifar10(self) -> None:
        cfg = self.cfg
        files, labels, classes, arrays = load_cifar10_split(cfg, train=True)
        val_idx, train_idx = _split_indices(len(labels), cfg.val_size, cfg.train_size, cfg.split_seed)
        keep = torch.cat([val_idx, train_idx])
        images = arrays[keep] if files is None else decode_files([files[i] for i in keep.tolist()])
        full = InMemoryImages(images, labels[keep], classes)
        n_val = len(val_idx)
        files, labels, classes, arrays = load_cifar10_split(cfg, train=False)
        idx = _subset(len(labels), cfg.test_size, cfg.split_seed)
        images = arrays[idx] if files is None else decode_files([files[i] for i in idx.tolist()])
        test = InMemoryImages(images, labels[idx], classes)
        if test.classes != full.classes:
            raise ValueError(
                f"Train and test classes differ under {cfg.root}: {full.classes} vs {test.classes}"
            )
        self._in_memory(full, torch.arange(n_val), torch.arange(n_val, len(keep)), test)

    def _in_memory(
        self, full: InMemoryImages, val_idx: torch.Tensor, train_idx: torch.Tensor, test: InMemoryImages
    ) -> None:
        self.classes = full.classes
        self.train_set = InMemoryImages(full.images[train_idx], full.labels[train_idx], full.classes)
        self.val_set = InMemoryImages(full.images[val_idx], full.labels[val_idx], full.classes)
        self.test_set = test
        images = self.train_set.images
        if self.cfg.stats_images is not None:
            images = images[_subset(len(images), self.cfg.stats_images, self.cfg.split_seed)]
        self.stats = cached_stats(tensor_key(images), self.cfg.cache_dir, lambda: PixelStats.of(images))

    def _setup_imagefolder(self) -> None:
        cfg = self.cfg
        root = Path(cfg.root).expanduser()
        list_image_folder(root / "train", cfg.dataset)  # a clear error before torchvision's
        list_image_folder(root / cfg.test_split, cfg.dataset)
        canvas = canvas_transform(cfg.resize_size)
        train = datasets.ImageFolder(str(root / "train"), canvas, loader=read_rgb)
        test = datasets.ImageFolder(str(root / cfg.test_split), canvas, loader=read_rgb)
        val_idx, train_idx = _split_indices(len(train), cfg.val_size, cfg.train_size, cfg.split_seed)
        self.classes = tuple(train.classes)
        if tuple(test.classes) != self.classes:
            raise ValueError(
                f"The class folders of {root / 'train'} and {root / cfg.test_split} differ "
                f"({sorted(set(self.classes) ^ set(test.classes))}): labels would not match. Make them equal."
            )
        self.train_set = Subset(train, train_idx.tolist())
        self.val_set = Subset(train, val_idx.tolist())
        self.test_set = Subset(test, _subset(len(test), cfg.test_size, cfg.split_seed).tolist())
        picked = _subset(len(self.train_set), cfg.stats_images, cfg.split_seed).tolist()
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

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # In-memory tensors are indexed faster than worker processes could ship them; files need workers.
        workers = self.cfg.num_workers if self.cfg.dataset is DatasetName.imagefolder else 0
        # Data parallel (devices=ddp): data.batch_size is the batch of one step (section 5: 128), so each of
        # the processes takes its share; Lightning gives each process its own images of the training split.
        trainer = self.trainer
        processes = trainer.world_size if trainer is not None else 1
        sampler = None
        if processes > 1 and not shuffle:
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
            shuffle=shuffle,
            sampler=sampler,
            collate_fn=_already_batched if isinstance(dataset, InMemoryImages) else None,
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
        trainer = self.trainer
        stage = "train" if trainer.training else "test" if trainer.testing else "eval"
        return self.augment(images, stage), labels

    def augment(self, images: torch.Tensor, stage: str) -> torch.Tensor:
        """uint8 canvases -> normalised float inputs. ``stage``: ``train``, ``eval`` (centre crop) or ``test``
        (with ``data.ten_crop``: (B, 10, 3, s, s) views, the centre first; otherwise the centre crop)."""
        cfg, size = self.cfg, self.cfg.image_size
        if stage == "train":
            x = random_crops(images, size, cfg.crop_padding) if cfg.crops else centre_crop(images, size)
            if cfg.flips:
                x = random_flips(x)
            x = x.float().div_(255.0)
            if cfg.pca_color and cfg.pca_sigma > 0:
                x += pca_color_offsets(self.stats, cfg.pca_sigma, len(x), x.device).view(-1, 3, 1, 1)
        elif stage == "test" and cfg.ten_crop:
            padded = torch.nn.functional.pad(images, [cfg.crop_padding] * 4) if cfg.crop_padding else images
            x = ten_views(padded, size).float().div_(255.0)
        else:
            x = centre_crop(images, size).float().div_(255.0)
        mean = self.stats.mean.to(x.device).view(3, 1, 1)
        std = self.stats.std.to(x.device).view(3, 1, 1)
        return (x - mean) / std
