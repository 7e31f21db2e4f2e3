"""Can the data pipeline feed the model? Loader images/s with full augmentation vs model training images/s.

Builds the CIFAR-10 data module (all 45,000 training images decoded once into memory), then measures in one
run: (1) the train loader plus section 4.1's augmentation on the batch (random crops of the 4-padded image,
mirrors, PCA colour noise, normalisation), on the CPU, as training runs it; (2) training steps of the 32x32
network (`model=alexnet_cifar`: width 0.5, batch 128) on the same CPU. Target (issue: data pipeline): the
loader at least 5x faster than the model consumes.

    ALEXNET_DATA_DIR=../shared/data python benchmarks/loader_speed.py [--batches 100] [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
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
    parser.add_argument("--width", type=float, default=0.5)
    args = parser.parse_args()

    cfg = DataConfig(dataset=Dataset.cifar10, root=args.root, crop_padding=4, batch_size=128)
    start = time.perf_counter()
    dm = AlexNetDataModule(cfg)
    dm.setup("fit")
    setup_seconds = time.perf_counter() - start

    loader = dm.train_dataloader()
    seen = 0
    start = time.perf_counter()
    for i, (images, _) in enumerate(loader):
        x = dm.augment(images, "train")
        seen += len(x)
        if i + 1 == args.batches:
            break
    loader_speed = seen / (time.perf_counter() - start)

    net = AlexNet(num_classes=10, input_size=32, width=args.width)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = dm.augment(images, "train"), torch.randint(0, 10, (len(images),))
    for step in range(args.steps + 2):
        if step == 2:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    model_speed = args.steps * len(x) / (time.perf_counter() - start)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"setup (decode {len(dm.train_set) + len(dm.val_set) + len(dm.test_set)} JPEGs, statistics): "
          f"{setup_seconds:.1f} s")  # fmt: skip
    print(f"loader + augmentation : {loader_speed:9.0f} images/s")
    print(f"model training steps  : {model_speed:9.0f} images/s (width {args.width})")
    print(f"ratio loader / model  : {loader_speed / model_speed:9.1f}x (target >= 5x)")


if __name__ == "__main__":
    main()
