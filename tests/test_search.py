"""Optuna studies through `python src/train.py -m hparams_search=...`: the sweeper's translation of Hydra's
sweep syntax and its bookkeeping (in-process, seconds), then whole studies as a user runs them (subprocesses
on synthetic data, a temporary Optuna storage and MLflow store)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.alexnet_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    SearchSpaceError,
    TooManyFailuresError,
    params_to_entries,
    parse_search_space,
)

ROOT = Path(__file__).resolve().parents[1]


def space_of(*entries: str):
    return parse_search_space(list(entries), OverridesParser.create())


# --- Hydra's sweep syntax -> Optuna distributions ---------------------------------------------------------


def test_sweep_syntax_becomes_optuna_distributions():
    space, fixed = space_of(
        "optimizer.lr=tag(log, interval(1e-4, 0.1))",
        "model.dropout=interval(0, 0.7)",
        "data.batch_size=choice(64, 128, 256)",
        "model.activation=relu,tanh",
        "trainer.max_epochs=range(5, 31, 5)",  # Hydra's stop is exclusive: 5 ... 30
        "+data.scale=tag(log, range(1, 9))",
        "model.width=range(0.25, 1.0, 0.25)",
        "seed=3",
        "experiment=smoke",
    )
    got = {p.name: p.distribution for p in space}
    assert got == {
        "optimizer.lr": FloatDistribution(1e-4, 0.1, log=True),
        "model.dropout": FloatDistribution(0.0, 0.7),
        "data.batch_size": CategoricalDistribution([64, 128, 256]),
        "model.activation": CategoricalDistribution(["relu", "tanh"]),
        "trainer.max_epochs": IntDistribution(5, 30, step=5),
        "data.scale": IntDistribution(1, 8, log=True),
        "model.width": FloatDistribution(0.25, 0.75, step=0.25),
    }
    assert fixed == ["seed=3", "experiment=smoke"]
    # The override a trial gets keeps the key's prefix and Hydra's escaping.
    by_name = {p.name: p for p in space}
    assert by_name["data.scale"].override(4) == "+data.scale=4"
    assert by_name["model.activation"].override("a b") == "model.activation=a\\ b"


def test_an_interval_on_an_integer_key_samples_integers():
    """`trainer.max_epochs=interval(5, 30)`: a float trial value would fail the config check and stop the
    study, so an interval on a key that holds an integer is sampled as integers."""
    space, _ = parse_search_space(
        ["trainer.max_epochs=interval(5, 30)", "optimizer.lr=interval(0.001, 0.1)"],
        OverridesParser.create(),
        integer=lambda key: key == "trainer.max_epochs",
    )
    got = {p.name: p.distribution for p in space}
    assert got == {
        "trainer.max_epochs": IntDistribution(5, 30),
        "optimizer.lr": FloatDistribution(0.001, 0.1),
    }


def test_the_command_line_wins_over_the_config_search_space():
    entries = params_to_entries({"optimizer.lr": "tag(log, interval(1e-4, 0.1))", "model.dropout": 0.0})
    assert entries == ["optimizer.lr=tag(log, interval(1e-4, 0.1))", "model.dropout=0.0"]
    space, fixed = space_of(*entries, "optimizer.lr=0.01", "model.dropout=interval(0, 0.5)")
    assert [p.name for p in space] == ["model.dropout"]
    assert fixed == ["optimizer.lr=0.01"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("optimizer.lr=tag(log, interval(0, 0.1))", "optimizer.lr=tag(log, interval(0, 0.1))"),
        ("optimizer.lr=tag(lg, interval(1e-4, 0.1))", "unknown tag lg"),
        ("data.batch_size=tag(log, choice(64, 128))", "'log' applies to interval() and range()"),
        ("trainer.max_epochs=range(5, 5)", "the range is empty"),
    ],
)
def test_a_search_space_optuna_cannot_sample_names_its_entry(entry: str, message: str):
    with pytest.raises(SearchSpaceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        space_of(entry)


@pytest.mark.parametrize(
    ("overrides", "study", "searched", "pruner"),
    [
        (
            ["hparams_search=cifar_sgd"],
            "cifar_sgd",
            {"optimizer.lr", "optimizer.weight_decay"},
            "MedianPruner",
        ),
        # Figure 1 times training speed: no pruning on validation error there.
        (
            ["hparams_search=figure1_lr", "model.activation=tanh"],
            "figure1_lr_tanh",
            {"optimizer.lr"},
            "NopPruner",
        ),
    ],
)
def test_the_shipped_searches_compose_and_parse(
    overrides: list[str], study: str, searched: set[str], pruner: str
):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper.study_name == study
    assert sweeper.storage == f"sqlite:///{ROOT}/optuna.db"  # next to mlflow.db
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 0
    assert sweeper.pruner._target_ == f"optuna.pruners.{pruner}"
    params = OmegaConf.to_container(sweeper.params, resolve=True)
    space, _ = space_of(*params_to_entries(params))
    assert searched <= {p.name for p in space}
    if study.startswith("figure1"):
        assert sweeper.metric == "final/epochs_to_target"
        assert sweeper.fallback_offset == cfg.trainer.max_epochs
        # Figure 1's protocol: the four-layer net, a fixed rate, no regularization, stopped at 25%.
        assert cfg.model.arch.value == "figure1_cnn" and cfg.stop_at_target and not cfg.data.crops
        assert cfg.optimizer.min_lr == cfg.optimizer.lr and cfg.optimizer.weight_decay == 0.0


# --- The sweeper's bookkeeping, with a stand-in launcher -------------------------------------------------


class FakeLauncher:
    """Runs `job(trial number, params)` in-process and returns what Hydra's launchers return."""

    def __init__(self, job):
        self.job = job

    def launch(self, job_overrides, initial_job_idx):
        returns = []
        for overrides in job_overrides:
            values = dict(o.lstrip("+").split("=", 1) for o in overrides)
            ret = JobReturn(overrides=list(overrides))
            try:
                ret.return_value = self.job(int(values["optuna.trial"]), values)
                ret.status = JobStatus.COMPLETED
            except Exception as err:  # what Hydra's run_job does with a job's exception
                ret.return_value = err
                ret.status = JobStatus.FAILED
            returns.append(ret)
        return returns


def make_sweeper(tmp_path: Path, job, **settings) -> OptunaSweeperImpl:
    defaults = dict(
        study_name="unit",
        storage=f"sqlite:///{tmp_path / 'optuna.db'}",
        direction="minimize",
        metric="best/val_top1_err",
        fallback_metric=None,
        fallback_offset=0.0,
        report="val/top1_err",
        n_trials=5,
        n_jobs=1,
        max_failure_rate=0.5,
        enqueue_trials=OmegaConf.create([]),
        sampler=OmegaConf.create({"_target_": "optuna.samplers.RandomSampler", "seed": 0}),
        pruner=OmegaConf.create({"_target_": "optuna.pruners.NopPruner"}),
        mlflow=OmegaConf.create({"tracking_uri": None, "experiment_name": "alexnet"}),
        params=OmegaConf.create({"x": "interval(0, 1)"}),
    )
    sweeper = OptunaSweeperImpl(**{**defaults, **settings})
    sweeper.config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    sweeper.hydra_context = SimpleNamespace(config_loader=None)
    sweeper.launcher = FakeLauncher(job)
    sweeper.validate_batch_is_legal = lambda batch: None
    return sweeper


def trials_of(tmp_path: Path, name: str = "unit") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials


def test_each_outcome_becomes_a_trial_state_and_a_rerun_continues(tmp_path: Path):
    def job(number: int, params: dict) -> dict:
        if number == 1:
            raise FileNotFoundError("no data")
        if number == 2:
            raise optuna.TrialPruned("pruned after epoch 1")
        if number == 3:
            return {"best/val_top1_err": math.nan}  # diverged
        return {"best/val_top1_err": float(params["x"])}

    make_sweeper(tmp_path, job).sweep([])
    trials = trials_of(tmp_path)
    assert [t.state for t in trials] == [
        TrialState.COMPLETE,
        TrialState.FAIL,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.COMPLETE,
    ]
    assert trials[1].user_attrs["error"] == "FileNotFoundError: no data"
    assert "diverged" in trials[3].user_attrs["error"]
    assert trials[0].value == pytest.approx(trials[0].params["x"])
    results = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert results.best_value == min(t.value for t in trials if t.state == TrialState.COMPLETE)

    # Finished trials, FAIL ones too, count toward n_trials: 7 means two more, numbered 5 and 6.
    make_sweeper(tmp_path, job, n_trials=7).sweep([])
    trials = trials_of(tmp_path)
    assert len(trials) == 7 and all(t.state == TrialState.COMPLETE for t in trials[5:])
    # The rerun's sampler is seeded from where the study stands: no repeat of the first run's samples.
    assert {t.params["x"] for t in trials[5:]}.isdisjoint(t.params["x"] for t in trials[:5])


def test_too_many_failures_stop_the_study_and_name_the_errors(tmp_path: Path):
    def job(number: int, params: dict) -> dict:
        raise RuntimeError(f"broken {number}")

    with pytest.raises(TooManyFailuresError, match=r"(?s)2 trials failed.*broken 0.*broken 1"):
        make_sweeper(tmp_path, job, n_trials=4, max_failure_rate=0.25).sweep([])
    assert [t.state for t in trials_of(tmp_path)] == [TrialState.FAIL, TrialState.FAIL]


def test_a_metric_that_is_none_is_told_as_its_fallback(tmp_path: Path):
    def job(number: int, params: dict) -> dict:
        reached = number == 0
        return {"final/epochs_to_target": 3.5 if reached else None, "final/train_top1_err": 0.4}

    make_sweeper(
        tmp_path,
        job,
        n_trials=2,
        metric="final/epochs_to_target",
        fallback_metric="final/train_top1_err",
        fallback_offset=30.0,
    ).sweep([])
    reached, never = trials_of(tmp_path)
    assert reached.value == 3.5 and "value_from" not in reached.user_attrs
    assert never.value == pytest.approx(30.4)
    assert never.user_attrs["value_from"] == "30.0 + final/train_top1_err (final/epochs_to_target is None)"


def test_a_study_is_not_continued_in_the_other_direction(tmp_path: Path):
    make_sweeper(tmp_path, lambda n, p: {"best/val_top1_err": 0.5}, n_trials=1).sweep([])
    with pytest.raises(ValueError, match="was created to minimize"):
        make_sweeper(tmp_path, lambda n, p: {}, direction="maximize").sweep([])


def test_a_mistake_in_one_trials_values_fails_that_trial_and_the_study_goes_on(tmp_path: Path):
    """In a study, task.entry re-raises a person's mistake (a UserError) instead of exiting: the trial's own
    sampled values may be what is wrong, so that trial fails with the reason and the others still run."""
    from alexnet.errors import ConfigError

    def job(number: int, params: dict) -> dict:
        if number == 0:
            raise ConfigError("model.dropout=1.5 is not allowed")
        return {"best/val_top1_err": 0.4}

    make_sweeper(tmp_path, job, n_trials=3).sweep([])
    first, *others = trials_of(tmp_path)
    assert first.state == TrialState.FAIL and "model.dropout=1.5" in first.user_attrs["error"]
    assert [t.state for t in others] == [TrialState.COMPLETE] * 2


def test_a_sweep_stopped_from_outside_leaves_no_trial_running(tmp_path: Path):
    """Ctrl-C, or a launcher that exits, stops the study; its trials are told FAIL, never left RUNNING."""

    def job(number: int, params: dict) -> dict:
        raise KeyboardInterrupt  # not an Exception: the launcher does not catch it, as Hydra's does not

    with pytest.raises(KeyboardInterrupt):
        make_sweeper(tmp_path, job).sweep([])
    (trial,) = trials_of(tmp_path)
    assert trial.state == TrialState.FAIL and "KeyboardInterrupt" in trial.user_attrs["error"]


# --- Whole studies, as a user runs them ---------------------------------------------------------------------


def write_search(tmp_path: Path, name: str, body: str) -> str:
    """A search config of the test's own, found by Hydra through hydra.searchpath."""
    folder = tmp_path / "search_conf" / "hparams_search"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(textwrap.dedent(body))
    return f"hydra.searchpath=[file://{tmp_path / 'search_conf'}]"


def study_trials(tmp_path: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials


def trial_runs(train_run) -> dict[int, object]:
    """The trials' MLflow runs by trial number (the study summary runs left out)."""
    return {int(r.data.tags["optuna.trial"]): r for r in train_run.runs() if "optuna.trial" in r.data.tags}


def test_a_study_runs_end_to_end_in_mlflow_and_a_rerun_continues_it(train_run, tmp_path: Path):
    args = [
        "hparams_search=cifar_sgd",
        "experiment=smoke",
        "test_after_fit=false",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
    ]
    proc = train_run(*args, "hydra.sweeper.n_trials=3", multirun=True)
    trials = study_trials(tmp_path, "cifar_sgd")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    # The paper's values go first (enqueue_trials in conf/hparams_search/cifar_sgd.yaml).
    assert trials[0].params == {
        "optimizer.lr": 0.01,
        "optimizer.weight_decay": 5e-4,
        "model.dropout": 0.5,
        "data.batch_size": 128,
    }
    runs = trial_runs(train_run)
    assert sorted(runs) == [0, 1, 2]
    for trial in trials:
        run = runs[trial.number]
        assert run.info.status == "FINISHED" and run.info.run_id == trial.user_attrs["mlflow_run_id"]
        assert run.data.tags["optuna.study"] == "cifar_sgd" and run.data.tags["optuna.state"] == "COMPLETE"
        assert run.data.metrics["best/val_top1_err"] == pytest.approx(trial.value)
        assert run.data.metrics["optuna/value"] == pytest.approx(trial.value)
        assert float(run.data.params["optimizer.lr"]) == pytest.approx(trial.params["optimizer.lr"])
        assert trial.intermediate_values == {1: pytest.approx(run.data.metrics["val/top1_err"])}
    best = min(trials, key=lambda t: t.value)
    (summary,) = [r for r in train_run.runs() if r.data.tags.get("optuna.summary") == "true"]
    assert summary.data.tags["optuna.best_trial"] == str(best.number)
    assert summary.data.metrics["best/val_top1_err"] == pytest.approx(best.value)
    assert summary.data.metrics["optuna/best_value"] == pytest.approx(best.value)
    assert float(summary.data.params["optimizer.lr"]) == pytest.approx(best.params["optimizer.lr"])
    assert f"Best of study cifar_sgd (3 COMPLETE): trial {best.number}" in proc.stdout + proc.stderr

    # The same command with a larger n_trials runs only the missing trials.
    proc = train_run(*args, "hydra.sweeper.n_trials=5", multirun=True)
    assert "3 finished trials, 2 to run for n_trials=5" in proc.stdout + proc.stderr
    trials = study_trials(tmp_path, "cifar_sgd")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    assert sorted(trial_runs(train_run)) == [0, 1, 2, 3, 4]


def test_the_pruner_stops_a_trial_that_is_clearly_worse(train_run, tmp_path: Path):
    # Trial 0 learns the synthetic classes (val error ~0.8 after epoch 1, ~0.1-0.3 after epoch 2); trial 1's
    # learning rate is too small to move the weights, so it stays at chance (~0.9) every epoch. With one
    # finished trial to compare with, the median pruner must stop trial 1 by epoch 2 at the latest.
    searchpath = write_search(
        tmp_path,
        "prune_test",
        """\
        # @package _global_
        defaults:
          - override /hydra/sweeper: alexnet_optuna
          - override /hydra/sweeper/pruner: median
        hydra:
          sweeper:
            study_name: prune_test
            n_trials: 2
            pruner: {n_startup_trials: 1, n_warmup_steps: 0}
            enqueue_trials: [{optimizer.lr: 0.01}, {optimizer.lr: 1.0e-7}]
            params:
              optimizer.lr: tag(log, interval(1e-7, 0.1))
              optimizer.min_lr: 0
              model.dropout: 0.0
              data.batch_size: 16
              trainer.max_epochs: 3
              test_after_fit: false
        """,
    )
    train_run(
        searchpath,
        "hparams_search=prune_test",
        "experiment=smoke",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        multirun=True,
    )
    good, bad = study_trials(tmp_path, "prune_test")
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2, 3]
    assert bad.state == TrialState.PRUNED
    assert max(bad.intermediate_values) <= 2  # stopped before its last epoch
    runs = trial_runs(train_run)
    assert runs[0].info.status == "FINISHED" and runs[0].data.tags["optuna.state"] == "COMPLETE"
    assert runs[1].info.status == "KILLED" and runs[1].data.tags["optuna.state"] == "PRUNED"
    assert runs[1].data.tags["optuna.pruned"].startswith("pruned after epoch")


def test_trials_that_raise_or_diverge_fail_and_the_study_completes(train_run, tmp_path: Path):
    searchpath = write_search(
        tmp_path,
        "fail_test",
        """\
        # @package _global_
        defaults:
          - override /hydra/sweeper: alexnet_optuna
        hydra:
          sweeper:
            study_name: fail_test
            n_trials: 3
            max_failure_rate: 0.7
            enqueue_trials:
              - {optimizer.lr: 0.01, data: synthetic}
              - {optimizer.lr: 1.0e4, data: synthetic}  # diverges
              - {optimizer.lr: 0.01, data: cifar10}  # raises: no CIFAR-10 under paths.data_dir
            params:
              optimizer.lr: tag(log, interval(1e-3, 1e4))
              data: choice(synthetic, cifar10)
              test_after_fit: false
        """,
    )
    proc = train_run(
        searchpath,
        "hparams_search=fail_test",
        "experiment=smoke",
        f"paths.data_dir={tmp_path / 'no_data'}",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        multirun=True,
    )
    assert proc.returncode == 0
    ok, diverged, raised = study_trials(tmp_path, "fail_test")
    assert ok.state == TrialState.COMPLETE
    assert diverged.state == TrialState.FAIL and "diverged" in diverged.user_attrs["error"].lower()
    assert raised.state == TrialState.FAIL and "CIFAR-10 not found" in raised.user_attrs["error"]
    runs = trial_runs(train_run)
    assert runs[1].info.status == "FAILED" and runs[1].data.tags["optuna.state"] == "FAIL"
    assert runs[1].data.tags["error"]
    assert 2 not in runs  # missing data is found before a run is created; the study holds the reason
    (summary,) = [r for r in train_run.runs() if r.data.tags.get("optuna.summary") == "true"]
    assert summary.data.tags["optuna.n_fail"] == "2" and summary.data.tags["optuna.best_trial"] == "0"


@pytest.mark.slow
def test_parallel_trials_share_the_storage(train_run, tmp_path: Path):
    """hydra-joblib-launcher: two trials in two processes at once, against one SQLite storage."""
    train_run(
        "hparams_search=cifar_sgd",
        "experiment=smoke",
        "test_after_fit=false",
        "trainer.max_epochs=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}",
        multirun=True,
    )
    trials = study_trials(tmp_path, "cifar_sgd")
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(sorted(t.intermediate_values) == [1, 2] for t in trials)
    first, second = (trial_runs(train_run)[n].info for n in (0, 1))
    assert first.start_time < second.end_time and second.start_time < first.end_time  # they overlapped
