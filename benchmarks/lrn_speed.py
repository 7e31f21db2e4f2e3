"""How much local response normalization costs in training, ours vs torch.nn.LocalResponseNorm.

Trains the 32x32 network (the default `model=alexnet_cifar`, width 0.5, batch 128, SGD) on random
batches three ways: without LRN, with this project's LRN, and with torch's module (alpha scaled by n so it
computes the same function). All three in the layout training uses (channels_last, `devices.channels_last`'s
default; --layout nchw for the other). Prints images/s and the ratios to the no-LRN net, measured in this one
run, interleaved so that machine noise hits all three alike. Target (issue: core platform): ours >= 0.8x.

    python benchmarks/lrn_speed.py [--width 0.5] [--batch 128] [--steps 8] [--rounds 3] [--layout nchw]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import interleave, machine, medians, sgd_steps  # noqa: E402

from alexnet.model import LRN_ALPHA, LRN_BETA, LRN_K, LRN_SIZE, AlexNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layout", choices=["channels_last", "nchw"], default="channels_last")
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
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    if args.layout == "channels_last":
        nets = {name: net.to(memory_format=torch.channels_last) for name, net in nets.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    speeds = medians(
        interleave({name: sgd_steps(net, x, y, steps=args.steps) for name, net in nets.items()}, args.rounds)
    )
    base = speeds["no LRN"]
    print(machine())
    print(f"width {args.width}, batch {args.batch}, {args.layout}, {args.steps} steps x {args.rounds} rounds")
    for name, median in speeds.items():
        print(f"{name:28s} {median:7.1f} images/s   ratio to no LRN: {median / base:.2f}")


if __name__ == "__main__":
    main()
