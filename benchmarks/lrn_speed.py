"""How much local response normalization costs in training, ours vs torch.nn.LocalResponseNorm.

Trains the 32x32 network (the default `model=alexnet_cifar`, width 0.5, batch 128, SGD) on random
batches three ways: without LRN, with this project's LRN, and with torch's module (alpha scaled by n so it
computes the same function). Prints images/s and the ratios to the no-LRN net, measured in this one run,
interleaved so that machine noise hits all three alike. Target (issue: core platform): ours >= 0.8x.

    python benchmarks/lrn_speed.py [--width 0.5] [--batch 128] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from alexnet.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, AlexNet  # noqa: E402


def images_per_second(net: nn.Module, batch: int, steps: int) -> float:
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    for step in range(steps + 2):  # two warm-up steps
        if step == 2:
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    nets = {
        "no LRN": AlexNet(num_classes=10, input_size=32, width=args.width, lrn=False),
        "ours": AlexNet(num_classes=10, input_size=32, width=args.width, lrn=True),
        "torch.nn.LocalResponseNorm": AlexNet(num_classes=10, input_size=32, width=args.width, lrn=True),
    }
    # torch's module cannot keep the two columns apart (ours does: groups=2); the work per element is equal.
    for name in ("lrn1", "lrn2"):
        torch_lrn = nn.LocalResponseNorm(LRN_SIZE, alpha=LRN_ALPHA * LRN_SIZE, beta=LRN_BETA, k=LRN_K)
        setattr(nets["torch.nn.LocalResponseNorm"].features, name, torch_lrn)
    speeds: dict[str, list[float]] = {name: [] for name in nets}
    for _ in range(args.rounds):
        for name, net in nets.items():
            speeds[name].append(images_per_second(net, args.batch, args.steps))
    base = statistics.median(speeds["no LRN"])
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, width {args.width}, batch {args.batch}")
    for name, values in speeds.items():
        median = statistics.median(values)
        print(f"{name:28s} {median:7.1f} images/s   ratio to no LRN: {median / base:.2f}")


if __name__ == "__main__":
    main()
