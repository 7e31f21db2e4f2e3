"""Which training images are held out for validation, and the seeded subsets of a split.

``data.val_size`` images of a seeded permutation (``split_indices``, as every run so far has held them out),
or with null a tenth of each class (``holdout``): 10 of 100 images, 10,000 of 100,000, at least one a class.
``val_size_for`` settles, before any run opens, what a data set of a given size takes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from alexnet.config import DataConfig
from alexnet.errors import DataError, require

log = logging.getLogger(__name__)

VAL_FRACTION = 0.1  # data.val_size=null holds out this share of each class's training images


def split_indices(n: int, first: int, second: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded permutation of range(n) cut into [first] and [the next `second`, or all the rest]."""
    if first >= n:
        raise DataError(f"data.val_size={first} leaves no training images out of {n}; lower it.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:first], order[first : None if second is None else first + second]


def val_per_class(counts: Sequence[int]) -> list[int]:
    """The images of each class held out when data.val_size is null: a tenth, at least one, never a class's
    only image."""
    return [max(1, round(VAL_FRACTION * n)) if n > 1 else 0 for n in counts]


def holdout(
    labels: torch.Tensor, val_size: int | None, train_size: int | None, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) indices: ``val_size`` images of a seeded permutation, or with null
    ``val_per_class`` of each class; the training images are the rest, or the next ``train_size`` of them."""
    if val_size is not None:
        return split_indices(len(labels), val_size, train_size, seed)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    ranked, held = labels[order], torch.zeros(len(labels), dtype=torch.bool)
    for label, count in enumerate(val_per_class(torch.bincount(labels).tolist())):
        held[order[ranked == label][:count]] = True
    if not held.any():
        raise DataError("Every class has a single training image: too few to hold out a validation split.")
    rest = order[~held[order]]
    return order[held[order]], rest if train_size is None else rest[:train_size]


def val_size_for(cfg: DataConfig, counts: Sequence[int] | None, given: bool) -> int | None:
    """``data.val_size`` as this data set takes it, before any run opens. A number given on the command line
    is held out exactly. One from a config file (an experiment preset, written for CIFAR-10's 50,000 images)
    that is more than a tenth of the training images gives way to null: a tenth of each class.
    ``counts``: the training images of each class (None where not listed: CIFAR-10's arrays, synthetic)."""
    where = f"{cfg.root}/train"
    if counts is None:
        return cfg.val_size
    total = sum(counts)
    if cfg.val_size is None:
        if not any(val_per_class(counts)):
            raise DataError(
                f"Every class of {where} has a single image: too few to hold out a validation split for the "
                "learning-rate schedule. Add images."
            )
        return None
    if given or cfg.val_size <= VAL_FRACTION * total:
        require(
            cfg.val_size < total,
            "data.val_size",
            cfg.val_size,
            f"{where} holds {total} training images and it would leave none to train on; lower it, or "
            "data.val_size=null (a tenth of each class)",
        )
        return cfg.val_size
    log.warning(
        "data.val_size=%d (from the config, not the command line) is more than a tenth of the %d training "
        "images in %s: holding out a tenth of each class instead; give data.val_size on the command line to "
        "hold out a number of your own.",
        cfg.val_size, total, where,
    )  # fmt: skip
    return None


def subset(n: int, size: int | None, seed: int) -> torch.Tensor:
    if size is None or size >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
