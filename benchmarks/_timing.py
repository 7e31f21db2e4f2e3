"""What every benchmark here times the same way, written once.

- ``sgd_steps``: the training images/s of a network on one fixed batch: SGD with section 5's momentum 0.9 and
  weight decay 5e-4, a few untimed warm-up steps, then timed steps; optionally under autocast, with the
  devices synchronised around the timed span (a GPU runs asynchronously: without it the clock would stop
  before the work does).
- ``step_speed``: the same for any step function (a compiled one, say); ``matmul_peak``: the GFLOP/s of a
  large fp32 matrix product, the machine's peak to hold a step's GFLOP/s against.
- ``interleave``: several such measurements, each once per round in the same order, so that noise from
  other work on the machine hits every setup alike; ``medians`` summarises the rounds.
- ``machine``: the line that says where the numbers were measured.

The benchmarks import it the way they import ``src``: ``sys.path.insert(0, <this folder>)``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import nn

Measure = Callable[[], float]  # one measurement: images/s


def synchronize(device: torch.device | str) -> None:
    """Wait for every CUDA device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def sgd_steps(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    steps: int,
    warmup: int = 2,
    autocast: torch.dtype | None = None,
    lr: float = 0.01,
) -> Measure:
    """A measurement to repeat: images/s of ``steps`` SGD steps of ``net`` on the batch ``(x, y)`` (cross
    entropy, momentum 0.9, weight decay 5e-4), after ``warmup`` untimed steps at every call. ``autocast``:
    a dtype (e.g. ``torch.bfloat16``) to run forward and loss under ``torch.autocast`` on ``x``'s device."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, warmup={warmup}: need at least one timed step")
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    device = x.device

    def context():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=autocast)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with context():
            loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()

    return step_speed(step, len(x), steps=steps, warmup=warmup, device=device)


def step_speed(
    step: Callable[[], object], batch: int, *, steps: int, warmup: int = 2, device: torch.device | str = "cpu"
) -> Measure:
    """A measurement to repeat: images/s of ``steps`` calls of ``step`` (one training step on ``batch``
    images), after ``warmup`` untimed calls at every call."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps={steps}, warmup={warmup}: need at least one timed step")

    def measure() -> float:
        for _ in range(warmup):
            step()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        return steps * batch / (time.perf_counter() - start)

    return measure


def matmul_peak(n: int, repeats: int) -> Callable[[], float]:
    """A measurement to repeat: GFLOP/s of torch.mm of two n x n fp32 matrices on the CPU, the median of
    ``repeats`` products after one warm-up product (the machine's fp32 peak on torch's threads)."""
    gen = torch.Generator().manual_seed(0)
    a, b, out = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen), torch.empty(n, n)

    def measure() -> float:
        torch.mm(a, b, out=out)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            seconds.append(time.perf_counter() - start)
        return 2 * n**3 / statistics.median(seconds) / 1e9

    return measure


def interleave(
    measures: Mapping[str, Measure], rounds: int, progress: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    """Every measurement once per round, in the given order, ``rounds`` times: {label: [value per round]}.
    ``progress``, if given, is told each (round, label) before it is measured."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: need at least one round")
    values: dict[str, list[float]] = {label: [] for label in measures}
    for index in range(rounds):
        for label, measure in measures.items():
            if progress is not None:
                progress(f"round {index + 1}/{rounds}: {label}")
            values[label].append(measure())
    return values


def medians(values: Mapping[str, list[float]]) -> dict[str, float]:
    return {label: statistics.median(v) for label, v in values.items()}


def cpu_name() -> str:
    """The processor's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """torch's version and threads, the CPU and its cores (and the GPU if any), and today's date: one line."""
    parts = [
        f"torch {torch.__version__}",
        f"{torch.get_num_threads()} threads",
        f"CPU {cpu_name()} ({os.cpu_count()} cores)",
    ]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})")
    parts.append(f"date {datetime.date.today().isoformat()}")
    return "; ".join(parts)
