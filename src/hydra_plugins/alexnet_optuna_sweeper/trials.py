"""What the sweeper and its training jobs share: the storage, and how a job finds the trial it runs.

The sweeper asks Optuna for a trial and launches one job with the trial's parameters plus
``job_overrides(study, number)``: ``++optuna.study=<name> ++optuna.trial=<number>``. The job (see
``alexnet/search.py``) opens the same storage, finds the trial with ``load_trial`` and reports to it.

Optuna is imported inside the functions: Hydra imports every public module of a plugin at start-up, also
for runs that never sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.override_parser.types import Transformer

from alexnet.redaction import mask_secrets  # standard library only: cheap at Hydra's start-up

if TYPE_CHECKING:
    import optuna

# Seconds a process waits for SQLite's write lock before giving up: parallel trials write to one file.
SQLITE_LOCK_TIMEOUT_S = 60


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's storage for a SQLAlchemy URL: ``sqlite:///path/optuna.db``, ``postgresql://...``, ..."""
    import optuna
    from sqlalchemy.engine import make_url

    engine_kwargs = {}
    if url.startswith("sqlite"):
        # SQLite's default is to fail at once when another process holds the lock; wait instead.
        engine_kwargs["connect_args"] = {"timeout": SQLITE_LOCK_TIMEOUT_S}
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def redact(url: str) -> str:
    """The storage URL without its password, for logs and MLflow tags."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return mask_secrets(url)


def job_overrides(study_name: str, trial_number: int) -> list[str]:
    """The overrides that tell a job which trial it runs (``++``: add the keys, or replace them)."""
    return [f"++optuna.study={Transformer.str(study_name)}", f"++optuna.trial={trial_number}"]


def load_trial(
    storage_url: str, study_name: str, trial_number: int, pruner: optuna.pruners.BasePruner
) -> optuna.Trial:
    """The RUNNING trial ``trial_number`` of ``study_name``, as a ``Trial`` that can report and be pruned.

    ``pruner`` must be the study's pruner: ``Trial.should_prune`` asks the study's pruner, and a job is a
    separate process (or a separate machine) from the sweeper that created the study.
    """
    import optuna
    from optuna.trial import TrialState

    storage = open_storage(storage_url)
    where = f"study {study_name!r} in {redact(storage_url)}"
    try:
        study_id = storage.get_study_id_from_name(study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)
    except KeyError:
        raise RuntimeError(
            f"No trial {trial_number} in {where}. optuna.study and optuna.trial are set by the Optuna "
            "sweeper for each job (python src/train.py -m hparams_search=<name>); do not set them by hand."
        ) from None
    state = storage.get_trial(trial_id).state
    if state != TrialState.RUNNING:
        raise RuntimeError(f"Trial {trial_number} of {where} is {state.name}, not RUNNING: nothing to run.")
    # The job never samples (the sweeper did); a random sampler skips TPE's start-up work.
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=optuna.samplers.RandomSampler(), pruner=pruner
    )
    return optuna.trial.Trial(study, trial_id)
