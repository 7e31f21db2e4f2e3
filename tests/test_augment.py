"""Section 4.1's augmentation: each switch changes what the model sees, and only in the intended way."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alexnet.config import DataConfig, Dataset
from alexnet.data import AlexNetDataModule, EpochShuffle, cached_stats, tensor_key
from alexnet.images import decode_files
from alexnet.model import AlexNet
from alexnet.module import AlexNetModule
from alexnet.presets import Draws, PixelStats, pca_color_offsets, ten_views
from alexnet.seeding import generator


def random_images(n: int, size: int = 32) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )


def module_for(**switches) -> AlexNetDataModule:
    cfg = DataConfig(
        dataset=Dataset.synthetic, val_size=16, synthetic_size=64, test_size=16, crop_padding=4, **switches
    )
    dm = AlexNetDataModule(cfg)
    dm.setup()
    return dm


def training_draws(dm: AlexNetDataModule, epoch: int = 0):
    """The draws training uses, as ``on_after_batch_transfer`` takes them: from ``_next_draws``."""
    dm.trainer = SimpleNamespace(current_epoch=epoch, global_rank=0, training=True, testing=False)
    return dm._next_draws


def test_training_crops_are_windows_of_the_padded_image():
    """Every training input is one window of the zero-padded canvas, and every offset in bounds is used."""
    dm = module_for(flips=False, pca_color=False)
    dm.preset.stats = PixelStats(torch.zeros(3), torch.ones(3), torch.ones(3), torch.eye(3), 1)
    images = random_images(200)
    crops = dm.preset.train(images, training_draws(dm)(len(images))) * 255
    padded = torch.nn.functional.pad(images, [4] * 4).float()
    offsets = []
    for crop, canvas in zip(crops, padded, strict=True):
        found = [(top, left) for top in range(9) for left in range(9)
                 if torch.allclose(canvas[:, top : top + 32, left : left + 32], crop, atol=1e-3)]  # fmt: skip
        assert len(found) == 1
        offsets.append(found[0])
    tops, lefts = zip(*offsets, strict=True)
    assert set(tops) == set(range(9)) and set(lefts) == set(range(9))


def test_training_flips_are_mirrors_half_the_time():
    dm = module_for(crops=False, pca_color=False)
    draws = training_draws(dm)(1000)
    images = random_images(1000, size=32)
    flipped = dm.preset.train(images, draws)
    plain = dm.preset.eval(images)
    mirrored = [torch.equal(a.flip(-1), b) for a, b in zip(plain, flipped, strict=True)]
    assert mirrored == draws.mirror.tolist()
    assert 0.45 < sum(mirrored) / len(mirrored) < 0.55


def test_the_draws_of_training_are_common_random_numbers_of_the_seed_and_epoch():
    """Two runs of one seed (two arms) draw the same crops, mirrors and colour noise batch after batch; the
    next batch, the next epoch and another seed draw anew."""
    arm_a, arm_b = (training_draws(module_for()) for _ in range(2))
    first, again = arm_a(64), arm_b(64)
    assert all(torch.equal(getattr(first, k), getattr(again, k)) for k in ("top", "left", "mirror", "alphas"))
    second = arm_a(64)
    assert not torch.equal(first.alphas, second.alphas)
    next_epoch = training_draws(module_for(), epoch=1)(64)
    assert not torch.equal(first.alphas, next_epoch.alphas)
    other = AlexNetDataModule(module_for().cfg, seed=1)
    other.setup()
    assert not torch.equal(first.alphas, training_draws(other)(64).alphas)


def test_switches_off_training_sees_the_evaluation_image():
    dm = module_for(crops=False, flips=False, pca_color=False)
    images = dm.train_set.images[:8]
    assert torch.equal(dm.augment(images, "train"), dm.augment(images, "eval"))
    on = module_for()
    torch.manual_seed(0)
    assert not torch.equal(on.augment(images, "train"), on.augment(images, "eval"))


def test_each_switch_alone_changes_the_input():
    images = module_for().train_set.images[:16]
    base = module_for(crops=False, flips=False, pca_color=False).augment(images, "eval")
    for switch in ("crops", "flips", "pca_color"):
        only = {"crops": False, "flips": False, "pca_color": False, switch: True}
        torch.manual_seed(1)
        x = module_for(**only).augment(images, "train")
        changed = (x != base).flatten(1).any(dim=1)
        assert changed.any(), switch
        if switch == "pca_color":  # a colour offset per image: the same shift at every pixel of a channel
            delta = x - base
            assert torch.allclose(delta, delta[:, :, :1, :1].expand_as(delta), atol=1e-5)


def test_augmentation_is_deterministic_under_a_seed():
    dm = module_for()
    images = dm.train_set.images[:16]
    torch.manual_seed(7)
    a = dm.augment(images, "train")
    torch.manual_seed(7)
    b = dm.augment(images, "train")
    torch.manual_seed(8)
    c = dm.augment(images, "train")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_two_arms_of_one_seed_see_the_same_images_in_the_same_order_with_the_same_draws():
    """Common random numbers: the data order and the crop, mirror and colour draws of an epoch come from the
    run seed's own streams, so an arm without PCA noise still gets the paper arm's crops and mirrors, and
    every arm the same order; the next epoch and another seed differ."""
    order = EpochShuffle(500, seed=3)
    order.set_epoch(2)
    again = EpochShuffle(500, seed=3)
    again.set_epoch(2)
    assert list(order) == list(again)
    again.set_epoch(3)
    assert list(order) != list(again)
    assert list(order) != list(EpochShuffle(500, seed=4))
    paper, no_pca = module_for(), module_for(pca_color=False)
    images = paper.train_set.images[:16]
    draws = Draws.new(16, paper.preset.offsets, generator(3, "augment", 0, 0))
    same = Draws.new(16, paper.preset.offsets, generator(3, "augment", 0, 0))
    assert all(torch.equal(a, b) for a, b in zip(vars(draws).values(), vars(same).values(), strict=True))
    with_noise, without = paper.preset.train(images, draws), no_pca.preset.train(images, same)
    offset = with_noise - without  # only the colour offset differs: the same crop and mirror underneath
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset), atol=1e-5)
    assert offset.abs().max() > 0


def test_pca_statistics_match_numpy_on_real_cifar10(cifar10_root: Path):
    files = (
        sorted((cifar10_root / "train" / "ship").iterdir())[:200]
        + sorted((cifar10_root / "train" / "frog").iterdir())[:200]
    )
    images = decode_files(files)
    stats = PixelStats.of(images)
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3).numpy().astype(np.float64) / 255.0
    covariance = np.cov(pixels, rowvar=False, bias=True)
    eigvals, eigvecs = np.linalg.eigh(covariance)
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    np.testing.assert_allclose(stats.eigvals.numpy(), eigvals, rtol=1e-4)
    for i in range(3):  # eigenvectors are defined up to sign
        assert abs(float(np.dot(stats.eigvecs[:, i].numpy(), eigvecs[:, i]))) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(stats.mean.numpy(), pixels.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(stats.std.numpy(), pixels.std(axis=0), rtol=1e-4)


def test_pca_offsets_have_the_intended_covariance(cifar10_root: Path):
    stats = PixelStats.of(decode_files(sorted((cifar10_root / "test" / "bird").iterdir())[:300]))
    torch.manual_seed(0)
    sigma = 0.1
    offsets = pca_color_offsets(stats, sigma, torch.randn(400_000, 3)).double()
    # offset = P (a * l) with a_i ~ N(0, sigma): covariance P diag((sigma * l)^2) P^T, mean 0.
    p, lam = stats.eigvecs.double(), stats.eigvals.double()
    expected = p @ torch.diag((sigma * lam) ** 2) @ p.T
    measured = torch.cov(offsets.T)
    assert torch.allclose(measured, expected, atol=0.02 * expected.abs().max().item())
    assert offsets.mean(dim=0).abs().max() < 0.01 * sigma * lam[0]


def test_statistics_cache_is_keyed_by_the_images(tmp_path: Path):
    images = random_images(64)
    first = cached_stats(tensor_key(images), str(tmp_path), lambda: PixelStats.of(images))

    def must_not_run() -> PixelStats:
        raise AssertionError("recomputed although cached")

    again = cached_stats(tensor_key(images), str(tmp_path), must_not_run)
    assert torch.equal(first.eigvecs, again.eigvecs) and first.pixels == again.pixels
    other = images.clone()
    other[0, 0, 0, 0] ^= 1  # one pixel differs: another key, fresh statistics
    assert tensor_key(other) != tensor_key(images)
    assert tensor_key(images[:32]) != tensor_key(images)  # a subset (another split) too
    assert len(list(tmp_path.iterdir())) == 1


def test_ten_views_are_centre_corners_and_their_mirrors():
    images = random_images(3, size=40)
    views = ten_views(images, 32)
    assert views.shape == (3, 10, 3, 32, 32)
    assert torch.equal(views[:, 0], images[..., 4:36, 4:36])  # the centre first
    corners = [images[..., :32, :32], images[..., :32, 8:], images[..., 8:, :32], images[..., 8:, 8:]]
    for i, corner in enumerate(corners, start=1):
        assert torch.equal(views[:, i], corner)
    originals = [views[:, i] for i in range(5)]
    for i in range(5, 10):  # each of the last five is the mirror of one of the first five
        assert sum(torch.equal(views[:, i].flip(-1), o) for o in originals) == 1
    assert torch.equal(views[:, 5].flip(-1), views[:, 0])


def test_test_step_averages_softmax_over_ten_views():
    torch.manual_seed(0)
    module = AlexNetModule(AlexNet(num_classes=10, input_size=32, width=0.125), num_classes=10).eval()
    module.log = lambda *args, **kwargs: None
    seen = {}
    module.test_metrics_10crop.update = lambda probs, labels: seen.setdefault("probs", probs)
    module.test_metrics.update = lambda logits, labels: seen.setdefault("centre", logits)
    views = torch.randn(4, 10, 3, 32, 32)
    with torch.no_grad():
        module.test_step((views, torch.arange(4)), 0)
        expected = torch.stack([module(views[:, v]).softmax(dim=1) for v in range(10)]).mean(dim=0)
        centre = module(views[:, 0])
    assert torch.allclose(seen["probs"], expected, atol=1e-6)
    assert torch.allclose(seen["centre"], centre)
