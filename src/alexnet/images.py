"""Image files on disk: ImageFolder trees listed, decoded and resized, and probed before a run opens.

``probe`` lists a data set's files: it fails at once, naming the folder, when they are not there, counts the
classes of data=folder and the training images of each class, and digests the file names and sizes into the
data's fingerprint, so that a moved copy of the data is recognised as the same data and an edited one is not.
It also reads the files before any run opens (``check_files``): every file's header (its format and size:
about 60 us a file on a 2-core VM, 6 s for 100,000, once per data set) and a seeded sample decoded in full.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import v2

from alexnet.config import DataConfig
from alexnet.config import Dataset as Kind
from alexnet.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# The files each probe decodes in full: a seeded sample of SAMPLE_BYTES (decoding time follows the bytes:
# about 1 s; every file of a folder of small images up to about 10,000 of CIFAR-10's) and at least
# SAMPLE_FILES files (a few seconds of large photos). A file whose header reads but whose body is broken,
# outside the sample, is found when the images are decoded, after the run has opened.
SAMPLE_BYTES = 8 * 2**20
SAMPLE_FILES = 64


def how_to_get(kind: Kind) -> str:
    if kind is Kind.cifar10:
        return (
            "Point data.root (or the ALEXNET_DATA_DIR environment variable, which holds cifar10/) at a "
            "folder "
            "with train/<class>/*.jpg and test/<class>/*.jpg or torchvision's cifar-10-batches-py/, or add "
            "data.download=true to let torchvision download it (needs internet)."
        )
    return "Point data.root at a folder with train/<class>/* and test/<class>/* (or val/<class>/*) images."


@dataclass
class DataFacts:
    """What a data set is, read before any run opens: its classes, its test folder, and a fingerprint of its
    files (names within the root and sizes), so that a moved copy is the same data and an edited one not."""

    num_classes: int | None
    test_split: str
    fingerprint: str
    train_counts: tuple[int, ...] | None = None  # training images per class; None where not listed
    class_names: tuple[str, ...] | None = None  # the class folders; None where not listed


def probe(cfg: DataConfig, train: bool = True) -> DataFacts:
    """List the data set's files and read them (``check_files``): fail now, naming the folder or file, if they
    are not there or cannot be read. ``train=False`` (evaluation): the test split only."""
    if cfg.dataset is Kind.synthetic:
        return DataFacts(cfg.num_classes, cfg.test_split or "test", "synthetic")
    root = Path(cfg.root).expanduser()
    test_split = test_split_of(cfg)
    digest = hashlib.sha256()
    if cfg.dataset is Kind.cifar10 and not (root / "train").is_dir():
        arrays = root / "cifar-10-batches-py"
        if not arrays.is_dir() and not cfg.download:
            raise DataError(f"CIFAR-10 not found under {root}. {how_to_get(cfg.dataset)}")
        for f in sorted(arrays.glob("*")) if arrays.is_dir() else []:
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
        return DataFacts(
            cfg.num_classes, test_split, digest.hexdigest()[:16] if arrays.is_dir() else "download"
        )
    classes, counts, listed, sizes = None, None, [], []
    for split in ("train", test_split) if train else (test_split,):
        files, labels, found = list_image_folder(root / split, cfg.dataset)
        classes = classes or found
        if found != classes:
            raise DataError(
                f"The class folders of {root / 'train'} and {root / split} differ "
                f"({sorted(set(classes) ^ set(found))}): labels would not match. Make them equal."
            )
        if split == "train":
            per_class = Counter(labels)
            counts = tuple(per_class[label] for label in range(len(classes)))
        for f in files:
            sizes.append(f.stat().st_size)
            digest.update(f"{f.relative_to(root)}:{sizes[-1]}\n".encode())
        listed += files
    fingerprint = digest.hexdigest()[:16]
    check_files(listed, sizes, cfg, fingerprint)
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        fix = "use data=folder (it counts them)" if cfg.dataset is Kind.cifar10 else "data.num_classes=null"
        raise DataError(
            f"data.num_classes={cfg.num_classes} but {root / split} has {len(classes)} class folders: {fix}, "
            f"or data.num_classes={len(classes)}."
        )
    return DataFacts(len(classes), test_split, fingerprint, counts, classes)


def check_files(files: list[Path], sizes: list[int], cfg: DataConfig, fingerprint: str) -> None:
    """Read the files (``sizes``: their bytes) before any run opens: every file's header (for an in-memory
    data set, decoded whole at once; imagefolder's files are decoded batch by batch, so only the sample's),
    then the sample decoded in full. A data set that passed is remembered in data.cache_dir by its
    fingerprint."""
    done = None
    if cfg.cache_dir:
        name = f"images-ok-{fingerprint}-{cfg.dataset.value}-{cfg.resize_size}"
        done = Path(cfg.cache_dir).expanduser() / name
        if done.is_file():
            return
    side = cfg.resize_size if cfg.dataset is Kind.cifar10 else None  # data=cifar10 takes its 32x32 only
    order = np.random.default_rng(0).permutation(len(files))
    taken = np.cumsum(np.asarray(sizes)[order]) <= SAMPLE_BYTES
    sample = order[: max(SAMPLE_FILES, int(taken.sum()))]
    for f in files if cfg.dataset is not Kind.imagefolder else [files[i] for i in sample]:
        width, height = header_size(f)
        if side is not None and (width, height) != (side, side):
            raise DataError(
                f"Image {f} is {width}x{height}, but data=cifar10 takes CIFAR-10's {side}x{side} images. Use "
                f"data=folder data.root={cfg.root}: it resizes every image to data.image_size."
            )
    for i in sample:
        read_rgb(files[i])
    if done is not None:
        done.parent.mkdir(parents=True, exist_ok=True)
        done.touch()


def header_size(path: Path) -> tuple[int, int]:
    """An image's (width, height) from its header, read by PIL without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, SyntaxError, ValueError) as err:
        reason = "the file is empty" if path.stat().st_size == 0 else _pil_reason(err, path)
        raise DataError(f"Cannot decode image {path}: {reason}. Replace or delete the file.") from None


def _pil_reason(err: Exception, path: Path) -> str:
    # PIL's messages name the file, which the error already does.
    return str(err).replace(f" {str(path)!r}", "").replace(str(path), "").strip(" :.") or type(err).__name__


def test_split_of(cfg: DataConfig) -> str:
    """``data.test_split``; when null (data=folder), ``test`` if the root has that folder, else ``val``."""
    if cfg.test_split is not None:
        return cfg.test_split
    root = Path(cfg.root).expanduser()
    return "test" if (root / "test").is_dir() or not (root / "val").is_dir() else "val"


def list_image_folder(split_dir: Path, kind: Kind) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """Files and labels of ``split_dir/<class>/*``, classes in sorted order (torchvision's convention)."""
    if not split_dir.is_dir():
        raise DataError(f"No folder {split_dir} (the '{split_dir.name}' split). {how_to_get(kind)}")
    classes = tuple(sorted(p.name for p in split_dir.iterdir() if p.is_dir()))
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            # An empty class would still take a label and an output unit, silently: refuse it.
            raise DataError(
                f"Class folder {split_dir / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                f"add its images or remove the folder."
            )
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"No images in {split_dir} (expected {split_dir}/<class>/*.jpg). {how_to_get(kind)}")
    return files, labels, classes


def read_rgb(path: str | Path, data: torch.Tensor | None = None) -> torch.Tensor:
    """Image file to a uint8 RGB tensor; grayscale and RGBA files are converted to RGB. torchvision decodes
    JPEG, PNG, GIF and WebP; PIL the formats it does not (BMP, TIFF)."""
    if data is None:
        data = torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError as err:
        # torchvision's message starts with its C++ source location; the first sentence after it says why.
        reason = re.sub(r"^.*\.cpp:\d+, ", "", str(err)).split(". ")[0].rstrip(".")
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (OSError, SyntaxError, ValueError):
        raise DataError(f"Cannot decode image {path}: {reason}. Replace or delete the file.") from None


def canvas_transform(resize_size: int) -> v2.Compose:
    # Section 2: "rescaled the image such that the shorter side was of length 256, and then cropped out the
    # central 256x256 patch". Crops of that canvas are taken per batch by the preset.
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(resize_size)])


def decode_files(files: list[Path], resize_size: int | None = None) -> torch.Tensor:
    """Decode image files into one uint8 tensor (N, 3, H, W).

    Without ``resize_size`` every image must have the size of the first (CIFAR-10): JPEGs then go through
    torchvision's batched decoder, about 10x faster than one call per file. With it, each image is decoded
    on its own and resized to a ``resize_size`` square canvas, whatever its size (data=folder).
    """
    raw = [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]
    if resize_size is not None:
        canvas = canvas_transform(resize_size)
        return torch.stack([canvas(read_rgb(f, data)) for f, data in zip(files, raw, strict=True)])
    try:
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB)
    except RuntimeError:
        decoded = [read_rgb(f, data) for f, data in zip(files, raw, strict=True)]
    for f, img in zip(files, decoded, strict=True):
        if img.shape != decoded[0].shape:
            raise DataError(
                f"Image {f} is {tuple(img.shape)[1:]} but {files[0]} is {tuple(decoded[0].shape)[1:]}: "
                "data=cifar10 takes CIFAR-10's 32x32 images. For images of other or mixed sizes use "
                "data=folder, which resizes each to data.image_size."
            )
    return torch.stack(decoded)
