"""One device or two: training images/s of the 227 network where it runs, as ratios measured in one run.

Trains the paper's network (`model=alexnet`: 227x227, two columns, batch 128, SGD 0.9 / 5e-4) on random
batches, and prints images/s and the ratio to the baseline, all measured in this one run, interleaved so
that machine noise hits every row alike:

- one device, fp32, NCHW: the two-column net in its grouped-convolution form (`devices=one
  devices.channels_last=false`): the baseline; every row is NCHW unless it says channels_last;
- one column (`model.columns=1`), one device, fp32: footnote 2's net, a different function, for reference;
- model parallel (`devices=model_parallel`): column A on cuda:0, column B on cuda:1 (on a one-GPU machine
  both on cuda:0, said in the row: the code path without a second device);
- DDP (`devices=ddp`): one process per GPU, the batch of 128 split over them (as `devices=ddp` trains),
  measured after the other rows in processes of its own; on one GPU (or the CPU, unless
  --cpu-ddp-processes says otherwise) a 1-process DDP, interleaved with the others, which measures DDP's
  overhead only, said in the row;
- bf16 autocast, channels_last (`devices=one` as it trains by default), and both, on one device.

    python benchmarks/device_speed.py                                    # a GPU machine: the real numbers
    python benchmarks/device_speed.py --device cpu --input-size 32 --width 0.25 --batch 16 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import socket
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import cpu_name, interleave, sgd_steps  # noqa: E402

from alexnet.devices import TwoDeviceAlexNet  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402

NUM_CLASSES = 1000


@dataclass(frozen=True)
class Setup:
    """One row: how the network is built and run. ``devices``: column devices for model parallel."""

    columns: int = 2
    devices: tuple[str, str] | None = None
    bf16: bool = False
    channels_last: bool = False


def build(args: argparse.Namespace, setup: Setup, device: str) -> nn.Module:
    torch.manual_seed(0)
    net = AlexNet(
        num_classes=NUM_CLASSES, input_size=args.input_size, columns=setup.columns, width=args.width
    )
    if setup.devices is not None:
        return TwoDeviceAlexNet(net, setup.devices)
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if setup.channels_last else net


def images_per_second(
    net: nn.Module, args: argparse.Namespace, setup: Setup, device: str, batch: int
) -> Callable[[], float]:
    """A measurement to repeat: ``args.steps`` timed SGD steps after two warm-up steps (_timing.py)."""
    x = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
    if setup.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=device)
    return sgd_steps(net, x, y, steps=args.steps, autocast=torch.bfloat16 if setup.bf16 else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_measure(args: argparse.Namespace, rank: int, world: int, port: int) -> Callable[[], float]:
    """One DDP process (joined to the process group): its share of the batch, gradients averaged by DDP's
    all-reduce at every step. The measurement returns the images/s of all processes together."""
    cuda = args.device == "cuda"
    device = f"cuda:{rank}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    net = DistributedDataParallel(build(args, Setup(), device), device_ids=[rank] if cuda else None)
    measure = images_per_second(net, args, Setup(), device, args.batch // world)
    return lambda: measure() * world  # every process steps on its own share at the same pace


def ddp_worker(rank: int, world: int, args: argparse.Namespace, port: int, results) -> None:
    if args.device == "cpu":  # the CPU's cores shared out between the processes, as Lightning does
        torch.set_num_threads(max(1, args.threads // world))
    try:
        measure = ddp_measure(args, rank, world, port)
        speeds = [measure() for _ in range(args.rounds)]
        if rank == 0:
            results.put(speeds)
    finally:
        dist.destroy_process_group()


def spawned_ddp_speeds(args: argparse.Namespace, world: int) -> list[float]:
    """DDP over ``world`` processes, one per device, launched here (after the other rows)."""
    results = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        ddp_worker, args=(world, args, free_port(), results), nprocs=world, start_method="spawn"
    )
    return results.get()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--input-size", type=int, choices=[227, 32], default=227)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cpu-ddp-processes", type=int, default=1, help="DDP processes on --device cpu (gloo); default 1"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    gpus = torch.cuda.device_count() if cuda else 0
    if cuda and gpus == 0:
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    device = "cuda:0" if cuda else "cpu"
    if cuda:
        name = torch.cuda.get_device_name(0) + (f" (x{gpus})" if gpus > 1 else "")
        column_devices, split = ("cuda:0", "cuda:1") if gpus > 1 else ("cuda:0", "cuda:0"), gpus > 1
        world = gpus
    else:
        name = f"CPU {cpu_name()}, {args.threads} threads"
        column_devices, split, world = ("cpu", "cpu"), False, args.cpu_ddp_processes
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must split evenly over {world} DDP processes")

    baseline = "one device, fp32, NCHW (two columns grouped; devices.channels_last=false)"
    mp_note = "" if split else f" (both columns on {column_devices[0]}: one device, no second to gain from)"
    rows: dict[str, Setup] = {
        baseline: Setup(),
        "one column (model.columns=1: another function), fp32": Setup(columns=1),
        f"model parallel, columns on {column_devices[0]}/{column_devices[1]}{mp_note}": Setup(
            devices=column_devices
        ),
        "bf16 autocast": Setup(bf16=True),
        "channels_last (devices=one's default)": Setup(channels_last=True),
        "bf16 autocast + channels_last": Setup(bf16=True, channels_last=True),
    }
    measures = {
        label: images_per_second(build(args, setup, device), args, setup, device, args.batch)
        for label, setup in rows.items()
    }
    ddp_label = f"DDP x{world} ({'nccl' if cuda else 'gloo'}, batch {args.batch // world} per process)"
    if world == 1:  # in this process, interleaved with the other rows
        ddp_label += ": one process, so DDP's overhead only"
        measures[ddp_label] = ddp_measure(args, 0, 1, free_port())
    speeds = interleave(measures, args.rounds)
    if world == 1:
        dist.destroy_process_group()
    else:
        speeds[ddp_label] = spawned_ddp_speeds(args, world)

    base = statistics.median(speeds[baseline])
    print(f"device: {name}; torch {torch.__version__}; {datetime.date.today().isoformat()}")
    size = f"{args.input_size}x{args.input_size}"
    print(
        f"network: {size}, width {args.width}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds"
    )
    print(f"{'setup':<92} {'images/s':>10} {'ratio':>7}")
    for label, values in speeds.items():
        median = statistics.median(values)
        print(f"{label:<92} {median:10.1f} {median / base:6.2f}x")


if __name__ == "__main__":
    main()
