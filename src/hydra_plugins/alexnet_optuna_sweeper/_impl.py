"""The Optuna study behind ``AlexNetOptunaSweeper``: ask -> launch -> tell, batch by batch, until the study
has ``n_trials`` finished trials. Optuna samples, prunes and keeps the state; this module translates.

The search space comes from Hydra's sweep syntax (``_space.py``). A job's outcome becomes the trial's state:
- it returned its summary with a finite ``metric``             -> COMPLETE, with that value
- it raised ``optuna.TrialPruned`` (its pruner stopped it)     -> PRUNED
- it raised anything else, or its metric is missing or not a
  finite number (the training diverged)                         -> FAIL, the reason kept in the trial's user
                                                                   attribute ``error``
The study goes on after a FAIL, until more than ``max_failure_rate`` of the trials this run planned fail.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState

from alexnet.redaction import mask_secrets, quiet_run_links

from ._space import SearchParam, SearchSpaceError, params_to_entries, parse_search_space
from .trials import job_overrides, open_storage, redact

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class TooManyFailuresError(RuntimeError):
    """More trials failed than ``max_failure_rate`` allows."""


@dataclass(frozen=True)
class Outcome:
    state: TrialState
    value: float | None = None
    reason: str | None = None  # why it failed, or when the pruner stopped it
    exception: BaseException | None = None
    value_from: str | None = None  # how the value was made, when it is not the job's metric itself


class OptunaSweeperImpl(Sweeper):
    def __init__(
        self,
        *,
        study_name: str,
        storage: str,
        direction: Any,
        metric: str,
        fallback_metric: str | None,
        fallback_offset: float,
        report: str,  # read by the jobs (alexnet/search.py), from their own hydra.sweeper
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        enqueue_trials: Sequence[Mapping[str, Any]],
        sampler: DictConfig,
        pruner: DictConfig,
        mlflow: DictConfig,
        params: Mapping[str, Any],
    ) -> None:
        self.study_name = study_name
        self.storage = storage
        self.direction = str(getattr(direction, "value", direction))
        self.metric = metric
        self.fallback_metric = fallback_metric
        self.fallback_offset = fallback_offset
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.max_failure_rate = max_failure_rate
        self.enqueue_trials = [dict(OmegaConf.to_container(t, resolve=True)) for t in enqueue_trials or []]
        self.sampler_cfg = sampler
        self.pruner_cfg = pruner
        self.mlflow_cfg = mlflow
        self.params = OmegaConf.to_container(params, resolve=True) if params is not None else {}
        self.job_idx = 0
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None
        problems = []
        if n_trials < 0:
            problems.append(f"hydra.sweeper.n_trials={n_trials}: use 0 or more")
        if n_jobs < 1:
            problems.append(f"hydra.sweeper.n_jobs={n_jobs}: use 1 or more")
        if not 0.0 <= max_failure_rate <= 1.0:
            problems.append(f"hydra.sweeper.max_failure_rate={max_failure_rate}: use a fraction in [0, 1]")
        if metric.startswith("test/"):
            problems.append(
                f"hydra.sweeper.metric={metric}: choosing hyper-parameters on the test split leaks it into "
                "the result; optimise a validation number, e.g. best/val_top1_err"
            )
        if problems:
            raise ValueError("; ".join(problems) + ".")

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.hydra_context is not None and self.launcher is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        integers = lambda key: type(OmegaConf.select(self.config, key, default=None)) is int  # noqa: E731
        space, fixed = parse_search_space(params_to_entries(self.params) + list(arguments), parser, integers)
        if not space:
            raise SearchSpaceError(
                "Nothing to search: hydra.sweeper.params and the command line have no choice(), range() "
                "or interval(). Pick a search with hparams_search=<name> (conf/hparams_search/)."
            )
        distributions = {p.name: p.distribution for p in space}
        study = self._open_study()

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        finished_before = len(study.get_trials(deepcopy=False, states=FINISHED))
        planned = max(self.n_trials - finished_before, 0)
        log.info(
            "Study %s in %s: %d finished trials, %d to run for n_trials=%d; %s %s (sampler %s, pruner %s). "
            "Watch it with: optuna-dashboard %s",
            study.study_name,
            redact(self.storage),
            finished_before,
            planned,
            self.n_trials,
            self.direction,
            self.metric,
            type(study.sampler).__name__,
            type(study.pruner).__name__,
            redact(self.storage),
        )
        for p in space:
            log.info("  %s: %s", p.name, p.distribution)
        if self.n_jobs > 1 and type(self.launcher).__name__ == "BasicLauncher":
            log.warning(
                "hydra.sweeper.n_jobs=%d with Hydra's basic launcher runs each batch one trial after "
                "another; for parallel trials add hydra/launcher=joblib (or submitit on a cluster).",
                self.n_jobs,
            )
        if planned:
            for params in self.enqueue_trials:
                study.enqueue_trial(params, skip_if_exists=True)

        failures: list[str] = []
        while (left := self.n_trials - len(study.get_trials(deepcopy=False, states=FINISHED))) > 0:
            batch = [study.ask(distributions) for _ in range(min(self.n_jobs, left))]
            for trial, outcome in zip(batch, self._run_batch(study, batch, space, fixed), strict=True):
                if outcome.state == TrialState.FAIL:
                    failures.append(f"trial {trial.number}: {mask_secrets(outcome.reason or '')}")
            if len(failures) > self.max_failure_rate * planned:
                self._summarize(study, sweep_dir, stopped=True)
                raise TooManyFailuresError(
                    f"Stopped study {study.study_name}: {len(failures)} trials failed, more than "
                    f"hydra.sweeper.max_failure_rate={self.max_failure_rate} of the {planned} this run "
                    f"planned.\n  "
                    + "\n  ".join(failures[-5:])
                    + "\nEach failed run in MLflow has the error "
                    "as its 'error' tag and the traceback as error.txt. Fix the cause and run the same "
                    "command again to continue the study (raise hydra.sweeper.n_trials if it already has "
                    "that many finished trials: FAIL ones count), or allow more failures with "
                    "hydra.sweeper.max_failure_rate."
                )
        self._summarize(study, sweep_dir, stopped=False)

    def _open_study(self) -> optuna.Study:
        storage = open_storage(self.storage)
        try:
            earlier = len(storage.get_all_trials(storage.get_study_id_from_name(self.study_name), False))
        except KeyError:  # a new study
            earlier = 0
        # A rerun's sampler starts where the study stands, so its random start-up trials are new ones.
        seed = self.sampler_cfg.get("seed")
        sampler = instantiate(self.sampler_cfg, **({"seed": seed + earlier} if seed is not None else {}))
        study = optuna.create_study(
            storage=storage,
            study_name=self.study_name,
            sampler=sampler,
            pruner=instantiate(self.pruner_cfg),
            direction=self.direction,
            load_if_exists=True,
        )
        existing = study.direction.name.lower()
        if existing != self.direction:
            raise ValueError(
                f"Study {self.study_name} in {redact(self.storage)} was created to {existing}, but "
                f"hydra.sweeper.direction={self.direction}. Use the study's direction, or another "
                "hydra.sweeper.study_name for a new study."
            )
        return study

    def _run_batch(
        self, study: optuna.Study, batch: list[Trial], space: list[SearchParam], fixed: list[str]
    ) -> list[Outcome]:
        overrides = []
        for trial in batch:
            searched = [p.override(trial.params[p.name]) for p in space]
            log.info("Trial %d: %s", trial.number, " ".join(searched))
            overrides.append([*fixed, *searched, *job_overrides(study.study_name, trial.number)])
        try:
            self.validate_batch_is_legal(overrides)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
        except BaseException as err:
            # A config error that stops the sweep, Ctrl-C, a launcher that failed: leave no trial RUNNING.
            for trial in batch:
                try:
                    reason = f"the sweep stopped: {type(err).__name__}: {err}"
                    self._tell(study, trial, Outcome(TrialState.FAIL, reason=reason))
                except Exception as tell_err:  # keep the error that stopped the sweep the one raised
                    log.warning("Trial %d stays RUNNING in the storage: %s", trial.number, tell_err)
            raise
        self.job_idx += len(returns)
        outcomes = [self._outcome(ret) for ret in returns]
        for trial, outcome in zip(batch, outcomes, strict=True):
            self._tell(study, trial, outcome)
        return outcomes

    def _outcome(self, ret: JobReturn) -> Outcome:
        if ret.status == JobStatus.COMPLETED:
            return self._value_of(ret.return_value)
        # The job's exception. (ret.return_value would re-raise it, and print "Error executing job".)
        error = ret._return_value
        if isinstance(error, optuna.TrialPruned):
            return Outcome(TrialState.PRUNED, reason=str(error) or None)  # when and at what value
        return Outcome(TrialState.FAIL, reason=f"{type(error).__name__}: {error}", exception=error)

    def _value_of(self, result: Any) -> Outcome:
        """The number to tell Optuna, from the summary dict the job returned (or a plain number)."""
        value = result
        value_from = None
        if isinstance(result, Mapping):
            if self.metric not in result:
                return Outcome(
                    TrialState.FAIL,
                    reason=f"the job's result has no {self.metric!r} (hydra.sweeper.metric); it has "
                    f"{', '.join(sorted(result))}",
                )
            value = result[self.metric]
            if value is None and self.fallback_metric:
                fallback = result.get(self.fallback_metric)
                if fallback is not None:
                    value = self.fallback_offset + float(fallback)
                    value_from = f"{self.fallback_offset} + {self.fallback_metric} ({self.metric} is None)"
            if value is None:
                return Outcome(
                    TrialState.FAIL,
                    reason=f"{self.metric} is None; rank such trials with hydra.sweeper.fallback_metric",
                )
        try:
            value = float(value)
        except (TypeError, ValueError):
            return Outcome(TrialState.FAIL, reason=f"the job returned {result!r}, not a number for Optuna")
        if not math.isfinite(value):
            return Outcome(TrialState.FAIL, reason=f"{self.metric} is {value}: the training diverged")
        return Outcome(TrialState.COMPLETE, value=value, value_from=value_from)

    def _tell(self, study: optuna.Study, trial: Trial, outcome: Outcome) -> None:
        # Set by the job once it has an MLflow run. Read from the storage: Trial.user_attrs is this
        # process's copy, from before the job ran.
        stored = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        run_id = stored.user_attrs.get("mlflow_run_id")
        if outcome.reason:  # an error message may quote a URL: never with its password
            outcome = replace(outcome, reason=mask_secrets(outcome.reason))
        if outcome.state == TrialState.FAIL and outcome.reason:
            trial.set_user_attr("error", outcome.reason[:5000])
        if outcome.value_from:
            trial.set_user_attr("value_from", outcome.value_from)
        study.tell(trial, outcome.value, state=outcome.state, skip_if_finished=True)
        if outcome.state == TrialState.COMPLETE:
            told = f" = {outcome.value_from}" if outcome.value_from else ""
            log.info("Trial %d COMPLETE: %s%s = %.4g", trial.number, self.metric, told, outcome.value)
        elif outcome.state == TrialState.PRUNED:
            log.info("Trial %d PRUNED: %s", trial.number, outcome.reason or "stopped by the pruner")
        else:
            # The traceback is in the MLflow run's error.txt; a job that failed before it had a run has none.
            traceback_here = outcome.exception if run_id is None else None
            log.warning("Trial %d FAIL: %s", trial.number, outcome.reason, exc_info=traceback_here)
        self._mark_run(run_id, outcome)

    def _mlflow_client(self) -> Any:
        if not self.mlflow_cfg.get("tracking_uri"):
            return None
        from mlflow import MlflowClient

        quiet_run_links(self.mlflow_cfg.tracking_uri)
        return MlflowClient(self.mlflow_cfg.tracking_uri)

    def _mark_run(self, run_id: str | None, outcome: Outcome) -> None:
        """The trial's final state as its run's tag ``optuna.state``, and the value Optuna was told as the
        metric ``optuna/value``. A job that completed but whose number Optuna cannot use (missing, None,
        NaN) also ends FAILED in MLflow, with the reason."""
        client = self._mlflow_client()
        if run_id is None or client is None:
            return
        try:
            client.set_tag(run_id, "optuna.state", outcome.state.name)
            if outcome.value is not None:
                client.log_metric(run_id, "optuna/value", outcome.value)
            if outcome.state == TrialState.FAIL and client.get_run(run_id).info.status == "FINISHED":
                client.set_tag(run_id, "error", outcome.reason or "")
                client.set_terminated(run_id, "FAILED")
        except Exception as err:  # the study goes on; MLflow only mirrors its state
            reason = mask_secrets(str(err))
            log.warning("Could not mark MLflow run %s as %s: %s", run_id, outcome.state.name, reason)

    def _summarize(self, study: optuna.Study, sweep_dir: Path, stopped: bool) -> None:
        """Print the study's best trial, write it to optimization_results.yaml in the sweep folder and log it
        as an MLflow run ('study <name>') beside the trials' runs."""
        trials = study.get_trials(deepcopy=False)
        counts = Counter(t.state.name for t in trials)
        summary: dict[str, Any] = {
            "study_name": study.study_name,
            "storage": redact(self.storage),
            "direction": self.direction,
            "metric": self.metric,
            "trials": dict(sorted(counts.items())),
        }
        best: FrozenTrial | None = None
        if counts[TrialState.COMPLETE.name]:
            best = study.best_trial
            summary.update(
                best_trial=best.number,
                best_value=best.value,
                best_params=best.params,
                best_value_from=best.user_attrs.get("value_from", self.metric),
                best_mlflow_run_id=best.user_attrs.get("mlflow_run_id"),
            )
            log.info(
                "Best of study %s (%s): trial %d, %s=%.4g with %s",
                study.study_name,
                ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
                best.number,
                self.metric,
                best.value,
                " ".join(f"{k}={v}" for k, v in best.params.items()),
            )
        else:
            log.warning("Study %s has no COMPLETE trial yet (%s).", study.study_name, dict(counts))
        OmegaConf.save(OmegaConf.create(summary), sweep_dir / "optimization_results.yaml")
        self._log_summary_run(summary, best, stopped)

    def _log_summary_run(self, summary: dict[str, Any], best: FrozenTrial | None, stopped: bool) -> None:
        client = self._mlflow_client()
        if client is None:
            return
        try:
            experiment = client.get_experiment_by_name(self.mlflow_cfg.experiment_name)
            if experiment is None:
                log.warning("No MLflow experiment %s: no summary run.", self.mlflow_cfg.experiment_name)
                return
            tags = {
                "optuna.study": summary["study_name"],
                "optuna.summary": "true",
                "optuna.storage": summary["storage"],
                "optuna.direction": self.direction,
                "optuna.metric": self.metric,
                **{f"optuna.n_{state.lower()}": str(n) for state, n in summary["trials"].items()},
            }
            if best is not None:
                tags["optuna.best_trial"] = str(best.number)
                tags["optuna.best_run_id"] = str(best.user_attrs.get("mlflow_run_id"))
            run = client.create_run(
                experiment.experiment_id, run_name=f"study {summary['study_name']}", tags=tags
            )
            if best is not None:
                for name, value in best.params.items():
                    client.log_param(run.info.run_id, name, str(value))
                client.log_metric(run.info.run_id, "optuna/best_value", best.value)
                if "value_from" not in best.user_attrs:  # the job's own metric, comparable with the trials'
                    client.log_metric(run.info.run_id, self.metric, best.value)
            client.set_terminated(run.info.run_id, "FAILED" if stopped else "FINISHED")
        except Exception as err:  # the study is in its storage either way
            log.warning("Could not log the study summary to MLflow: %s", mask_secrets(str(err)))
