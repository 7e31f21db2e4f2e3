"""Data sets and splits, on the real CIFAR-10 beside the project and on generated files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import cifar

from alexnet.config import DataConfig, Dataset
from alexnet.data import CIFAR10_CLASSES, AlexNetDataModule, DataNotFoundError
from alexnet.images import decode_files, read_rgb
from alexnet.presets import PixelStats


def cifar_module(root: Path, **overrides) -> AlexNetDataModule:
    values = {
        "root": str(root),
        "train_size": 300,
        "val_size": 100,
        "test_size": 200,
        "batch_size": 50,
    } | overrides
    dm = AlexNetDataModule(DataConfig(dataset=Dataset.cifar10, **values))
    dm.setup("fit")
    return dm


def test_cifar10_image_folder_splits(cifar10_root: Path):
    dm = cifar_module(cifar10_root)
    assert dm.classes == CIFAR10_CLASSES
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (300, 100, 200)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() < 10
    # The validation images are training images the model never trains on, and never test images.
    train = {bytes(x.numpy()) for x in dm.train_set.images}
    val = {bytes(x.numpy()) for x in dm.val_set.images}
    assert not train & val
    # Same seed, same split; another seed, another split.
    again = cifar_module(cifar10_root)
    assert torch.equal(again.val_set.images, dm.val_set.images)
    other = cifar_module(cifar10_root, split_seed=1)
    assert not torch.equal(other.val_set.images, dm.val_set.images)


def test_decoded_pixels_equal_pil(cifar10_root: Path):
    files = sorted((cifar10_root / "test" / "cat").iterdir())[:5]
    ours = decode_files(files)
    for img, f in zip(ours, files, strict=False):
        pil = torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1)
        assert (img.int() - pil.int()).abs().max() <= 2  # libjpeg builds may round IDCT differently


def test_normalisation_uses_training_statistics(cifar10_root: Path):
    dm = cifar_module(cifar10_root, train_size=1000)
    x = dm.augment(dm.train_set.images, "eval")
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)


def test_torchvision_format(cifar10_root: Path, tmp_path: Path, monkeypatch):
    """torchvision's cifar-10-batches-py/ (pickled arrays), here built from real images."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def batch(split: str, per_class: int) -> dict:
        files, labels = [], []
        for label, name in enumerate(CIFAR10_CLASSES):
            found = sorted((cifar10_root / split / name).iterdir())[:per_class]
            files += found
            labels += [label] * len(found)
        data = decode_files(files).numpy().reshape(len(files), -1)
        return {"data": data, "labels": labels}

    train = batch("train", 30)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(
            pickle.dumps(train if i == 1 else {"data": train["data"][:0], "labels": []})
        )
    (folder / "test_batch").write_bytes(pickle.dumps(batch("test", 5)))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))
    # The files are ours, not the official archive, so their checksums differ by construction.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    dm = cifar_module(tmp_path, train_size=None, val_size=50, test_size=None)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (250, 50, 50)
    assert dm.classes == CIFAR10_CLASSES
    assert dm.train_set.images.shape[1:] == (3, 32, 32)


def test_missing_data_says_where_and_how(tmp_path: Path):
    with pytest.raises(DataNotFoundError) as err:
        cifar_module(tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere") in message and "data.download=true" in message


def test_empty_split_is_an_error(tmp_path: Path):
    for name in CIFAR10_CLASSES:
        (tmp_path / "train" / name).mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="holds no images"):
        cifar_module(tmp_path)


def test_imagenet_style_folder_with_workers(tmp_path: Path):
    """Large JPEGs decoded in two worker processes to 256x256 canvases; crops of 227 per batch."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(260, 400, size=2)
                mode = "L" if i == 0 else "RGB"  # a grayscale file is converted to RGB
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(
                    tmp_path / split / cls / f"{i}.JPEG"
                )
    cfg = DataConfig(
        dataset=Dataset.imagefolder,
        root=str(tmp_path),
        image_size=227,
        resize_size=256,
        num_classes=2,
        test_split="val",
        val_size=4,
        batch_size=4,
        num_workers=2,
    )
    dm = AlexNetDataModule(cfg)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 4, 8)
    expected = {"train": (4, 3, 227, 227), "eval": (4, 3, 227, 227), "test": (4, 10, 3, 227, 227)}
    loaders = {"train": dm.train_dataloader(), "eval": dm.val_dataloader(), "test": dm.test_dataloader()}
    for stage, loader in loaders.items():
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 256, 256) and images.dtype == torch.uint8
        assert set(labels.tolist()) <= {0, 1}
        x = dm.augment(images, stage)
        assert x.shape == expected[stage] and x.dtype == torch.float32
    assert dm.stats.eigvals.shape == (3,) and dm.stats.pixels == 20 * 256 * 256


def test_synthetic_is_deterministic():
    cfg = DataConfig(dataset=Dataset.synthetic, val_size=16, synthetic_size=64, test_size=16)
    a, b = AlexNetDataModule(cfg), AlexNetDataModule(cfg)
    a.setup(), b.setup()
    assert torch.equal(a.train_set.images, b.train_set.images)
    assert len(a.train_set) == 64 and len(a.val_set) == 16 and len(a.test_set) == 16


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_formats_torchvision_cannot_decode_are_read_by_pil(tmp_path: Path, fmt: str):
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    path = tmp_path / f"image.{fmt.lower()}"
    Image.fromarray(pixels).save(path, fmt)
    assert torch.equal(read_rgb(path), torch.from_numpy(pixels).permute(2, 0, 1))


def test_a_checkpoint_keeps_the_pixel_statistics_and_testing_needs_nothing_else():
    """state_dict() carries the training images' statistics; a module given them reads the test split only
    and normalises it exactly as the module that trained."""
    cfg = DataConfig(dataset=Dataset.synthetic, val_size=16, synthetic_size=64, test_size=16)
    trained = AlexNetDataModule(cfg)
    trained.setup("fit")
    state = trained.state_dict()
    tester = AlexNetDataModule(cfg, stats=PixelStats.from_json(state["pixel_stats"]))
    tester.setup("test")
    assert tester.train_set is None and tester.val_set is None
    assert torch.equal(
        tester.augment(tester.test_set.images, "test"), trained.augment(trained.test_set.images, "test")
    )
    assert state["classes"] == list(trained.classes)
