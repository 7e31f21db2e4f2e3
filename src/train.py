"""Train one AlexNet configuration, tracked in MLflow.

    python src/train.py experiment=smoke                       # 15 seconds on generated data
    python src/train.py model.activation=tanh model.lrn=false  # flip switches
    python src/train.py -m +ablation=lrn experiment=cpu        # a sweep: one MLflow run per job

The config is checked, the job's MLflow run found (to resume or skip) or created, and then: data, network,
LightningModule, callbacks and Trainer from the config; fit; test the best checkpoint. alexnet.task holds
what src/eval.py shares with this file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

# Before the imports that read it: the config's paths.root_dir is the checkout this file lives in.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from alexnet import ddp, task, tracking  # noqa: E402
from alexnet.errors import Diverged  # noqa: E402

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """What ``fit_and_test`` leaves: the per-run numbers, the step they belong to, divergence, and each
    test image's outcome."""

    summary: dict[str, float | None]
    global_step: int
    diverged: str | None = None
    outcomes: dict | None = None
    labels: object = None


def fit_and_test(p: task.Prepared, files: ddp.JobFiles, logger, run_id: str | None = None) -> Fitted:
    """Fit, then test the best checkpoint. Every process of a job runs this, the same way: under DDP each
    Lightning call is collective."""
    parts = task.build(p, logger, files.checkpoint_dir, task.provenance(p, run_id))
    trainer, module, data = parts.trainer, parts.module, parts.datamodule
    trainer.fit(module, datamodule=data, ckpt_path=files.resume_from, weights_only=True)
    if module.diverged:
        return Fitted({}, trainer.global_step, module.diverged)
    summary = module.summary()
    if not p.cfg.test_after_fit:
        return Fitted(summary, trainer.global_step)
    best = (parts.checkpoints.best_model_path or None) if parts.checkpoints else None
    trainer.test(module, datamodule=data, ckpt_path=best, weights_only=True)
    summary.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return Fitted(summary, trainer.global_step, None, module.test_outcomes, data.test_set_labels())


def train(cfg: DictConfig) -> dict[str, float | None]:
    p = task.prepare(cfg)
    if ddp.rank() > 0:
        # Another process of a DDP job, launched by Lightning with this job's overrides: it trains on its
        # share of every batch and evaluates its share of the images. The MLflow run, the per-config lock and
        # all logging are rank 0's; a divergence is reported there too.
        return fit_and_test(p, ddp.handed_over(), logger=None).summary
    run = tracking.open_run(p.cfg, p.job, p.facts.fingerprint)
    if run.finished is not None:
        log.info(
            "This configuration already has a %s run in experiment %s (%s): not training it again. "
            "Pass resume=never to train a new run anyway.",
            "diverged" if run.finished.data.tags.get("diverged") == "true" else "finished",
            p.cfg.logger.experiment_name,
            run.run_id,
        )
        return tracking.summary_of(run.finished)
    resumed = f", resuming from {run.resume_from}" if run.resume_from else ""
    log.info("MLflow run %s in experiment %s%s", run.run_id, p.cfg.logger.experiment_name, resumed)
    files = ddp.JobFiles(run.checkpoint_dir, run.resume_from)
    with task.tracked(run):
        with ddp.ddp_job(p.checked.devices, files):
            fitted = fit_and_test(p, files, run.logger, run.run_id)
        if fitted.diverged:
            raise Diverged(fitted.diverged)
        tracking.log_summary(run.logger, fitted.summary, step=fitted.global_step)
        tracking.log_outcomes(run.logger, fitted.outcomes or {}, fitted.labels)
    log.info("summary: %s", fitted.summary)
    return fitted.summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float | None]:
    return task.entry(train, cfg)


if __name__ == "__main__":
    main()
