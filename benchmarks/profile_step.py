"""Where the training step's time goes, and how close it comes to this machine's one-thread fp32 peak.

The step is training_speed.py's bare step: the 32x32 LRN net (`model=alexnet_cifar`), batch 128, SGD (momentum
0.9, weight decay 5e-4), channels_last (the default). Per width (--widths), on --threads threads (default 1):

1. Profile: --profile-steps steps under torch.profiler, each drawing its batch from the real train loader
   (in-memory CIFAR-10, else synthetic) with section 4.1's augmentation, in four record_function scopes
   (data, forward, backward, optimizer). The forward scope's ops and the backward scope's autograd nodes
   are assigned to categories by name (FORWARD_OPS, BACKWARD_NODES), each with its whole subtree; the rest
   of those two scopes (ReLU, dropout, loss, flatten, autograd bookkeeping, Python) is "other".
2. FLOPs per image: FlopCounterMode over one step's forward and backward (convolutions and matrix products,
   LRN's banded ones included; elementwise ops, pooling and the optimizer count nothing).
3. fp32 peak: torch.mm of two --matmul square matrices (_timing.matmul_peak), once per round.
4. Variants of the bare step (one fixed random batch), interleaved round by round with the peak: NCHW,
   oneDNN off, oneDNN's fp32 math in bf16 (AMX), torch.compile (inductor) of the model, and of the model
   and the SGD step. Each first runs --check-steps steps from the same weights and dropout draws (compiled
   code draws from eager's generator: inductor's fallback_random), as does the default in float64. A
   variant is identical within float tolerance if every tensor t (losses, weights, gradients) has
   ||t - default|| <= 2 ||default - float64|| + FLOOR ||float64||: no further from the default than
   float32's rounding already puts the default from the exact result, twice over.

    python benchmarks/profile_step.py                # both widths, all variants: about 10 minutes
    python benchmarks/profile_step.py --no-compile   # without torch.compile's variants
    python benchmarks/profile_step.py --smoke        # width 0.125, tiny, no compile: seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from _timing import interleave, machine, matmul_peak, step_speed  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from alexnet.config import DataConfig, Dataset  # noqa: E402
from alexnet.data import AlexNetDataModule  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402

CONV_F, CONV_B = "conv forward", "conv backward"
LRN, POOL, FC = "LRN (forward + backward)", "pooling (forward + backward)", "fully connected (fwd + bwd)"
OTHER = "other (ReLU, dropout, loss, flatten, autograd)"
OPTIMIZER, DATA = "optimizer step (zero_grad + SGD)", "data (loader + augmentation)"
CATEGORIES = (CONV_F, CONV_B, LRN, POOL, FC, OTHER, OPTIMIZER, DATA)
# The events directly inside the forward scope, and the autograd nodes directly inside the backward scope.
FORWARD_OPS = {"aten::conv2d": CONV_F, "_LRNFunction": LRN, "aten::max_pool2d": POOL, "aten::linear": FC}
BACKWARD_NODES = {
    "ConvolutionBackward0": CONV_B,
    "_LRNFunctionBackward": LRN,
    "MaxPool2DWithIndicesBackward0": POOL,
    "AddmmBackward0": FC,
    "MmBackward0": FC,
    "TBackward0": FC,
}
NODE_PREFIX = "autograd::engine::evaluate_function: "
PHASES = {"phase::data": DATA, "phase::forward": None, "phase::backward": None, "phase::optimizer": OPTIMIZER}
FLOOR = 1e-5  # relative: float32 noise on a tensor the default happens to get exactly right
PEAK = "fp32 peak (matmul)"


# --- The step and its variants ----------------------------------------------------------------------------


def lrn_net(width: float, channels_last: bool = True) -> nn.Module:
    net = AlexNet(num_classes=10, input_size=32, width=width, lrn=True, seed=0)  # as training_speed.py
    return net.to(memory_format=torch.channels_last) if channels_last else net


def sgd(net: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


@contextlib.contextmanager
def onednn_bf16():
    """oneDNN's convolutions and matrix products take fp32 tensors but compute in bf16 (AMX where present)."""
    m = torch.backends.mkldnn
    old = m.conv.fp32_precision, m.matmul.fp32_precision
    m.conv.fp32_precision = m.matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        m.conv.fp32_precision, m.matmul.fp32_precision = old


def no_onednn() -> contextlib.AbstractContextManager:
    return torch.backends.mkldnn.flags(enabled=False)


@dataclass(frozen=True)
class Variant:
    label: str
    channels_last: bool = True
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    compile_model: bool = False
    compile_optimizer: bool = False


VARIANTS = {
    "default": Variant("eager, channels_last (the default)"),
    "nchw": Variant("eager, NCHW", channels_last=False),
    "onednn_off": Variant("eager, oneDNN off (torch.backends.mkldnn)", context=no_onednn),
    "onednn_bf16": Variant("eager, oneDNN fp32 math in bf16 (AMX)", context=onednn_bf16),
    "compile": Variant("torch.compile(model), inductor", compile_model=True),
    "compile_step": Variant(
        "torch.compile(model) + compiled SGD step", compile_model=True, compile_optimizer=True
    ),
}
COMPILED = ("compile", "compile_step")


def build_step(variant: Variant, width: float, x: torch.Tensor, y: torch.Tensor):
    """(net, step): one SGD step of ``variant`` on the batch (x, y) per call, returning the loss; in x's
    dtype (float64: the reference that float32's rounding is measured against)."""
    net = lrn_net(width, variant.channels_last).to(x.dtype)
    x = x.contiguous(memory_format=torch.channels_last if variant.channels_last else torch.contiguous_format)
    forward = torch.compile(net) if variant.compile_model else net
    optimizer = sgd(net)
    update = torch.compile(optimizer.step) if variant.compile_optimizer else optimizer.step

    def step() -> torch.Tensor:
        with variant.context():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(forward(x), y)
            loss.backward()
            update()
        return loss

    return net, step


def first_steps(net: nn.Module, step, steps: int) -> tuple[list[torch.Tensor], float]:
    """The losses, final weights and gradients of the first ``steps`` steps (dropout draws from seed 0), and
    the seconds they took (a compiled variant compiles in them)."""
    torch.manual_seed(0)
    start = time.perf_counter()
    losses = torch.stack([step().detach() for _ in range(steps)])
    seconds = time.perf_counter() - start
    params = [p.detach().clone() for p in net.parameters()]
    grads = [p.grad.detach().clone() for p in net.parameters()]
    return [losses, *params, *grads], seconds


def distance(got: list[torch.Tensor], ref: list[torch.Tensor]) -> list[float]:
    """||got - ref|| / ||ref|| per tensor, in float64."""
    pairs = zip(got, ref, strict=True)
    return [float((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-300)) for g, r in pairs]


def identical(got: list[torch.Tensor], default: list[torch.Tensor], exact: list[torch.Tensor]) -> bool:
    apart, rounding = distance(got, default), distance(default, exact)
    scale = [float(d.double().norm() / e.double().norm()) for d, e in zip(default, exact, strict=True)]
    return all(a * s <= 2 * r + FLOOR for a, s, r in zip(apart, scale, rounding, strict=True))


# --- Data, FLOPs and the profile --------------------------------------------------------------------------


def data_module(args: argparse.Namespace) -> tuple[AlexNetDataModule, str]:
    """The data module training uses, on a few batches of CIFAR-10's training images (else synthetic)."""
    batch, images = args.batch, args.batch * args.data_batches
    base = Path(args.data_root or Path(os.environ.get("ALEXNET_DATA_DIR", ROOT.parent / "shared" / "data")))
    root = base / "cifar10" if not args.data_root else base
    small = {"batch_size": batch, "val_size": batch, "test_size": batch, "cache_dir": None}
    if (root / "train").is_dir() or (root / "cifar-10-batches-py").is_dir():
        cfg = DataConfig(dataset=Dataset.cifar10, root=str(root), train_size=images, **small)
        what = f"CIFAR-10 from {root}"
    else:
        cfg = DataConfig(dataset=Dataset.synthetic, synthetic_size=images, **small)
        what = "synthetic (no CIFAR-10 found)"
    dm = AlexNetDataModule(cfg, seed=0)
    dm.setup("fit")
    return dm, f"{what}, {images} training images"


def batches(dm: AlexNetDataModule):
    while True:
        yield from dm.train_dataloader()


def flops_per_image(width: float, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """FLOPs per image of one step's forward and backward: total and by layer kind (conv, fc, LRN)."""
    net = lrn_net(width)
    with FlopCounterMode(display=False) as counter:
        nn.functional.cross_entropy(net(x), y).backward()
    kinds = {"conv": 0, "fc": 0, "lrn": 0}
    for module, ops in counter.get_flop_counts().items():
        leaf = module.rsplit(".", 1)[-1]
        kind = next((k for k in kinds if leaf.startswith(k) and leaf[len(k) :].isdigit()), None)
        if kind is not None:
            kinds[kind] += sum(ops.values())
    return {"total": counter.get_total_flops() / len(x)} | {k: v / len(x) for k, v in kinds.items()}


def profile_steps(width: float, dm: AlexNetDataModule, steps: int, warmup: int = 2) -> dict[str, float]:
    """Milliseconds per step of each category, over ``steps`` profiled steps of the default on loader
    batches."""
    net, source = lrn_net(width), batches(dm)
    optimizer = sgd(net)

    def step() -> None:
        with record_function("phase::data"):
            images, labels = next(source)
            x = dm.augment(images, "train")
        with record_function("phase::optimizer"):
            optimizer.zero_grad(set_to_none=True)
        with record_function("phase::forward"):
            loss = nn.functional.cross_entropy(net(x), labels)
        with record_function("phase::backward"):
            loss.backward()
        with record_function("phase::optimizer"):
            optimizer.step()

    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        if event.name not in PHASES or event.cpu_parent is not None:
            continue
        whole, assigned = event.cpu_time_total / 1e3, 0.0
        if PHASES[event.name] is not None:
            ms[PHASES[event.name]] += whole
            continue
        for child in event.cpu_children:
            name = child.name.removeprefix(NODE_PREFIX)
            category = (FORWARD_OPS if event.name == "phase::forward" else BACKWARD_NODES).get(name)
            if category is not None:
                ms[category] += child.cpu_time_total / 1e3
                assigned += child.cpu_time_total / 1e3
        ms[OTHER] += whole - assigned
    return {category: value / steps for category, value in ms.items()}


# --- The run ----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--widths", default="0.25,0.5", help="comma-separated model.width values")
    add("--batch", type=int, default=128)
    add("--threads", type=int, default=1, help="torch's CPU threads (default 1)")
    add("--profile-steps", type=int, default=5, help="profiled steps per width, after 2 warm-up")
    add("--steps", type=int, default=6, help="timed steps per variant and round, after 2 warm-up")
    add("--rounds", type=int, default=3)
    add("--check-steps", type=int, default=3, help="steps compared before timing")
    add("--matmul", type=int, default=2048, help="side of the peak's square matrices")
    add("--matmul-repeats", type=int, default=5)
    add("--variants", default=",".join(VARIANTS), help=f"default first, then any of {', '.join(VARIANTS)}")
    add("--no-compile", action="store_true", help="leave out the torch.compile variants")
    add(
        "--warm-cache", action="store_true", help="inductor's usual cache (default: a new one, compiled cold)"
    )
    add("--data-root", help="CIFAR-10's folder (default: ALEXNET_DATA_DIR/cifar10)")
    add("--data-batches", type=int, default=10, help="training batches decoded for the loader")
    add("--smoke", action="store_true", help="width 0.125, 1 round of 2 steps, no compile: seconds")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.smoke:
        args.widths, args.steps, args.rounds, args.profile_steps, args.check_steps = "0.125", 2, 1, 1, 2
        args.matmul, args.matmul_repeats, args.data_batches, args.no_compile = 256, 2, 2, True
    args.width_list = [float(w) for w in args.widths.split(",")]
    args.variant_keys = [k for k in args.variants.split(",") if not (args.no_compile and k in COMPILED)]
    if args.variant_keys[:1] != ["default"] or not set(args.variant_keys) <= set(VARIANTS):
        parser.error(f"--variants: 'default' first, then any of {', '.join(VARIANTS)}")
    return args


def commit() -> str:
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" (this script uncommitted)" if git("status", "--porcelain", "--", __file__) else "")


def load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg()) + " (1 / 5 / 15 min)"


@dataclass
class Width:
    width: float
    flops: dict[str, float]
    ms: dict[str, float]
    values: dict[str, list[float]]
    checks: dict[str, tuple[list[torch.Tensor], float]]
    exact: list[torch.Tensor]


def measure_width(args: argparse.Namespace, width: float, dm, peak) -> tuple[Width, list[float]]:
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    flops = flops_per_image(width, x.contiguous(memory_format=torch.channels_last), y)
    ms = profile_steps(width, dm, args.profile_steps)
    net, step = build_step(VARIANTS["default"], width, x.double(), y)
    exact = first_steps(net, step, args.check_steps)[0]
    measures, checks = {}, {}
    for k in args.variant_keys:
        net, step = build_step(VARIANTS[k], width, x, y)
        checks[k] = first_steps(net, step, args.check_steps)
        measures[k] = step_speed(step, args.batch, steps=args.steps)

    def progress(what: str) -> None:
        print(f"  width {width}: {what}", file=sys.stderr, flush=True)

    values = interleave(measures | {PEAK: peak}, args.rounds, progress=progress)
    peaks = values.pop(PEAK)
    return Width(width, flops, ms, values, checks, exact), peaks


def print_width(args: argparse.Namespace, w: Width, peak: float) -> bool:
    """The width's tables; whether its bare step reaches 60% of the peak."""
    flops, ms = w.flops, w.ms
    bare = sum(v for c, v in ms.items() if c != DATA)
    total = bare + ms[DATA]
    print(f"\nwidth {w.width}")
    print(
        "  FLOPs per training image (FlopCounterMode, forward + backward of one step): "
        f"{flops['total'] / 1e9:.4f} GFLOP = conv {flops['conv'] / 1e9:.4f} + fully connected "
        f"{flops['fc'] / 1e9:.4f} + LRN band {flops['lrn'] / 1e9:.4f}"
    )
    print(f"  profile: {args.profile_steps} steps under torch.profiler, ms per step")
    print(f"  {'category':<48} {'ms/step':>9} {'% of step+data':>15} {'% of bare step':>15}")
    for category in CATEGORIES:
        share = "-" if category == DATA else f"{100 * ms[category] / bare:.1f}"
        print(f"  {category:<48} {ms[category]:9.1f} {100 * ms[category] / total:15.1f} {share:>15}")
    print(f"  {'total':<48} {total:9.1f} {100.0:15.1f} {'-':>15}  (bare step {bare:.1f} ms)")
    print(
        f"  bare step variants: images/s, medians of {args.rounds} rounds of {args.steps} steps; after "
        f"{args.check_steps} steps, the largest ||difference|| / ||result|| of a loss, weight or gradient "
        "from the float64 default and from the float32 default; identical: within float tolerance"
    )
    print(
        f"  {'variant':<48} {'images/s':>9} {'GFLOP/s':>8} {'of peak':>8} {'vs default':>11} "
        f"{'vs float64':>11}  identical (distance from the default)"
    )
    default, ref = statistics.median(w.values["default"]), w.checks["default"][0]
    cache = "inductor's usual cache" if args.warm_cache else "a new, empty inductor cache"
    for k, rounds in w.values.items():
        speed = statistics.median(rounds)
        gflops = speed * flops["total"] / 1e9
        got, seconds = w.checks[k]
        error, apart = max(distance(got, w.exact)), max(distance(got, ref))
        same = f"{'yes' if identical(got, ref, w.exact) else 'NO'} ({apart:.1e})"
        if k == "default":
            same = "reference"
        elif k in COMPILED:
            same += f"; first {args.check_steps} steps {seconds:.0f} s (compiling, {cache})"
        print(
            f"  {VARIANTS[k].label:<48} {speed:9.1f} {gflops:8.1f} {100 * gflops / peak:7.1f}% "
            f"{speed / default:10.2f}x {error:11.1e}  {same}"
        )
    fraction = default * flops["total"] / 1e9 / peak
    print(
        f"  bare step (default): {default * flops['total'] / 1e9:.1f} GFLOP/s = {100 * fraction:.1f}% of the "
        f"measured peak (target >= 60%: {'met' if fraction >= 0.6 else 'MISSED'}); unprofiled "
        f"{1e3 * args.batch / default:.1f} ms per step"
    )
    return fraction >= 0.6


def run(args: argparse.Namespace) -> int:
    start, load_start = time.perf_counter(), load()
    dm, data = data_module(args)
    peak = matmul_peak(args.matmul, args.matmul_repeats)
    widths, peaks = [], []
    for width in args.width_list:
        measured, width_peaks = measure_width(args, width, dm, peak)
        widths.append(measured)
        peaks += width_peaks
    peak_gflops = statistics.median(peaks)
    print(f"profile of the bare training step, 32x32 LRN net (model=alexnet_cifar), batch {args.batch}")
    print(machine())
    print(f"commit {commit()}; load average at the start {load_start}")
    print("command: python benchmarks/profile_step.py " + " ".join(args.argv))
    print(f"data: {data}; per step one loader batch + section 4.1 augmentation (AlexNetDataModule.augment)")
    print(
        f"{PEAK}, {args.threads} thread(s): torch.mm {args.matmul}x{args.matmul}, median of "
        f"{args.matmul_repeats} per round, median of {len(peaks)} rounds: {peak_gflops:.1f} GFLOP/s "
        f"(rounds: {', '.join(f'{p:.1f}' for p in peaks)})"
    )
    missed = [w.width for w in widths if not print_width(args, w, peak_gflops)]
    print(f"\nmeasured in {time.perf_counter() - start:.0f} s; load average at the end {load()}")
    rule = [f"{k} -> {v.split(' (')[0]}" for k, v in (FORWARD_OPS | BACKWARD_NODES).items()]
    print(
        "categories: the forward scope's ops and the backward scope's autograd nodes by name, each with its "
        f"whole subtree: {', '.join(rule)}; the rest of those two scopes -> other"
    )
    if missed:
        print("60% of the peak missed at width " + ", ".join(str(w) for w in missed))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    compiling = any(k in COMPILED for k in args.variant_keys)
    if compiling:
        import torch._inductor.config as inductor

        inductor.fallback_random = True  # dropout draws from eager's generator: the same masks as eager
    with tempfile.TemporaryDirectory(prefix="profile_step_inductor_") as cache:
        if compiling and not args.warm_cache:  # a cold compile, as a training run's first start has
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
