"""The training recipe of section 5 as a LightningModule, and the measurements the ablations compare.

Logged every epoch: ``train/loss``, ``train/top1_err``, ``train/top5_err`` (over the epoch's batches, with
dropout on, as the paper's Figure 1 plots them), the same for ``val/``, ``val/top1_err_best``,
``train/images_per_sec`` and, once the target is reached, ``train/epochs_to_target``. Testing logs
``test/top{1,5}_err_1crop`` (centre crop) and ``test/top{1,5}_err_10crop`` (section 4.1's ten views), and
keeps each test image's outcome (``test_outcomes``: right or wrong, top-1 and top-5, centre crop and ten
views), from which the report compares arms image by image. After fit ``summary()`` holds the per-run
numbers (best validation errors, final training error and the time to the target training error, or None
for "never").
"""

from __future__ import annotations

import functools
import math
import random
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection, MinMetric
from torchmetrics.classification import MulticlassAccuracy

from alexnet.config import OptimizerConfig, Schedule


def linear_anneal(step: int, warmup: int, total: int) -> float:
    """The rate's multiplier at ``step`` (schedule=linear): up linearly over ``warmup`` steps, then down
    linearly to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def _error_metrics(num_classes: int) -> MetricCollection:
    return MetricCollection(
        {
            "top1_acc": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            "top5_acc": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"),
        }
    )


class AlexNetModule(L.LightningModule):
    """Args:
    net: the network.
    optimizer: section 5's recipe (alexnet.config.OptimizerConfig; its defaults are the paper's).
    target_train_error: the training top-1 error whose first crossing is timed (Figure 1: 25%).
    stop_at_target: end training at the epoch that reaches it (Figure 1 measures nothing after it).
    provenance: plain values saved in every checkpoint (the run id and its resolved config), so that
        ``src/eval.py`` can rebuild the network and find the run a checkpoint belongs to.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerConfig | None = None,
        target_train_error: float = 0.25,
        stop_at_target: bool = False,
        provenance: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.net = net
        self.recipe = optimizer or OptimizerConfig()
        self.target_train_error, self.stop_at_target = target_train_error, stop_at_target
        self.provenance = provenance or {}
        self.top5 = min(5, num_classes)
        self.criterion = nn.CrossEntropyLoss()
        self.train_metrics = _error_metrics(num_classes)
        self.train_loss = MeanMetric()
        self.val_metrics = _error_metrics(num_classes)
        self.test_metrics = _error_metrics(num_classes)  # the centre crop
        self.test_metrics_10crop = _error_metrics(num_classes)
        self.best_val_top1 = MinMetric()
        self.best_val_top5 = MinMetric()
        # Time-to-target bookkeeping: the training error curve so far and the training seconds behind it.
        self.train_curve: list[tuple[float, float, float]] = [(0.0, 1.0 - 1.0 / num_classes, 0.0)]
        self.epochs_to_target: float | None = None
        self.seconds_to_target: float | None = None
        self.diverged: str | None = None  # what went non-finite, and when
        self._outcomes: dict[str, list[torch.Tensor]] = {}
        self.test_outcomes: dict[str, np.ndarray] = {}  # per test image, in the test set's order
        self._train_seconds = 0.0
        self._epoch_start = 0.0
        self._last_batch_end = 0.0
        self._epoch_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, metrics: MetricCollection, stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        metrics.update(logits.detach(), labels)
        if stage == "train":
            self.train_loss.update(loss.detach(), weight=len(labels))
            # The progress bar's running numbers (the logged curves are whole epochs: on_train_epoch_end).
            err = (logits.detach().argmax(dim=1) != labels).float().mean()
            self.log_dict(
                {"loss": loss.detach(), "err": err}, prog_bar=True, logger=False, on_step=True, on_epoch=False
            )
        else:
            # sync_dist: under DDP the mean over every process's images (weighted by their batch sizes).
            self.log(
                f"{stage}/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True
            )
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_start = self._last_batch_end = time.perf_counter()
        self._epoch_images = 0

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, self.train_metrics, "train")
        # Diverged: a NaN/inf step would poison every weight. The step's gradients are dropped (see
        # on_after_backward) and training stops; train() marks the run. Under DDP the processes decide
        # together (any one's non-finite loss stops them all) and still run this step's backward: its
        # gradient all-reduce needs every process (which is also why Lightning refuses a step skipped by
        # returning None under DDP).
        finite = bool(torch.isfinite(loss))
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            value = loss.item() if not finite else "non-finite in another DDP process"
            self.diverged = (
                f"training loss became {value} at epoch {self.current_epoch}, step {self.global_step}"
            )
            self.trainer.should_stop = True
        return loss

    def on_after_backward(self) -> None:
        if self.diverged:  # no gradient, no update: SGD leaves every weight (and its momentum) as it was
            for param in self.parameters():
                param.grad = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.recipe.schedule is Schedule.linear:
            self.lr_schedulers().step()
        self._last_batch_end = time.perf_counter()
        self._epoch_images += len(batch[1])

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        """Section 4.1: the centre crop alone, and the softmax averaged over ten views (centre first)."""
        images, labels = batch
        views = images if images.dim() == 5 else images.unsqueeze(1)
        centre = self(views[:, 0])
        loss = self.criterion(centre, labels)
        self.log("test/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels), sync_dist=True)
        self.test_metrics.update(centre, labels)
        self._keep_outcomes("1crop", centre, labels)
        if views.shape[1] > 1:
            probs = centre.softmax(dim=1)
            for v in range(1, views.shape[1]):  # one view at a time: ten 227 views of 128 images are 0.8 GB
                probs += self(views[:, v]).softmax(dim=1)
            self.test_metrics_10crop.update(probs / views.shape[1], labels)
            self._keep_outcomes("10crop", probs, labels)

    def _keep_outcomes(self, views: str, scores: torch.Tensor, labels: torch.Tensor) -> None:
        hits = scores.topk(self.top5, dim=1).indices == labels.view(-1, 1)
        self._outcomes.setdefault(f"top1_{views}", []).append(hits[:, 0].cpu())
        self._outcomes.setdefault(f"top5_{views}", []).append(hits.any(dim=1).cpu())

    def _gather_outcomes(self) -> dict[str, np.ndarray]:
        """Every process's outcomes, in the test set's order: under DDP, process r evaluated the images
        r, r + W, r + 2W, ... (Lightning's unrepeated sampler), so the shares interleave."""
        mine = {k: torch.cat(v).numpy() for k, v in self._outcomes.items()}
        self._outcomes = {}
        world = self.trainer.world_size
        if world == 1:
            return mine
        shares: list[dict[str, np.ndarray]] = [{} for _ in range(world)]
        torch.distributed.all_gather_object(shares, mine)
        total = sum(len(next(iter(s.values()))) for s in shares)
        merged = {k: np.zeros(total, dtype=bool) for k in mine}
        for rank, share in enumerate(shares):
            for k, values in share.items():
                merged[k][rank::world] = values
        return merged

    def _errors(self, metrics: MetricCollection, stage: str, suffix: str = "") -> dict[str, float]:
        accuracy = metrics.compute()
        metrics.reset()
        return {
            f"{stage}/top1_err{suffix}": 1.0 - float(accuracy["top1_acc"]),
            f"{stage}/top5_err{suffix}": 1.0 - float(accuracy["top5_acc"]),
        }

    def _log_errors(self, metrics: MetricCollection, stage: str, suffix: str = "") -> dict[str, float]:
        errors = self._errors(metrics, stage, suffix)
        self.log_dict(errors)
        return errors

    def _log_now(self, metrics: dict[str, float]) -> None:
        """Straight to the logger, not through ``self.log``: Lightning sends training-epoch metrics only after
        the epoch-end checkpoint, so a job killed in between would resume without them, a hole in the curve.
        (Also into ``callback_metrics``, where callbacks and the progress bar look for them.)
        Under DDP only rank 0 logs: the values are already those of all processes."""
        if self.logger is not None and self.trainer.is_global_zero:
            self.logger.log_metrics(metrics, step=max(self.global_step - 1, 0))
        self.trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.val_metrics.reset()
            return
        errors = self._log_errors(self.val_metrics, "val")
        # Section 5's schedule steps here, right after validation, not where Lightning would (after the
        # epoch-end checkpoint): so last.ckpt holds the stepped schedule and a resumed run keeps every drop.
        schedule = self.lr_schedulers()
        if self.recipe.schedule is Schedule.plateau:
            schedule.step(errors["val/top1_err"])
        elif self.recipe.schedule is Schedule.milestones:
            schedule.step()
        self.best_val_top1.update(errors["val/top1_err"])
        self.best_val_top5.update(errors["val/top5_err"])
        self.log("val/top1_err_best", self.best_val_top1.compute())
        self.log("val/top5_err_best", self.best_val_top5.compute())

    def on_train_epoch_end(self) -> None:
        seconds = self._last_batch_end - self._epoch_start  # the training batches, not validation
        self._train_seconds += seconds
        metrics = self._errors(self.train_metrics, "train")
        metrics["train/loss"] = float(self.train_loss.compute())
        self.train_loss.reset()
        # Under DDP: the images of all processes in this process's time (they step together).
        images = self.trainer.strategy.reduce(
            torch.tensor(float(self._epoch_images), device=self.device), reduce_op="sum"
        )
        metrics["train/images_per_sec"] = float(images) / max(seconds, 1e-9)
        self.train_curve.append(
            (float(self.current_epoch + 1), metrics["train/top1_err"], self._train_seconds)
        )
        if self.epochs_to_target is None and self._check_target():
            metrics["train/epochs_to_target"] = self.epochs_to_target
            metrics["train/seconds_to_target"] = self.seconds_to_target
            if self.stop_at_target:
                self.trainer.should_stop = True
        self._log_now(metrics)

    def _check_target(self) -> bool:
        """Whether the training error reached the target in the last epoch; if so, when: linear interpolation
        between the last two points of the (epoch, training error) curve, which starts at chance error at
        epoch 0. Fractional epochs, as Figure 1's x axis."""
        target = self.target_train_error
        (e0, err0, s0), (e1, err1, s1) = self.train_curve[-2:]
        if err1 > target:
            return False
        # err0 <= target: already there at the previous point (a target at or above chance error)
        frac = 0.0 if err0 <= target else (err0 - target) / (err0 - err1)
        self.epochs_to_target = e0 + frac * (e1 - e0)
        self.seconds_to_target = s0 + frac * (s1 - s0)
        return True

    def on_test_epoch_end(self) -> None:
        ten_crop = self.test_metrics_10crop["top1_acc"].update_called
        self._log_errors(self.test_metrics, "test", "_1crop")
        if ten_crop:
            self._log_errors(self.test_metrics_10crop, "test", "_10crop")
        self.test_outcomes = self._gather_outcomes()

    def summary(self) -> dict[str, float | None]:
        """Per-run numbers after fit: the ones an ablation report compares."""
        best1, best5 = self._best(self.best_val_top1), self._best(self.best_val_top5)
        final = self.train_curve[-1][1] if len(self.train_curve) > 1 else math.nan
        return {
            "best/val_top1_err": math.nan if best1 is None else best1,
            "best/val_top5_err": math.nan if best5 is None else best5,
            "final/train_top1_err": final,
            "final/epochs_to_target": self.epochs_to_target,
            "final/seconds_to_target": self.seconds_to_target,
        }

    # Resume: a checkpoint carries what the metrics depend on beyond the weights and the optimizer, so a
    # resumed run ends with the same numbers as an uninterrupted one (the RNG states drive the data order,
    # the augmentation and dropout). Plain types only: checkpoints are loaded with weights_only=True.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        np_state = np.random.get_state()
        checkpoint["alexnet"] = {
            "train_curve": [list(point) for point in self.train_curve],
            "epochs_to_target": self.epochs_to_target,
            "seconds_to_target": self.seconds_to_target,
            "train_seconds": self._train_seconds,
            "best_val": [self._best(self.best_val_top1), self._best(self.best_val_top5)],
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "rng_python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            **self.provenance,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("alexnet")
        if state is None:
            return
        self.train_curve = [tuple(point) for point in state["train_curve"]]
        self.epochs_to_target = state["epochs_to_target"]
        self.seconds_to_target = state["seconds_to_target"]
        self._train_seconds = state["train_seconds"]
        for metric, value in zip((self.best_val_top1, self.best_val_top5), state["best_val"], strict=True):
            if value is not None:
                metric.update(value)
        torch.set_rng_state(state["rng_torch"])
        kind, keys, *rest = state["rng_numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        version, internal, gauss_next = state["rng_python"]
        random.setstate((version, tuple(internal), gauss_next))

    @staticmethod
    def _best(metric: MinMetric) -> float | None:
        return metric.compute().item() if metric.update_called else None

    def configure_optimizers(self):
        r = self.recipe
        optimizer = torch.optim.SGD(
            self.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay
        )
        if r.schedule is Schedule.plateau:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="min", factor=r.drop_factor, patience=r.plateau_patience, min_lr=r.min_lr
            )
        elif r.schedule is Schedule.milestones:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, list(r.milestones), gamma=r.drop_factor
            )
        else:
            total = int(self.trainer.estimated_stepping_batches)
            warmup = round(r.warmup_epochs * total / max(self.trainer.max_epochs, 1))
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, functools.partial(linear_anneal, warmup=warmup, total=total)
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": "val/top1_err", "interval": "epoch"},
        }

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """Lightning's own step is skipped: ``on_validation_epoch_end`` steps an epoch's schedule and
        ``on_train_batch_end`` a batch's (schedule=linear)."""
