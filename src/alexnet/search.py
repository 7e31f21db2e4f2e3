"""Optuna inside a training job: the job is one trial of a study run by ``hparams_search=<name>``.

The sweeper (``src/hydra_plugins/alexnet_optuna_sweeper``) asks Optuna for a trial and launches a job with
the trial's parameters plus ``optuna.study`` and ``optuna.trial``. In that job, ``trial_callbacks``
- finds the trial in the study's storage (``hydra.sweeper.storage`` of the job's own Hydra config), tags the
  MLflow run with the study and trial, and stores the run id in the trial (user attribute ``mlflow_run_id``);
- returns a callback that reports ``hydra.sweeper.report`` (default ``val/top1_err``) after every epoch's
  validation and raises ``optuna.TrialPruned`` when the study's pruner says so; the task then ends the run
  KILLED with the tag ``optuna.state=PRUNED`` (``mark_pruned``), and the sweeper tells Optuna PRUNED;
- a reported value that is not a finite number stops the job with ``Diverged`` (a diverged loss is caught
  earlier, by the module); either way the trial is FAIL.

Outside a sweep (``optuna`` is null in conf/train.yaml) none of this runs.
"""

from __future__ import annotations

import math

import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import MLFlowLogger
from omegaconf import DictConfig

from alexnet import tracking
from alexnet.errors import ConfigError, Diverged
from hydra_plugins.alexnet_optuna_sweeper.trials import load_trial, redact

# What the pruner raises in a job; train.py ends such a run with ``mark_pruned``, not as a failure.
TrialPruned = optuna.TrialPruned


class ReportToTrial(Callback):
    """After each epoch's validation: report ``metric`` to the trial at step = epochs trained, and raise
    ``optuna.TrialPruned`` if the study's pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str):
        self.trial = trial
        self.metric = metric

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            # Every process would report, and the processes could disagree about pruning.
            raise ConfigError("An Optuna trial trains in one process; use devices=one (or model_parallel).")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch + 1
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        if self.metric not in metrics:
            raise ConfigError(
                f"hydra.sweeper.report={self.metric!r} is not logged by the end of validation; "
                f"these are: {', '.join(sorted(metrics))}."
            )
        value = metrics[self.metric]
        if not math.isfinite(value):
            raise Diverged(
                f"{self.metric} is {value} after epoch {epoch}: the training diverged. Lower optimizer.lr "
                "(or the top of its search interval)."
            )
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} with {self.metric}={value:.4f}")


def check_run_mode(cfg: DictConfig) -> None:
    """Stop ``hparams_search=...`` without ``-m`` before anything is tracked: Hydra would run one plain job
    with the config's values (hours of training, no search)."""
    hydra_cfg = HydraConfig.get()
    if not cfg.get("optuna") and hydra_cfg.mode == RunMode.RUN and "storage" in hydra_cfg.sweeper:
        raise ConfigError(
            "hparams_search=... runs an Optuna study only as a multirun: add -m, e.g. "
            "python src/train.py -m hparams_search=cifar_sgd"
        )


def trial_callbacks(cfg: DictConfig, logger: MLFlowLogger) -> list[Callback]:
    """[the reporting callback] when this job is a trial of an Optuna sweep, else []."""
    sweeper = HydraConfig.get().sweeper
    job = cfg.get("optuna")
    if not job:
        return []
    if "storage" not in sweeper or "report" not in sweeper:
        raise ConfigError(
            "optuna.study and optuna.trial are set for each job by the Optuna sweeper "
            "(python src/train.py -m hparams_search=<name>); do not set them by hand."
        )
    trial = load_trial(sweeper.storage, job.study, job.trial, pruner=instantiate(sweeper.pruner))
    trial.set_user_attr("mlflow_run_id", logger.run_id)
    tracking.tag_run(
        logger,
        {
            "optuna.study": str(job.study),
            "optuna.trial": str(job.trial),
            "optuna.state": "RUNNING",  # the sweeper writes the final state
            "optuna.storage": redact(sweeper.storage),
        },
    )
    return [ReportToTrial(trial, sweeper.report)]


def mark_pruned(logger: MLFlowLogger, error: BaseException) -> None:
    """End the run of a trial the pruner stopped: KILLED (not FAILED: nothing went wrong), tagged PRUNED."""
    tracking.tag_run(logger, {"optuna.state": "PRUNED", "optuna.pruned": str(error)}, status="KILLED")
