"""Section 4.1 on whole batches: what the network sees in training, in validation and in testing.

The data module hands over uint8 canvases (B, 3, H, W) on the training device; ``Preset`` turns them into
normalised float inputs:

- training: a random ``image_size`` window of each canvas (at 32, of the image zero-padded by
  ``crop_padding``), mirrored left-right with probability 1/2, plus PCA colour noise;
- validation: the centre crop;
- testing: the centre crop and, with ``data.ten_crop``, ten views (the centre and four corners, and their
  mirrors) of the same canvas.

The random numbers of a training batch are a ``Draws``: every kind is drawn for every image, whichever
switches are on, so two arms that share a seed draw the same numbers (alexnet.seeding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from alexnet.config import DataConfig


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


@dataclass
class Draws:
    """The random numbers of one training batch: each image's crop offset, mirror flag and PCA weights."""

    top: torch.Tensor  # (B,) int: the window's first row in the padded canvas
    left: torch.Tensor  # (B,) int
    mirror: torch.Tensor  # (B,) bool
    alphas: torch.Tensor  # (B, 3): a_i ~ N(0, 1), times data.pca_sigma when used

    @classmethod
    def new(cls, batch: int, offsets: int, generator: torch.Generator | None = None) -> Draws:
        """``offsets``: the number of window positions along each side (canvas - crop + 1)."""
        return cls(
            top=torch.randint(0, offsets, (batch,), generator=generator),
            left=torch.randint(0, offsets, (batch,), generator=generator),
            mirror=torch.rand(batch, generator=generator) < 0.5,
            alphas=torch.randn(batch, 3, generator=generator),
        )

    def to(self, device: torch.device) -> Draws:
        return Draws(*(t.to(device) for t in (self.top, self.left, self.mirror, self.alphas)))


def crops(images: torch.Tensor, size: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """The ``size`` x ``size`` window of each image whose top-left corner is (``top``, ``left``)."""
    b = images.shape[0]
    offsets = torch.arange(size, device=images.device)
    rows = top.view(b, 1, 1) + offsets.view(1, size, 1)
    cols = left.view(b, 1, 1) + offsets.view(1, 1, size)
    batch = torch.arange(b, device=images.device).view(b, 1, 1)
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def pad(images: torch.Tensor, padding: int) -> torch.Tensor:
    return torch.nn.functional.pad(images, [padding] * 4) if padding else images


def centre_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size]


def mirrors(images: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """The images whose ``mirror`` flag is set, mirrored left-right."""
    return torch.where(mirror.view(-1, 1, 1, 1), images.flip(-1), images)


def ten_views(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 10, 3, size, size): the centre crop first, then the four corners, then the mirrors of all five."""
    tl, tr, bl, br, centre, *mirrored = TF.ten_crop(images, [size, size])
    mirrored = [mirrored[4], *mirrored[:4]]  # torchvision puts the mirrored centre fifth; keep centre first
    return torch.stack([centre, tl, tr, bl, br, *mirrored], dim=1)


def pca_color_offsets(stats: PixelStats, sigma: float, alphas: torch.Tensor) -> torch.Tensor:
    """Section 4.1: per image, the RGB offset [p1 p2 p3][a1*l1, a2*l2, a3*l3]^T with a_i ~ N(0, sigma), from
    standard normal ``alphas`` (B, 3). On the [0, 1] pixel scale the statistics were taken on."""
    device = alphas.device
    return (alphas * sigma * stats.eigvals.to(device)) @ stats.eigvecs.to(device).T


class Preset:
    """uint8 canvases in, normalised float inputs out, for one data config and its pixel statistics."""

    def __init__(self, cfg: DataConfig, stats: PixelStats):
        self.cfg, self.stats = cfg, stats

    @property
    def offsets(self) -> int:
        """Window positions along each side of a training canvas."""
        return self.cfg.resize_size + 2 * self.cfg.crop_padding - self.cfg.image_size + 1

    def train(self, images: torch.Tensor, draws: Draws | None = None) -> torch.Tensor:
        cfg, size = self.cfg, self.cfg.image_size
        draws = (draws or Draws.new(len(images), self.offsets)).to(images.device)
        x = (
            crops(pad(images, cfg.crop_padding), size, draws.top, draws.left)
            if cfg.crops
            else centre_crop(images, size)
        )
        if cfg.flips:
            x = mirrors(x, draws.mirror)
        x = x.float().div_(255.0)
        if cfg.pca_color and cfg.pca_sigma > 0:
            x += pca_color_offsets(self.stats, cfg.pca_sigma, draws.alphas).view(-1, 3, 1, 1)
        return self.normalise(x)

    def eval(self, images: torch.Tensor) -> torch.Tensor:
        return self.normalise(centre_crop(images, self.cfg.image_size).float().div_(255.0))

    def test(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 10, 3, s, s) views, the centre first, with ``data.ten_crop``; the centre crop otherwise. The
        views are windows of the padded canvas: the same family of windows training sampled from."""
        if not self.cfg.ten_crop:
            return self.eval(images)
        return self.normalise(
            ten_views(pad(images, self.cfg.crop_padding), self.cfg.image_size).float() / 255.0
        )

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        mean = self.stats.mean.to(x.device).view(3, 1, 1)
        std = self.stats.std.to(x.device).view(3, 1, 1)
        return (x - mean) / std
