"""The sweeper's config, registered in Hydra's ConfigStore.

    hydra/sweeper=alexnet_optuna                    (an ``hparams_search=...`` file selects it)
    hydra/sweeper/sampler=tpe|random                 (default: tpe, seeded)
    hydra/sweeper/pruner=median|successive_halving|hyperband|none    (default: median)

Every field is typed, so a misspelt key or a wrong value stops at composition with the key's name.
The sampler and pruner are plain ``_target_`` configs of Optuna's classes: any argument of those classes can
be added with ``+hydra.sweeper.sampler.<arg>=...``, and any other sampler or pruner can be named with
``hydra.sweeper.pruner._target_=...``.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where dataclasses would look string annotations up.
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Direction(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    # A rerun continues with seed + (trials already in the study), so it never repeats the earlier samples.
    seed: int | None = 0
    n_startup_trials: int = 10  # random trials before TPE models the results
    multivariate: bool | None = None  # None: Optuna's default
    # With parallel trials, treat the running ones as bad so that one batch spreads over the space.
    constant_liar: bool = True


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: int | None = 0


@dataclass
class MedianPrunerConf:
    """Stop a trial whose best value so far is worse than the median of the other trials at that epoch."""

    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # finished trials before any trial is pruned
    n_warmup_steps: int = 2  # steps are epochs trained: nothing is pruned before epoch 2's result
    interval_steps: int = 1
    n_min_trials: int = 1


@dataclass
class SuccessiveHalvingPrunerConf:
    _target_: str = "optuna.pruners.SuccessiveHalvingPruner"
    min_resource: Any = "auto"  # epochs before the first rung; "auto": from the first finished trial
    reduction_factor: int = 4
    min_early_stopping_rate: int = 0
    bootstrap_count: int = 0


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 1
    max_resource: Any = "auto"  # "auto": the epochs of the first trial that finished
    reduction_factor: int = 3
    bootstrap_count: int = 0


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MlflowConf:
    """Where the study's summary run goes: by default the experiment the trials' runs go to."""

    tracking_uri: str | None = "${logger.tracking_uri}"  # null: no summary run
    experiment_name: str = "${logger.experiment_name}"


@dataclass
class AlexNetOptunaSweeperConf:
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "median"}])
    _target_: str = "hydra_plugins.alexnet_optuna_sweeper.optuna_sweeper.AlexNetOptunaSweeper"
    # The sweeper builds the sampler (it derives the seed from the study) and the jobs build the pruner.
    _recursive_: bool = False

    # Running the same command again continues the study of this name in `storage`.
    study_name: str = MISSING
    # Any SQLAlchemy URL: the SQLite file next to mlflow.db, or postgresql://user@host/db for many machines
    # (keep the password out of configs: OPTUNA_STORAGE=postgresql://user:pw@host/db in the environment).
    storage: str = "${oc.env:OPTUNA_STORAGE,sqlite:///${paths.root_dir}/optuna.db}"
    direction: Direction = Direction.minimize
    # The number in the job's result (the summary dict train() returns) that Optuna optimises.
    metric: str = "best/val_top1_err"
    # When the job's `metric` is None (e.g. final/epochs_to_target: the target was never reached), tell
    # Optuna fallback_offset + result[fallback_metric] instead. Null: such a trial is FAIL.
    fallback_metric: str | None = None
    fallback_offset: float = 0.0
    # What every job reports to its trial after each epoch's validation, for the pruner.
    report: str = "val/top1_err"
    # Finished trials (COMPLETE, PRUNED and FAIL) of the study, this run's and earlier runs', count.
    n_trials: int = 20
    # Trials asked for and launched together; they run at once with a parallel launcher
    # (hydra/launcher=joblib, submitit), one after another with the default one.
    n_jobs: int = 1
    # Stop with an error when more than this fraction of the trials this run planned have failed.
    max_failure_rate: float = 0.25
    # Parameter sets to try first, e.g. [{optimizer.lr: 0.01}]; skipped when the study already has them.
    enqueue_trials: list[dict[str, Any]] = field(default_factory=list)
    sampler: Any = MISSING
    pruner: Any = MISSING
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    # The search space, in Hydra's sweep syntax: `optimizer.lr: tag(log, interval(1e-4, 0.1))`,
    # `data.batch_size: choice(64, 128, 256)`, `trainer.max_epochs: range(5, 31, 5)`. A plain value is
    # passed to every trial. The command line adds to it and wins: `optimizer.lr=0.01` fixes lr.
    params: dict[str, Any] = field(default_factory=dict)


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="alexnet_optuna", node=AlexNetOptunaSweeperConf, provider="alexnet")
_store.store(group="hydra/sweeper/sampler", name="tpe", node=TPESamplerConf, provider="alexnet")
_store.store(group="hydra/sweeper/sampler", name="random", node=RandomSamplerConf, provider="alexnet")
_store.store(group="hydra/sweeper/pruner", name="median", node=MedianPrunerConf, provider="alexnet")
_store.store(
    group="hydra/sweeper/pruner",
    name="successive_halving",
    node=SuccessiveHalvingPrunerConf,
    provider="alexnet",
)
_store.store(group="hydra/sweeper/pruner", name="hyperband", node=HyperbandPrunerConf, provider="alexnet")
_store.store(group="hydra/sweeper/pruner", name="none", node=NopPrunerConf, provider="alexnet")
