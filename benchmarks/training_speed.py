"""Training speed of the 32x32 LRN net: the bare step, the whole Lightning loop, and the old default layout.

For each width (--widths, default 0.25 and 0.5; batch 128, the 32x32 network with LRN, `model=alexnet_cifar`)
it measures, in this one run and interleaved round by round so that noise from other work on the machine
hits every setup alike:

- bare step, new default: SGD steps (momentum 0.9, weight decay 5e-4) on one fixed random batch, the net in
  channels_last (what `devices.channels_last=true`, the default, trains) with the current LRN
  (`alexnet.model._LRNFunction`: channels-last rows, banded matrix product, cache-sized chunks);
- bare step, old default: the same steps in NCHW, with the LRN as it was at commit 03be689 (shifted slice
  additions, d^-beta as exp(-beta log d)), copied below as reference code for this benchmark only;
- whole loop, new default: a real `lightning.Trainer` fit of the network as `alexnet.task.build` assembles it
  from the composed config (`src/train.py`'s path): the in-memory CIFAR-10 loader (real images when found,
  else the synthetic set), section 4.1's augmentation, torchmetrics, the ModelCheckpoint callback writing
  best.ckpt and last.ckpt every epoch, the learning-rate monitor, and the MLflow logger on a temporary SQLite
  store. The first epoch of every fit is a warm-up; the later epochs are timed in full, each from its
  on_train_epoch_start to the next one's (the last to on_train_end): its training batches, its validation
  pass, the epoch-end metrics and MLflow logging and the checkpoint saving are all inside the timed span.
  images/s = training images of the timed epochs / their seconds (validation images are not counted).

Ratios: loop / bare (both the new default; target >= 0.9) and new / old (bare steps; target >= 1.25).

    python benchmarks/training_speed.py                         # both widths, 5 rounds: several minutes
    python benchmarks/training_speed.py --widths 0.25 --rounds 3 --check   # exit 1 if a target is missed
    python benchmarks/training_speed.py --smoke                 # width 0.125, tiny: the test's run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("PROJECT_ROOT", str(ROOT))  # the config's paths.root_dir, as src/train.py sets it

import torch  # noqa: E402
from _timing import interleave, machine, sgd_steps  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from omegaconf import open_dict  # noqa: E402
from torch import nn  # noqa: E402

from alexnet import task, tracking  # noqa: E402
from alexnet.model import AlexNet, LocalResponseNorm  # noqa: E402

BARE_NEW = "bare step, new default (channels_last, current LRN)"
BARE_OLD = "bare step, old default (NCHW, LRN as at 03be689)"
LOOP = "whole Lightning loop, new default"
TARGETS = {"loop / bare": 0.9, "new / old": 1.25}
RATIOS = {"loop / bare": (LOOP, BARE_NEW), "new / old": (BARE_NEW, BARE_OLD)}
RATIO_LABELS = {
    "loop / bare": "loop / bare (whole loop / bare step, new default)",
    "new / old": "new / old (bare step, new / old default)",
}
# The real CIFAR-10 split of the ablations: 45,000 training and 5,000 validation images per epoch.
VAL_PER_TRAIN = 5000 / 45000


# --- The LRN as it was at 03be689 -------------------------------------------------------------------------
# Reference code for this benchmark only: `git show 03be689:src/alexnet/model.py`, the LRN of the previous
# default (NCHW), copied unchanged but for the names, so that "old" is measured as it ran, not re-derived.


class _LRNFunctionAt03be689(torch.autograd.Function):
    """The LRN as it was at 03be689: window sums by shifted slice additions, d^-beta as exp(-beta log d)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
        d = _window_sum_at_03be689(x * x, size, groups).mul_(alpha).add_(k)
        # d^-beta as exp(-beta * log d): same value, about 3x faster than Tensor.pow on the CPU.
        scale = d.log().mul_(-beta).exp_()
        ctx.save_for_backward(x, d, scale)
        ctx.hyper = (size, alpha, beta, groups)
        return x * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, d, scale = ctx.saved_tensors
        size, alpha, beta, groups = ctx.hyper
        t = (grad * x).mul_(scale).div_(d)  # g_j * y_j / d_j, with y = x * scale
        grad_x = _window_sum_at_03be689(t, size, groups).mul_(x).mul_(-2.0 * alpha * beta)
        grad_x.addcmul_(grad, scale)
        return grad_x, None, None, None, None, None


def _window_sum_at_03be689(x: torch.Tensor, size: int, groups: int) -> torch.Tensor:
    """Sum over the ``size`` channels centred on each channel, clipped at the edges of each group."""
    n, c, h, w = x.shape
    xg = x.reshape(n, groups, c // groups, h, w)
    out = xg.clone()
    for shift in range(1, size // 2 + 1):
        out[:, :, shift:] += xg[:, :, :-shift]
        out[:, :, :-shift] += xg[:, :, shift:]
    return out.view(n, c, h, w)


class LRNAt03be689(nn.Module):
    """The LocalResponseNorm module as it was at 03be689 (same hyperparameters as the one it replaces)."""

    def __init__(self, current: LocalResponseNorm):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = current.size, current.alpha, current.beta, current.k
        self.groups = current.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = _LRNFunctionAt03be689.apply(a, self.size, self.alpha, self.beta, self.k, self.groups)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, groups={self.groups}"


# --- The bare step ----------------------------------------------------------------------------------------


def lrn_net(width: float) -> AlexNet:
    return AlexNet(num_classes=10, input_size=32, width=width, lrn=True, seed=0)


def new_default(width: float) -> nn.Module:
    return lrn_net(width).to(memory_format=torch.channels_last)


def old_default(width: float) -> nn.Module:
    net = lrn_net(width)
    for name in ("lrn1", "lrn2"):
        setattr(net.features, name, LRNAt03be689(getattr(net.features, name)))
    return net


# --- The whole Lightning loop -----------------------------------------------------------------------------


@dataclass
class EpochClock(Callback):
    """Wall time of every training epoch, from its on_train_epoch_start to the next epoch's (the last one's
    to on_train_end): after the module's and the checkpoint callback's epoch-end work. Also, per epoch, the
    training images, when its last batch ended and the seconds of its validation pass."""

    starts: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)
    last_batch_end: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    end: float | None = None
    _val_start: float = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())
        self.images.append(0)
        self.last_batch_end.append(self.starts[-1])
        self.validation.append(0.0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.images[-1] += len(batch[1])
        self.last_batch_end[-1] = time.perf_counter()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.starts and not trainer.sanity_checking:
            self.validation[-1] += time.perf_counter() - self._val_start

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = time.perf_counter()

    def spans(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, [*self.starts[1:], self.end], strict=True)]


@dataclass
class LoopResult:
    images: int
    seconds: float
    batches_seconds: float  # first batch start to last batch end (loader, augmentation, steps, metrics)
    validation_seconds: float
    rest_seconds: float  # epoch end: metrics, MLflow logging, best.ckpt and last.ckpt, loop bookkeeping
    checkpoint_bytes: int


def find_cifar10(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("ALEXNET_DATA_DIR", ROOT.parent / "shared" / "data")) / "cifar10"
    found = (base / "train").is_dir() or (base / "cifar-10-batches-py").is_dir()
    return base if found else None


class Loop:
    """Fits of the new default as src/train.py runs them (alexnet.task.build), into one temporary store."""

    def __init__(self, args: argparse.Namespace, width: float, store: Path, cifar10: Path | None):
        self.args, self.width, self.store, self.cifar10 = args, width, store, cifar10
        self.results: list[LoopResult] = []
        self.fits = 0

    def overrides(self) -> list[str]:
        a, batch = self.args, self.args.batch
        train = a.loop_batches * batch
        if self.cifar10 is not None:
            data = [f"data.root={self.cifar10}", f"data.train_size={train}"]
        else:
            data = ["data=synthetic", f"data.synthetic_size={train}"]
        return [
            *data,
            f"data.test_size={batch}",
            f"data.val_size={a.loop_val_batches * batch}",
            f"data.batch_size={batch}",
            f"paths.cache_dir={self.store / 'cache'}",
            f"model.width={self.width}",
            "model.lrn=true",
            "trainer.accelerator=cpu",
            f"trainer.max_epochs={1 + a.loop_epochs}",
            f"+trainer.limit_train_batches={a.loop_batches}",
            f"+trainer.limit_val_batches={a.loop_val_batches}",
            "trainer.enable_progress_bar=false",  # as experiment=cpu and experiment=cifar10 train
            "trainer.enable_model_summary=false",
            f"logger.tracking_uri=sqlite:///{self.store / 'mlflow.db'}",
            f"logger.artifact_location={self.store / 'mlartifacts'}",
            "logger.experiment_name=training_speed",
            f"paths.checkpoint_dir={self.store / 'checkpoints'}",
            "resume=never",  # every fit a new run
            "seed=0",
        ]

    def __call__(self) -> float:
        self.fits += 1
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=self.overrides(), return_hydra_config=True)
        # What `python src/train.py` has before its task runs: Hydra's own config set aside, a job folder.
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.RUN
            cfg.hydra.runtime.output_dir = str(self.store / f"run{self.fits}")
            HydraConfig.instance().set_config(cfg)
            del cfg["hydra"]
        prepared = task.prepare(cfg)
        run = tracking.open_run(prepared.cfg, prepared.job, prepared.facts.fingerprint)
        parts = task.build(prepared, run.logger, run.checkpoint_dir, task.provenance(prepared, run.run_id))
        layout = next(m for m in parts.module.net.modules() if isinstance(m, nn.Conv2d)).weight
        assert layout.is_contiguous(memory_format=torch.channels_last), "the default is channels_last"
        clock = EpochClock()
        parts.trainer.callbacks.append(clock)  # its spans end where the next epoch (or the fit) begins
        with task.tracked(run):
            parts.trainer.fit(parts.module, datamodule=parts.datamodule)
        last = Path(run.checkpoint_dir) / "last.ckpt"
        assert last.is_file(), f"no {last}: the checkpoint callback did not run"
        timed = slice(1, None)  # the first epoch warms up
        spans, images = clock.spans()[timed], clock.images[timed]
        assert len(spans) == self.args.loop_epochs and all(images), (clock.spans(), clock.images)
        batches = sum(e - s for s, e in zip(clock.starts[timed], clock.last_batch_end[timed], strict=True))
        validation = sum(clock.validation[timed])
        rest = sum(spans) - batches - validation
        result = LoopResult(sum(images), sum(spans), batches, validation, rest, last.stat().st_size)
        self.results.append(result)
        return result.images / result.seconds


# --- The run ----------------------------------------------------------------------------------------------


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "alexnet", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--widths", default="0.25,0.5", help="comma-separated model.width values")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--steps", type=int, default=None,
        help="timed bare steps per round, after 2 warm-up (default: the loop's timed batches per round, so "
        "that both time equally long stretches of the machine's load)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loop-batches", type=int, default=40, help="training batches per epoch of the loop")
    parser.add_argument(
        "--loop-val-batches", type=int, default=None,
        help="validation batches per epoch (default: the real 5,000/45,000 share of the training batches)",
    )  # fmt: skip
    parser.add_argument("--loop-epochs", type=int, default=2, help="timed epochs per fit, after one warm-up")
    parser.add_argument("--data-root", help="CIFAR-10's folder (default: ALEXNET_DATA_DIR/cifar10)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads (torch's)")
    parser.add_argument("--check", action="store_true", help="exit 1 if a ratio misses its target")
    parser.add_argument(
        "--smoke", action="store_true", help="width 0.125, 2 steps, 1 round, a 2-batch loop: seconds"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.widths, args.steps, args.rounds = "0.125", 2, 1
        args.loop_batches, args.loop_val_batches, args.loop_epochs = 2, 1, 1
    if args.steps is None:
        args.steps = args.loop_batches * args.loop_epochs
    if args.loop_val_batches is None:
        args.loop_val_batches = max(1, round(args.loop_batches * VAL_PER_TRAIN))
    args.width_list = [float(w) for w in args.widths.split(",")]
    return args


def key(width: float, label: str) -> str:
    return f"width {width}: {label}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    cifar10 = find_cifar10(args.data_root)
    measures = {}
    loops: dict[float, Loop] = {}
    with tempfile.TemporaryDirectory(prefix="training_speed_") as tmp:
        for width in args.width_list:
            x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
            x_last = x.contiguous(memory_format=torch.channels_last)
            measures[key(width, BARE_NEW)] = sgd_steps(new_default(width), x_last, y, steps=args.steps)
            measures[key(width, BARE_OLD)] = sgd_steps(old_default(width), x, y, steps=args.steps)
            loops[width] = Loop(args, width, Path(tmp) / f"width{width}", cifar10)
            measures[key(width, LOOP)] = loops[width]
        start = time.perf_counter()
        values = interleave(
            measures, args.rounds, progress=lambda what: print(f"  {what}", file=sys.stderr, flush=True)
        )
        seconds = time.perf_counter() - start

    data = f"CIFAR-10 from {cifar10}" if cifar10 is not None else "the synthetic data set (no CIFAR-10 found)"
    print(f"training speed of the 32x32 LRN net, batch {args.batch}: medians of {args.rounds} rounds")
    print(machine())
    print("command: python benchmarks/training_speed.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(
        f"bare step: {args.steps} timed SGD steps per round (after 2 warm-up), one fixed random batch; "
        f"loop: per round one fit of 1 warm-up + {args.loop_epochs} timed epochs of {args.loop_batches} "
        f"training and {args.loop_val_batches} validation batches, {data}, section 4.1 augmentation, "
        "torchmetrics, MLflow (SQLite), best.ckpt + last.ckpt every epoch; checkpoint saving, validation and "
        "epoch-end logging inside the timed span, training images only counted"
    )
    missed = []
    for width in args.width_list:
        speeds = {label: statistics.median(values[key(width, label)]) for label in (BARE_NEW, BARE_OLD, LOOP)}
        print()
        print(f"width {width}")
        print(f"  {'setup':<52} {'images/s':>10}")
        for label, speed in speeds.items():
            print(f"  {label:<52} {speed:10.1f}")
        print(f"  {'ratio':<52} {'value':>10}   target")
        for name, (top, bottom) in RATIOS.items():
            ratio = speeds[top] / speeds[bottom]
            verdict = "met" if ratio >= TARGETS[name] else "MISSED"
            if verdict == "MISSED":
                missed.append(f"width {width}: {name} = {ratio:.2f}x < {TARGETS[name]}")
            print(f"  {RATIO_LABELS[name]:<52} {ratio:9.2f}x   >= {TARGETS[name]} {verdict}")
        results = loops[width].results
        spent = sum(r.seconds for r in results)
        print(
            f"  loop's timed epochs: {100 * sum(r.batches_seconds for r in results) / spent:.0f}% training "
            f"batches, {100 * sum(r.validation_seconds for r in results) / spent:.0f}% validation, "
            f"{100 * sum(r.rest_seconds for r in results) / spent:.0f}% epoch end (metrics, MLflow, "
            f"checkpoints of {results[-1].checkpoint_bytes / 1e6:.1f} MB each); per round: "
            + ", ".join(f"{v:.1f}" for v in values[key(width, LOOP)])
            + " images/s"
        )
    print(f"\nmeasured in {seconds:.0f} s")
    if missed:
        print("targets missed: " + "; ".join(missed))
    return 1 if missed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
