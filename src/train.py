"""Train one AlexNet configuration, tracked in MLflow.

    python src/train.py                                        # the default run (conf/train.yaml)
    python src/train.py model.activation=tanh model.lrn=false  # flip switches
    python src/train.py -m model.activation=relu,tanh seed=1,2 # a sweep: one MLflow run per job

Everything is built from the composed config: data, network, LightningModule, trainer, MLflow logger.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before the imports that read it: the config's paths.root_dir is the checkout this file lives in.
os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import lightning as L  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from alexnet import devices, search, tracking  # noqa: E402
from alexnet.config import CheckedConfig, ConfigError, check_config, plain  # noqa: E402
from alexnet.data import AlexNetDataModule  # noqa: E402
from alexnet.model import build_network  # noqa: E402
from alexnet.module import AlexNetModule  # noqa: E402

log = logging.getLogger(__name__)


def job_info() -> dict[str, Any]:
    """What Hydra knows about this job: its number in a sweep, its overrides and its folders."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "num": hc.job.num if multirun else 0,
        "overrides": list(hc.overrides.task),
        "output_dir": hc.runtime.output_dir,
        "sweep_dir": hc.sweep.dir if multirun else None,
    }


class Diverged(RuntimeError):
    """The training loss became NaN or infinite. The run ends FAILED with the tag ``diverged=true``."""


@dataclass
class Outcome:
    """What ``fit_and_test`` leaves: the per-run numbers, the step they belong to, and divergence."""

    summary: dict[str, float | None]
    global_step: int
    diverged: str | None


def fit_and_test(
    cfg: DictConfig, checked: CheckedConfig, job: dict[str, Any], files: devices.JobFiles, logger: Any
) -> Outcome:
    """Build data, network, module and trainer from the config; fit, then test the best checkpoint.

    Every process of a job runs this, the same way: under DDP each Lightning call is collective. ``logger``
    is the job's MLflow logger in rank 0 and None in the other processes, which log nothing.
    """
    L.seed_everything(cfg.seed, workers=True)
    placement = devices.placement(checked.devices, accelerator=str(cfg.trainer.accelerator))
    datamodule = AlexNetDataModule(checked.data)
    module = AlexNetModule(
        placement.network(build_network(**plain(checked.model))),
        num_classes=checked.model.num_classes,
        target_train_error=cfg.target_train_error,
        stop_at_target=cfg.stop_at_target,
        **plain(checked.optimizer),
    )
    # Saved at the end of every training epoch, after the module's own epoch-end bookkeeping (Lightning
    # runs checkpoint callbacks last), so last.ckpt always holds a whole epoch.
    checkpoints = ModelCheckpoint(
        dirpath=files.checkpoint_dir,
        filename="best",
        monitor="val/top1_err",
        mode="min",
        save_last=True,
        save_on_train_epoch_end=True,
    )
    callbacks: list[L.Callback] = [checkpoints]
    if logger is not None:  # the callbacks that log: rank 0's
        callbacks += [
            LearningRateMonitor(logging_interval="epoch"),
            *search.trial_callbacks(cfg, logger),  # reports to the Optuna trial when the job is one
        ]
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        logger=logger or False,
        callbacks=callbacks,
        default_root_dir=job["output_dir"],
        **placement.trainer_args,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=files.resume_from, weights_only=True)
    if module.diverged:
        return Outcome({}, trainer.global_step, module.diverged)
    summary = module.summary()
    if cfg.test_after_fit:
        best = checkpoints.best_model_path or None
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True)
        summary.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return Outcome(summary, trainer.global_step, None)


def train(cfg: DictConfig) -> dict[str, float | None]:
    checked = check_config(cfg)  # every switch, before any data is read or weight allocated
    job = job_info()
    search.check_run_mode(cfg)
    devices.check_launcher(checked.devices)
    if devices.rank() > 0:
        # Another process of a DDP job, launched by Lightning with this job's overrides: it trains on its
        # share of every batch and evaluates its share of the images. The MLflow run, the per-config lock and
        # all logging are rank 0's; a divergence is reported there too.
        return fit_and_test(cfg, checked, job, devices.handed_over(), logger=None).summary
    run = tracking.open_run(cfg, job)
    if run.finished is not None:
        log.info(
            "This configuration already has a %s run in experiment %s (%s): not training it again. "
            "Pass resume=never to train a new run anyway.",
            "diverged" if run.finished.data.tags.get("diverged") == "true" else "finished",
            cfg.logger.experiment_name,
            run.run_id,
        )
        return tracking.summary_of(run.finished)
    logger = run.logger
    resumed = f", resuming from {run.resume_from}" if run.resume_from else ""
    log.info("MLflow run %s in experiment %s%s", run.run_id, cfg.logger.experiment_name, resumed)
    files = devices.JobFiles(run.checkpoint_dir, run.resume_from)
    try:
        with devices.ddp_job(checked.devices, files):
            outcome = fit_and_test(cfg, checked, job, files, logger)
        if outcome.diverged:
            raise Diverged(outcome.diverged)
        summary = outcome.summary
        tracking.log_summary(logger, summary, step=outcome.global_step)
        tracking.finish(logger)
    except search.TrialPruned as err:  # the study's pruner stopped this trial: not a failure
        search.mark_pruned(logger, err)
        raise
    except Diverged as err:
        logger.experiment.set_tag(run.run_id, "diverged", "true")
        tracking.mark_failed(logger, err)
        raise
    except (KeyboardInterrupt, SystemExit) as err:
        tracking.mark_failed(logger, err, status="KILLED")
        raise
    except BaseException as err:
        tracking.mark_failed(logger, err)
        raise
    finally:
        run.lock.release()  # when the job ends, not the process: a sweep runs its jobs in one process
    log.info("summary: %s", summary)
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float | None]:
    try:
        return train(cfg)
    except ConfigError as err:
        # A wrong switch is the user's to fix, not a crash: one line, no traceback, and the sweep stops here.
        raise SystemExit(f"Config error: {err}") from None


if __name__ == "__main__":
    main()
