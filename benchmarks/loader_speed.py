"""Can the data pipeline feed the model? Loader images/s with full augmentation vs model training images/s.

Builds the CIFAR-10 data module (all 45,000 training images decoded once into memory), then measures in one
run, interleaved over rounds: (1) the train loader plus section 4.1's augmentation on the batch (random crops
of the 4-padded image, mirrors, PCA colour noise, normalisation), on the CPU, as training runs it; (2)
training steps of the 32x32 network (`model=alexnet_cifar`: width 0.5, batch 128, in channels_last as
`devices.channels_last` trains it by default) on the same CPU. Target (issue: data pipeline): the loader at
least 5x faster than the model consumes.

    ALEXNET_DATA_DIR=../shared/data python benchmarks/loader_speed.py [--batches 100] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _timing import interleave, machine, medians, sgd_steps  # noqa: E402

from alexnet.config import DataConfig, Dataset  # noqa: E402
from alexnet.data import AlexNetDataModule  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_root = Path(os.environ.get("ALEXNET_DATA_DIR", ROOT.parent / "shared" / "data")) / "cifar10"
    parser.add_argument("--root", default=str(default_root))
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--train-size", type=int, default=None, help="training images to decode (all: none)")
    args = parser.parse_args()

    cfg = DataConfig(
        dataset=Dataset.cifar10, root=args.root, crop_padding=4, batch_size=128, train_size=args.train_size
    )
    start = time.perf_counter()
    dm = AlexNetDataModule(cfg)
    dm.setup("fit")
    setup_seconds = time.perf_counter() - start

    def loader_speed() -> float:
        seen = 0
        start = time.perf_counter()
        for images, _ in itertools.islice(dm.train_dataloader(), args.batches):
            seen += len(dm.augment(images, "train"))
        return seen / (time.perf_counter() - start)

    images, labels = next(iter(dm.train_dataloader()))
    x = dm.augment(images, "train").contiguous(memory_format=torch.channels_last)
    net = AlexNet(num_classes=10, input_size=32, width=args.width).to(memory_format=torch.channels_last)
    measures = {"loader": loader_speed, "model": sgd_steps(net, x, labels, steps=args.steps)}
    speeds = medians(interleave(measures, args.rounds))

    print(machine())
    print(f"setup (decode {len(dm.train_set) + len(dm.val_set) + len(dm.test_set)} images, statistics): "
          f"{setup_seconds:.1f} s")  # fmt: skip
    print(f"loader + augmentation : {speeds['loader']:9.0f} images/s ({args.batches} batches)")
    print(f"model training steps  : {speeds['model']:9.0f} images/s (width {args.width}, {args.steps} steps)")
    print(f"ratio loader / model  : {speeds['loader'] / speeds['model']:9.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
